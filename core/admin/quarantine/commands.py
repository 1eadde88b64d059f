"""The ``quarantine`` command group as the command line sees it: its five commands, their
options, and the ids they take checked against the names the gateway makes.

ispmailgate.py registers it (``ADMIN_GROUPS``) only when a command line starts with
``quarantine``; each command then imports the module that does its work.
"""

# No "from __future__ import annotations": typer reads the annotations as objects.

from pathlib import Path
from typing import Annotated

import typer

from ispmailgate_filters.kept import MESSAGE, RECORD, is_id

from ...rules import DEFAULT_CONFIG_PATH
from .times import moment

quarantine_cli = typer.Typer(add_completion=False,
                             context_settings={"help_option_names": ["-h", "--help"]},
                             help="Kept copies (virscan's quarantine, tmp_dir/keep/): list, show, release, "
                                  "delete, purge.")

ConfigOption = Annotated[Path | None, typer.Option(
    "-c", "--config", metavar="FILE", envvar="ISPMAILGATE_CONFIG",
    help=f"Rule file (TOML) naming the quarantines, as for a run: $ISPMAILGATE_CONFIG, else "
         f"{DEFAULT_CONFIG_PATH}.")]


def _entry_id(text: str) -> str:
    """An id as the gateway names entries (a file name of list's is taken too); nothing
    given here is ever used as a path."""
    id = text[:-len(MESSAGE)] if text.endswith(MESSAGE) else text[:-len(RECORD)] if text.endswith(RECORD) else text
    if not is_id(id):
        raise typer.BadParameter(f"{text!r} is not a quarantine id: ids are named like "
                                 "20250301-142501-6C1F0A93B2-4e1a7c ('ispmailgate quarantine list' shows them)")
    return id


def _entry_ids(texts: list[str]) -> list[str]:
    return [_entry_id(text) for text in texts]


def _when(convert, text: str | None, option: str):
    if text is None:
        return None
    try:
        return convert(text)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint=option) from None


def _on_quarantines(ctx: typer.Context, config: Path | None, body) -> int:
    from .session import run_command

    streams = ctx.obj.streams
    return run_command(config, streams.stdout, streams.stderr, body)


IdArgument = Annotated[str, typer.Argument(metavar="ID", callback=_entry_id, show_default=False,
                                           help="An entry's id, as list shows it.")]


@quarantine_cli.command("list")
def quarantine_list(
    ctx: typer.Context,
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="A JSON list of objects, for scripts.")] = False,
    since: Annotated[str | None, typer.Option(
        "--since", metavar="DATE", help="Only entries kept since DATE (2025-03-01, 2025-03-01T14:30) "
                                        "or for AGE (2d, 12h).")] = None,
    verdict: Annotated[str | None, typer.Option(
        "--verdict", metavar="VERDICT", help="Only entries with this verdict (infected, unscannable, "
                                             "unparsable, failed).")] = None,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="The ids alone, one a line.")] = False,
) -> int:
    """List the kept messages: id, time, size, verdict, state, sender, recipients, findings."""
    from .listing import list_entries

    after = _when(moment, since, "--since")
    return _on_quarantines(ctx, config, lambda session: list_entries(
        session, as_json=as_json, since=after, verdict=verdict, quiet=quiet))


@quarantine_cli.command("show")
def quarantine_show(ctx: typer.Context, id: IdArgument, config: ConfigOption = None) -> int:
    """Show an entry: its envelope, findings, releases and the message's header."""
    from .listing import show_entry

    return _on_quarantines(ctx, config, lambda session: show_entry(session, id))


@quarantine_cli.command("release")
def quarantine_release(
    ctx: typer.Context,
    id: IdArgument,
    to: Annotated[list[str] | None, typer.Option(
        "--to", metavar="RCPT", help="Release to this recipient instead (repeat for more).")] = None,
    sender: Annotated[str | None, typer.Option(
        "-f", "--from", metavar="SENDER", help="Envelope sender instead of the kept one.")] = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Release even to recipients that have it, or a copy that was delivered.")] = False,
    config: ConfigOption = None,
) -> int:
    """Re-inject a kept message, byte for byte, to the next hop with its envelope; no chain runs."""
    from .release import release_entry

    return _on_quarantines(ctx, config, lambda session: release_entry(
        session, id, to=list(to or ()), sender=sender, force=force))


@quarantine_cli.command("delete")
def quarantine_delete(
    ctx: typer.Context,
    ids: Annotated[list[str], typer.Argument(metavar="ID...", callback=_entry_ids, show_default=False,
                                             help="Entries' ids, as list shows them.")],
    config: ConfigOption = None,
) -> int:
    """Delete entries: the message and its record."""
    from .removal import delete_entries

    return _on_quarantines(ctx, config, lambda session: delete_entries(session, ids))


@quarantine_cli.command("purge")
def quarantine_purge(
    ctx: typer.Context,
    older_than: Annotated[str, typer.Option(
        "--older-than", metavar="AGE", show_default=False,
        help="Remove what was kept longer ago than AGE (30d, 12h, 2w) or before a DATE.")],
    dry_run: Annotated[bool, typer.Option(
        "-n", "--dry-run", help="List what would be removed; remove nothing.")] = False,
    config: ConfigOption = None,
) -> int:
    """Remove every entry kept before a time, and nothing else."""
    from .removal import purge_entries

    before = _when(moment, older_than, "--older-than")
    return _on_quarantines(ctx, config, lambda session: purge_entries(session, before, dry_run))
