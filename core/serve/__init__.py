"""ispmailgate serve: pre-forked workers behind a Unix socket.

The master loads the rule file and every module once, binds the socket, and forks
workers; each worker drops to the mail user, accepts one connection at a time and runs
the request through the command line's own ``ispmailgate.run`` (handed in as a
:class:`.worker.Service`, never imported) -- the very same parser and code path as a
one-shot run -- with the message read from the connection and the output sent back to
``ispmailgate-client``.  The master itself never reads a byte a client sent.

As in gunicorn's arbiter, signal handlers only queue the signal; the main loop handles
them: TERM/INT drain the workers and stop, QUIT stops at once, HUP re-reads the rule file
and replaces the workers (a bad file is refused and the old workers keep serving), CHLD
reaps, and a worker that dies is replaced.  A worker that fails to boot stops the master
instead of a fork loop.

The package: :mod:`.boot` starts the server (rule file, socket, pid file, daemon);
:mod:`.master` keeps the workers; :mod:`.worker` is one of them, taking connections
through :mod:`.doorway`; :mod:`.protocol` reads requests and writes replies;
:mod:`.listener` is the socket; :mod:`.section` the rule file's ``[serve]`` table.
"""

import logging

# Not below "ispmailgate": a run replaces that logger's handlers every time.
logging.getLogger("ispmailgate.serve").propagate = False
