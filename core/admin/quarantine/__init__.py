"""``ispmailgate quarantine``: the kept copies an administrator works with.

Every quarantine the rule file names -- each filter step's ``quarantine_dirs()`` (virscan's
``quarantine_dir``) and the gateway's own ``tmp_dir/keep/`` -- read as the mail user, after
privileges are dropped as in a one-shot run, and only where nobody else can write.  Entries
are named by ids the gateway makes (:mod:`ispmailgate_filters.kept`, the format); nothing
from the command line is ever used as a path.

:mod:`.session` (the rule file, the log, privileges), :mod:`.store` (one quarantine: its
directory, entries, locks), :mod:`.listing` (``list``, ``show``), :mod:`.release`,
:mod:`.removal` (``delete``, ``purge``), :mod:`.times` (dates and ages on the command line).
"""
