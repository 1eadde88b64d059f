"""The administrator's commands: ``check``, ``explain`` and the report of ``--dry-run``.

None of them delivers anything.  ``check`` reads the rule file the way a run does, but
collects every problem instead of stopping at the first, then (unless ``--config-only``)
asks each filter about its environment (``Filter.problems()``) and looks at what the core
itself needs: the work directory, somewhere to log, the next hop; given ``--client-user``,
whether that user can reach the socket of ``ispmailgate serve``.  ``explain`` routes recipients without a message;
``dry_run_report`` describes a run whose chains have run but whose delivery did not.

Imported only by those commands, so the delivery path never pays for it: :mod:`.check`,
:mod:`.explain`, :mod:`.dry_run`, and what they share, :mod:`.output`.
"""
