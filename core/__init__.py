"""The core of ispmailgate: one module per concept, in the order a message travels.

``ispmailgate.py`` (the command line) hands each run to :mod:`.run`, which reads the
message and calls the concepts in turn:

- :mod:`.rules` reads and checks the rule file (its top-level keys: :mod:`.settings`);
- :mod:`.reading` reads the message from stdin, :mod:`.envelope` makes its envelope
  (addresses as such: :mod:`.addresses`);
- :mod:`.process` drops privileges and keeps the time limit, :mod:`.logs` the log;
- :mod:`.routing` picks each recipient's chain and runs the chains;
- :mod:`.delivery` hands each distinct result to the next hop, with the gate's own
  reports; :mod:`.arc` seals what a filter changed;
- :mod:`.outcome` says what happened to each recipient, :mod:`.status` holds the exit
  statuses and enhanced status codes.

Beside the run: :mod:`.admin` (check, explain, the report of --dry-run) and :mod:`.serve`
(pre-forked workers behind a socket for ispmailgate-client).  The filters and their
interface are below all of this, in ``ispmailgate_filters``.
"""

import logging

# Until a run configures it, the log goes nowhere: never Python's last-resort stderr.
_log = logging.getLogger("ispmailgate")
_log.addHandler(logging.NullHandler())
_log.propagate = False
