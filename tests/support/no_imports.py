"""The gate as a root-started run whose mail user cannot read this Python installation.

``python no_imports.py RECORD ARG...`` runs ``ispmailgate ARG...``; where the run drops its
privileges it preloads as it must (``process.preload``), and from then on every import
fails, as it would for a mail user who cannot read the interpreter (an interpreter under
root's home).  Each existing module the run still tried to import is written to RECORD, so a
test sees even imports whose failure the code caught (a codec lookup that fails quietly is
a value that quietly stops being decoded).  Independent of this machine's permissions: the
run keeps its user, only importing is taken away.
"""

import sys


def main() -> int:
    record = open(sys.argv[1], "a", buffering=1)        # opened now: writable after the "drop"
    sys.argv[1:] = sys.argv[2:]

    import ispmailgate
    from ispmailgate_core import process, run

    class Forbidden:
        """First on sys.meta_path: nothing that is not imported yet can be."""

        @staticmethod
        def find_spec(name, path=None, target=None):
            # A module that does not exist is no loss (dnspython looks for IN.TXT before ANY.TXT)
            if any(finder.find_spec(name, path, target) for finder in sys.meta_path[1:]
                   if hasattr(finder, "find_spec")):
                record.write(name + "\n")
            raise ImportError(f"{name}: nothing can be imported once privileges are dropped")

    def drop_privileges(config) -> None:
        process.preload(config)
        sys.meta_path.insert(0, Forbidden)

    run.drop_privileges = drop_privileges
    return ispmailgate.main()


if __name__ == "__main__":
    sys.exit(main())
