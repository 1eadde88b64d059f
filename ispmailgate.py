"""ispmailgate: a filtering mail delivery agent.

An MTA hands over one message on stdin, the envelope sender with ``-f`` and the
recipients as arguments.  Each recipient gets a chain of filters from the rule file;
every distinct filter step runs once however many recipients share it; each distinct
result goes to the next hop (SMTP, a sendmail-compatible command, or stdout) once, for
all of its recipients.  The exit status tells the MTA what happened: 0 delivered (or
discarded on purpose, and logged), 75 try again later, 69 bounce.

This file is the program's face: the command line (typer), and around every run the guard
that turns whatever happens into a status an MTA understands.  The run of one message,
:class:`ispmailgate_core.run.Gate`, reads top to bottom in the order a message travels:
argv (here) -> rule file (``rules``) -> message and envelope (``reading``, ``envelope``)
-> route and run the chains (``routing``) -> deliver (``delivery``) -> exit status
(``outcome``, ``status``).  The subcommands import their modules only when called:
``serve`` (``ispmailgate_core.serve``), ``check``, ``explain``, ``dkim-record`` and ``quarantine``
(``ispmailgate_core.admin``).
"""

# No "from __future__ import annotations" here: typer would then eval every annotation
# string of the CLI function at each start, a few milliseconds the one-shot path saves.

import functools
import sys
from pathlib import Path
from typing import Annotated, NamedTuple

import typer

from ispmailgate_core import settings
from ispmailgate_core.logs import SyslogHandler, configure_logging, log
from ispmailgate_core.rules import DEFAULT_CONFIG_PATH, Config
from ispmailgate_core.run import Gate, Request, Streams, status_line
from ispmailgate_core.status import (EX_CONFIG, EX_OK, EX_TEMPFAIL, EX_UNAVAILABLE, LOCAL_TROUBLE, MISCONFIGURED,
                                     Stop, tempfail)

__version__ = "2.0.0"


# =========================================================================================
# argv: one message through the gate
# =========================================================================================

gate_cli = typer.Typer(add_completion=False, context_settings={"help_option_names": ["-h", "--help"]})

ConfigOption = Annotated[Path | None, typer.Option(
    "-c", "--config", metavar="FILE", envvar="ISPMAILGATE_CONFIG",
    help=f"Rule file (TOML). Default: $ISPMAILGATE_CONFIG, else {DEFAULT_CONFIG_PATH} "
         "if present, else the built-in default (dummy chain).")]
SenderOption = Annotated[str | None, typer.Option(
    "-f", "--from", metavar="SENDER",
    help="Envelope sender; '' or '<>' is the null sender of bounces.")]


@gate_cli.command(epilog="Subcommands: ispmailgate serve | check | explain | dkim-record | quarantine (see ispmailgate(1)).")
def deliver(
    ctx: typer.Context,
    recipients: Annotated[list[str] | None, typer.Argument(
        metavar="[RCPT]...", show_default=False,
        help="Envelope recipients. None (and no -f): shell test mode, the envelope is read "
             "from the message and the result written to stdout.")] = None,
    sender: SenderOption = None,
    config: ConfigOption = None,
    mail_host: Annotated[str | None, typer.Option(
        "-m", "--mail-host", metavar="HOST[:PORT]",
        help="Deliver by SMTP to this next hop (overrides mail_host and sendmail_command).")] = None,
    to_stdout: Annotated[bool, typer.Option(
        "--stdout", help="Write the result to stdout instead of delivering (procmail :0 fw).")] = False,
    dry_run: Annotated[bool, typer.Option(
        "-n", "--dry-run", help="Run the chains and print what would be delivered to whom, with "
                                "each filter's verdict; deliver nothing.")] = False,
    originating: Annotated[bool, typer.Option(
        "--originating", help="The mail is the MTA's own users' (submission, mynetworks): [[dkim]] "
                              "tables with sign = \"originating\" sign only in such a run.")] = False,
    debug: Annotated[bool, typer.Option("-d", "--debug", help="Log every step in detail.")] = False,
    tmp_dir: Annotated[str | None, typer.Option(
        "-t", "--tmp-dir", metavar="DIR", help="Directory for work files (overrides tmp_dir).")] = None,
    facility: Annotated[str | None, typer.Option(
        "-a", "--facility", metavar="FACILITY", help="Syslog facility (overrides facility).")] = None,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> int:
    """Filter one message from stdin and deliver it to the next hop."""
    if version:
        ctx.obj.streams.stdout.write(f"ispmailgate {__version__}\n".encode())
        return EX_OK
    if facility is not None:
        try:
            facility = settings.facility(facility)
        except ValueError as error:
            raise tempfail(MISCONFIGURED, f"usage: -a/--facility: {error}") from None
    request = Request(recipients=list(recipients or ()), sender=sender, config=config,
                      mail_host=mail_host, to_stdout=to_stdout, debug=debug,
                      tmp_dir=tmp_dir, facility=facility, dry_run=dry_run, originating=originating)
    return Gate(request, ctx.obj.streams, ctx.obj.preloaded).run()


# =========================================================================================
# the administrator's subcommands
# =========================================================================================

admin_cli = typer.Typer(add_completion=False, context_settings={"help_option_names": ["-h", "--help"]},
                        help="Administration commands of ispmailgate.")


@admin_cli.callback()
def admin() -> None:
    """Administration commands; a first argument naming none of them is a recipient."""


@admin_cli.command("serve")
def serve(
    socket: Annotated[str | None, typer.Option(
        "--socket", metavar="PATH", help="Unix socket for ispmailgate-client (overrides serve.socket; '' for none).")] = None,
    lmtp: Annotated[str | None, typer.Option(
        "--lmtp", metavar="ADDRESS", help="LMTP listener, unix:PATH or inet:HOST:PORT (overrides serve.lmtp).")] = None,
    smtp: Annotated[str | None, typer.Option(
        "--smtp", metavar="ADDRESS", help="SMTP listener, unix:PATH or inet:HOST:PORT (overrides serve.smtp).")] = None,
    workers: Annotated[int | None, typer.Option(
        "--workers", min=1, metavar="N", help="Worker processes (overrides serve.workers).")] = None,
    pidfile: Annotated[Path | None, typer.Option(
        "--pidfile", metavar="FILE", help="Write the master's pid here (overrides serve.pid_file).")] = None,
    foreground: Annotated[bool, typer.Option(
        "--foreground/--daemon", help="Stay in the foreground (systemd) or detach as a classic daemon.")] = True,
    config: ConfigOption = None,
) -> int:
    """Serve ispmailgate-client and the MTA's LMTP or SMTP: pre-forked workers behind sockets."""
    from ispmailgate_core.serve import boot

    return boot.serve(config, boot.Service(run, _prepare_served_runs), socket=socket, workers=workers,
                      pidfile=pidfile, foreground=foreground, lmtp=lmtp, smtp=smtp)


@admin_cli.command("check")
def check_command(
    ctx: typer.Context,
    config: ConfigOption = None,
    config_only: Annotated[bool, typer.Option(
        "--config-only", help="Check the rule file alone (syntax, keys, types, regexes, filter "
                              "options): nothing on this machine, for a CI before the gateway.")] = False,
    client_user: Annotated[str | None, typer.Option(
        "--client-user", metavar="USER",
        help="Also check that USER, as whom the MTA runs ispmailgate-client, can connect to the "
             "socket of ispmailgate serve.")] = None,
) -> int:
    """Check the rule file and what its filters need; exit 0, or 78 with one line per problem."""
    from ispmailgate_core.admin.check import check

    if config_only and client_user is not None:
        raise typer.BadParameter("--client-user checks this machine; --config-only checks nothing on it")
    return check(config, ctx.obj.streams.stdout, config_only=config_only, client_user=client_user)


@admin_cli.command("explain")
def explain_command(
    ctx: typer.Context,
    recipients: Annotated[list[str], typer.Argument(metavar="RCPT...", show_default=False,
                                                    help="Envelope recipients to route.")],
    sender: SenderOption = None,
    config: ConfigOption = None,
    originating: Annotated[bool, typer.Option(
        "--originating", help="Explain a run given --originating (the MTA's own users' mail).")] = False,
) -> int:
    """Show the rule and chain each recipient gets, and the delivery groups; needs no message."""
    from ispmailgate_core.admin.explain import explain

    return explain(config, sender, recipients, ctx.obj.streams.stdout, originating=originating)


@admin_cli.command("dkim-record")
def dkim_record_command(
    ctx: typer.Context,
    domain: Annotated[str, typer.Argument(metavar="DOMAIN", show_default=False,
                                          help="The domain of a [[dkim]] table.")],
    config: ConfigOption = None,
) -> int:
    """Print the DNS TXT record that publishes the key of each [[dkim]] table of DOMAIN."""
    from ispmailgate_core.admin.dkim_keys import dkim_record

    return dkim_record(config, domain, ctx.obj.streams.stdout)


# Command groups, registered only when a command line names one: building one costs every
# one-shot run about a millisecond.  Name -> "module:typer app".
ADMIN_GROUPS = {"quarantine": "ispmailgate_core.admin.quarantine.commands:quarantine_cli"}


@functools.cache
def admin_app() -> typer.Typer:
    """The admin commands with their groups (``quarantine list`` ...)."""
    import importlib

    for name, where in ADMIN_GROUPS.items():
        module, _, app = where.partition(":")
        admin_cli.add_typer(getattr(importlib.import_module(module), app), name=name)
    return admin_cli


# =========================================================================================
# one command line, guarded
# =========================================================================================

class Invocation(NamedTuple):
    """What a run gets besides argv: its streams, and the config a server loaded once."""
    streams: Streams
    preloaded: "Config | None" = None


def run(argv: list[str], streams: Streams, preloaded: "Config | None" = None) -> int:
    """Run one command line; always returns an exit status an MTA understands."""
    try:
        cli = admin_app() if argv and argv[0] in admin_commands() else gate_cli
        command = click_command(cli)
        status = command.main(args=list(argv), prog_name="ispmailgate", standalone_mode=False,
                              obj=Invocation(streams, preloaded))
    except typer.TyperException as error:              # usage errors: never typer's exit 2
        return status_line(streams, EX_TEMPFAIL, MISCONFIGURED, f"usage: {error.format_message()}")
    except Stop as stop:
        return status_line(streams, stop.code, stop.status, stop.text)
    except SystemExit as stop:          # typer's own exit when a reader closed stdout early
        return status_line(streams, EX_TEMPFAIL, LOCAL_TROUBLE, f"stopped (exit {stop.code}): output closed")
    except BaseException as error:      # the last guard: no traceback ever reaches the MTA
        if not any(isinstance(h, SyslogHandler) for h in log.handlers):
            configure_logging("mail", False, "", [])
        log.error("internal error: %r", error, exc_info=True)
        return status_line(streams, EX_TEMPFAIL, LOCAL_TROUBLE, f"internal error: {error!r}")
    if status in (EX_OK, EX_UNAVAILABLE, EX_TEMPFAIL, EX_CONFIG):
        return status
    if status is None:
        return EX_OK
    return status_line(streams, EX_TEMPFAIL, LOCAL_TROUBLE, f"interrupted (status {status})")


@functools.cache
def click_command(cli: typer.Typer):
    """The click command typer builds from an app: once, as it costs most of a served run."""
    return typer.main.get_command(cli)


def _prepare_served_runs() -> None:
    """Before ``serve`` forks its workers: what every served run would otherwise build anew."""
    import typer.rich_utils  # noqa: F401  (typer's help output, for served --help)

    for cli in (gate_cli, admin_app()):
        click_command(cli)


def admin_commands() -> set[str]:
    """Subcommand names: only as the very first argument (``--`` makes anything a recipient)."""
    return {info.name or info.callback.__name__ for info in admin_cli.registered_commands} | set(ADMIN_GROUPS)


def main() -> int:
    """Console-script entry point: ``ispmailgate``."""
    from ispmailgate_core.standard_streams import standard_streams

    return run(sys.argv[1:], standard_streams())


if __name__ == "__main__":
    sys.exit(main())
