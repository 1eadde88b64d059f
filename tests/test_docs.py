"""Man pages and shell completions: current with the code, complete, rendering cleanly,
and completing for real in bash, zsh and fish."""

from __future__ import annotations

import os
import pty
import re
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import PROJECT

MAN = PROJECT / "man"
COMPLETIONS = PROJECT / "completions"
PAGES = [MAN / "ispmailgate.1", MAN / "ispmailgate.toml.5"]


def generator():
    sys.path.insert(0, str(PROJECT / "tools"))
    try:
        import generate
    finally:
        sys.path.remove(str(PROJECT / "tools"))
    return generate


def rendered(page: Path) -> str:
    """The page as a reader sees it, as plain text."""
    process = subprocess.run(["groff", "-man", "-Tutf8", "-P-cbou", "-rLL=200n", str(page)],
                             capture_output=True, text=True, timeout=60, check=True)
    return process.stdout.replace("\u2010", "-").replace("\u2212", "-")


def mentions(text: str, word: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text) is not None


# -- generated files ----------------------------------------------------------------------------

def test_completions_and_filter_options_are_current():
    process = subprocess.run([sys.executable, str(PROJECT / "tools" / "generate.py"), "--check"],
                             capture_output=True, text=True, timeout=120, check=False)
    assert process.returncode == 0, process.stdout + process.stderr


def test_the_filter_options_block_documents_each_option_with_its_default(tmp_path, monkeypatch):
    """As it will for banner, packer, virscan and pgp: shown here on the test filters."""
    import ispmailgate_filters

    monkeypatch.setattr(ispmailgate_filters, "BUILTIN", {
        "judge": "gate_test_filters:Judge", "picky": "gate_test_filters:Picky", "gone": "no_such_module:X"})
    block = generator().filter_options_block()
    page = tmp_path / "block.5"
    page.write_text(".TH BLOCK 5\n.SH NAME\nblock \\- filter options\n.SH DESCRIPTION\n" + block)
    assert_renders_cleanly(page)
    text = rendered(page)
    assert re.search(r"judge\n\s+Ends the chain with the verdict it is configured for \(or crashes\)\.", text)
    assert re.search(r'verdict = "reject"\n\s+reject \| discard \| tempfail \| error \| crash \| parse', text)
    assert re.search(r"crash_when_checked = false\n\s+problems\(\) itself fails", text)
    assert "Not part of this build: the module no_such_module is missing." in text


# -- the man pages ----------------------------------------------------------------------------------

def assert_renders_cleanly(page: Path) -> None:
    groff = subprocess.run(["groff", "-ww", "-z", "-man", str(page)], capture_output=True, text=True,
                           timeout=60, check=False)
    assert (groff.returncode, groff.stderr) == (0, ""), groff.stderr
    man = subprocess.run(["man", "--warnings", "-l", str(page)], capture_output=True, text=True,
                         timeout=60, check=False, env={**os.environ, "MANWIDTH": "80", "MANPAGER": "cat"})
    assert (man.returncode, man.stderr) == (0, ""), man.stderr
    assert "NAME" in man.stdout and "DESCRIPTION" in man.stdout


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_man_page_renders_without_warnings(page):
    assert_renders_cleanly(page)


def test_every_command_line_option_and_command_is_in_the_man_page():
    main, subcommands = generator().cli()
    text = rendered(MAN / "ispmailgate.1")
    nested = [command for group in subcommands for command in group.subcommands]     # quarantine list ...
    assert {"list", "show", "release", "delete", "purge"} <= {command.name for command in nested}
    for command in [main, *subcommands, *nested]:
        assert command.name == "" or mentions(text, command.name), command.name
        for option in command.options:
            for name in option.names:
                assert mentions(text, name), f"{command.name or 'ispmailgate'} {name}"
            if option.metavar:
                assert option.metavar.split("[")[0] in text, option.metavar
    commands_section = text.split("\nCOMMANDS\n")[1].split("\nSHELL TEST MODE\n")[0]
    for words, _ in generator().commands_in(subcommands):
        assert re.search(rf"^\s+{words} ", commands_section, re.M), words


def test_the_client_and_its_options_are_in_the_man_page():
    """ispmailgate-client parses its own few options by hand (no typer), so they are listed here."""
    import ispmailgate_client

    text = rendered(MAN / "ispmailgate.1")
    assert mentions(text, "ispmailgate-client")
    for name in ("--socket", "--fallback", "--deadline", "ISPMAILGATE_SOCKET", "ISPMAILGATE_FALLBACK",
                 "ISPMAILGATE_DEADLINE",
                 *ispmailgate_client.FALLBACKS):
        assert mentions(text, name), name


def test_every_exit_status_and_file_is_in_the_man_page():
    text = rendered(MAN / "ispmailgate.1")
    section = text.split("\nEXIT STATUS\n")[1].split("\nDELIVERY\n")[0]
    for status in ("0", "69", "75", "78"):
        assert re.search(rf"^\s+{status}\s", section, re.M), status
    from ispmailgate_core import rules, settings

    for path in (rules.DEFAULT_CONFIG_PATH, settings.SETTINGS["tmp_dir"].default, "ISPMAILGATE_CONFIG"):
        assert path in text.split("\nFILES\n")[0] + text.split("\nFILES\n")[1], path


def test_every_rule_file_key_and_built_in_filter_is_in_its_man_page():
    from ispmailgate_core import rules
    from ispmailgate_core.settings import SETTINGS
    from ispmailgate_filters import BUILTIN

    text = rendered(MAN / "ispmailgate.toml.5")
    settings = text.split("\nSETTINGS\n")[1].split("\nRULES\n")[0]
    for key in SETTINGS:
        assert re.search(rf"^\s+{key}\n", settings, re.M), key
    import importlib

    for section in rules.SECTIONS:
        assert f"[{section}]" in text, section
        module, name = generator().SECTION_KEYS[section]
        for key in getattr(importlib.import_module(module), name):
            assert re.search(rf"^\s+{key}( = |\n| )", text, re.M), f"[{section}] {key}"
    for key in (*rules.RULE_KEYS, "recipients", "filter", "type"):
        assert mentions(text, key), key
    filters = text.split("\nBUILT-IN FILTERS\n")[1].split("\nTHIRD-PARTY FILTERS\n")[0]
    for name in BUILTIN:
        assert re.search(rf"^\s+{name}\n", filters, re.M), name


def test_every_option_of_every_filter_in_this_build_is_in_the_man_page():
    from ispmailgate_core import rules
    from ispmailgate_filters import BUILTIN
    from ispmailgate_filters.base import ConfigError

    text = rendered(MAN / "ispmailgate.toml.5")
    for name in BUILTIN:
        try:
            cls = rules.filter_class(name, name)
        except ConfigError:
            continue
        for option in cls.options():
            assert re.search(rf"^\s+{option} = ", text, re.M), f"{name}.{option}"


# -- the README: an overview whose every option and key the man pages explain ----------------------

README = PROJECT / "README.md"


def readme_code() -> tuple[list[str], list[str]]:
    """The README's code: (fenced blocks, inline spans)."""
    text = README.read_text()
    blocks = re.findall(r"^```[a-z]*\n(.*?)^```", text, re.M | re.S)
    spans = re.findall(r"`([^`\n]+)`", re.sub(r"^```.*?^```", "", text, flags=re.M | re.S))
    return blocks, spans


def test_every_option_the_readme_shows_is_in_the_man_page():
    blocks, spans = readme_code()
    options = set()
    for line in [line for block in blocks for line in block.splitlines()] + spans:
        for command in re.finditer(r"(?<![\w/-])(?:/usr/local/bin/|\.venv/bin/)?ispmailgate(?:-client)?\b(.*)", line):
            options.update(re.findall(r"(?<!\S)(--?[a-z][a-z-]*)", command.group(1)))
    assert {"-f", "-c", "--stdout", "--config-only", "--dry-run"} <= options      # the test reads them
    text = rendered(MAN / "ispmailgate.1")
    assert [option for option in sorted(options) if not mentions(text, option)] == []


def test_every_rule_file_key_the_readme_shows_is_in_the_man_page():
    import tomllib

    from ispmailgate_core import rules

    blocks, spans = readme_code()
    toml = [block for block in blocks if re.search(r"^\w+ = ", block, re.M)]
    assert toml, "the README shows a rule file"
    keys = {key for block in toml for key in re.findall(r"^\s*(\w+)\s*=", block, re.M)}
    keys |= {m.group(1) for span in spans if (m := re.match(r"(\w+) = ", span))}
    keys |= {m.group(1) for span in [*spans, *toml] for m in re.finditer(r"\[\[?(\w+)", span)}
    assert {"mail_host", "loop_suffix", "text_file", "recipient_not", "recipients", "filter"} <= keys
    text = rendered(MAN / "ispmailgate.toml.5")
    assert [key for key in sorted(keys) if not mentions(text, key)] == []
    for block in toml:          # and each example is a rule file a run accepts
        rules.build_config(tomllib.loads(block), "README.md")


def test_the_readme_is_an_overview_that_points_at_the_reference():
    text = README.read_text()
    assert len(text.split()) < 1500, "five minutes of reading"
    assert "| option |" not in text            # the options live in the man pages
    assert "man ispmailgate`" in text and "man ispmailgate.toml`" in text
    commands = re.findall(r"^    (\S.*)$", text, re.M)      # the indented set-up commands
    assert commands == ["apt-get update && apt-get install -y python3-venv && python3 -m venv .venv && "
                        ".venv/bin/pip install . && .venv/bin/ispmailgate < examples/sample.eml", "tools/test"]


# -- completions ------------------------------------------------------------------------------------

def bash_complete(words: list[str], cwd: Path | None = None) -> list[str]:
    """What the registered completion function answers for ``words`` (the last is the
    word being completed; the first is the command, ispmailgate or ispmailgate-client),
    called as bash calls it."""
    command = words[0]
    quoted = " ".join("'" + w.replace("'", "'\\''") + "'" for w in words)
    script = (f"source {COMPLETIONS / (command + '.bash')}\n"
              f"spec=$(complete -p {command}); fn=${{spec#*-F }}; fn=${{fn%% *}}\n"
              f"COMP_WORDS=({quoted}); COMP_CWORD={len(words) - 1}\n"
              f'$fn {command} "${{COMP_WORDS[COMP_CWORD]}}" "${{COMP_WORDS[COMP_CWORD-1]}}"\n'
              'printf "%s\\n" "${COMPREPLY[@]}"\n')
    process = subprocess.run(["bash", "--norc", "--noprofile", "-c", script], capture_output=True,
                             text=True, timeout=60, check=True, cwd=cwd)
    assert process.stderr == "", process.stderr
    return [line for line in process.stdout.splitlines() if line]


def test_bash_completes_commands_options_and_values(tmp_path):
    (tmp_path / "rules.toml").write_text("")
    (tmp_path / "spool").mkdir()
    commands = sorted(command.name for command in generator().cli()[1])
    assert {"check", "explain", "serve"} <= set(commands)
    assert bash_complete(["ispmailgate", ""]) == commands
    assert bash_complete(["ispmailgate", "serve", "--da"]) == ["--daemon"]
    assert bash_complete(["ispmailgate", "ex"]) == ["explain"]
    assert bash_complete(["ispmailgate", "--dr"]) == ["--dry-run"]
    assert set(bash_complete(["ispmailgate", "-"])) >= {"-f", "--from", "-c", "--config", "--stdout",
                                                        "-n", "--dry-run", "-h", "--help", "--version"}
    assert bash_complete(["ispmailgate", "check", "-"]) == ["-c", "--config", "--config-only", "--client-user",
                                                            "-h", "--help"]
    assert "--dry-run" not in bash_complete(["ispmailgate", "explain", "--"])
    assert bash_complete(["ispmailgate", "-a", "loc"]) == [f"local{i}" for i in range(8)]
    assert bash_complete(["ispmailgate", "-c", "ru"], tmp_path) == ["rules.toml"]
    assert bash_complete(["ispmailgate", "--tmp-dir", ""], tmp_path) == ["spool"]
    assert bash_complete(["ispmailgate", "-f", ""]) == []                    # no guessing addresses
    assert bash_complete(["ispmailgate", "-f", "a@b", "ch"]) == []            # a recipient, not a command
    assert bash_complete(["ispmailgate", "--", "-"]) == []                    # recipients only
    assert bash_complete(["ispmailgate", "quarantine", ""]) == ["delete", "list", "purge", "release", "show"]
    assert bash_complete(["ispmailgate", "quarantine", "purge", "--o"]) == ["--older-than"]
    assert bash_complete(["ispmailgate", "quarantine", "list", "--verdict", "un"]) == ["unscannable", "unparsable"]
    assert bash_complete(["ispmailgate", "quarantine", "release", "--f"]) == ["--from", "--force"]


def test_bash_completes_the_clients_own_options_in_front_then_ispmailgates(tmp_path):
    (tmp_path / "rules.toml").write_text("")
    assert bash_complete(["ispmailgate-client", "--so"]) == ["--socket"]
    assert bash_complete(["ispmailgate-client", "--fallback", ""]) == ["oneshot", "tempfail"]
    assert bash_complete(["ispmailgate-client", "--socket", "ru"], tmp_path) == ["rules.toml"]
    assert bash_complete(["ispmailgate-client", "--socket", "s", "--fal"]) == ["--fallback"]
    assert bash_complete(["ispmailgate-client", "--socket", "s", "--dr"]) == ["--dry-run"]
    assert bash_complete(["ispmailgate-client", "-f", "a@b", "--so"]) == []     # only in front
    assert bash_complete(["ispmailgate-client", "-a", "loc"]) == [f"local{i}" for i in range(8)]
    assert bash_complete(["ispmailgate-client", ""]) == []                     # recipients, no commands
    assert bash_complete(["ispmailgate-client", "--", "-"]) == []


def test_fish_and_zsh_complete_the_client():
    process = subprocess.run(["fish", "--no-config", "-c", f"source {COMPLETIONS / 'ispmailgate-client.fish'}; "
                              "complete -C 'ispmailgate-client --fallback '"],
                             capture_output=True, text=True, timeout=60, check=True)
    assert [line.split("\t")[0] for line in process.stdout.splitlines()] == ["oneshot", "tempfail"]
    process = subprocess.run(["zsh", "-f", "-c", f"fpath=({COMPLETIONS} $fpath); autoload -U compinit; "
                              "compinit -u -D; print -r -- $_comps[ispmailgate-client]"],
                             capture_output=True, text=True, timeout=60, check=True)
    assert process.stdout.strip() == "_ispmailgate-client", process.stderr
    assert subprocess.run(["zsh", "-n", str(COMPLETIONS / "_ispmailgate-client")], timeout=60).returncode == 0


def test_fish_completes_commands_options_and_values():
    assert shutil.which("fish"), "fish is missing (package fish)"

    def complete(line: str) -> list[str]:
        process = subprocess.run(["fish", "--no-config", "-c",
                                  f"source {COMPLETIONS / 'ispmailgate.fish'}; complete -C {line!r}"],
                                 capture_output=True, text=True, timeout=60, check=True)
        assert process.stderr == "", process.stderr
        return [line.split("\t")[0] for line in process.stdout.splitlines()]

    assert complete("ispmailgate ") == sorted(command.name for command in generator().cli()[1])
    assert complete("ispmailgate serve --wo") == ["--workers"]
    assert complete("ispmailgate --dr") == ["--dry-run"]
    assert sorted(complete("ispmailgate check -")) == ["--client-user", "--config", "--config-only", "--help",
                                                       "-c", "-h"]
    assert "--stdout" not in complete("ispmailgate explain --")
    assert complete("ispmailgate -a loc") == [f"local{i}" for i in range(8)]


def test_zsh_completion_is_found_by_compinit():
    assert shutil.which("zsh"), "zsh is missing (package zsh)"
    process = subprocess.run(["zsh", "-f", "-c", f"fpath=({COMPLETIONS} $fpath); autoload -U compinit; "
                              "compinit -u -D; print -r -- $_comps[ispmailgate]"],
                             capture_output=True, text=True, timeout=60, check=True)
    assert process.stdout.strip() == "_ispmailgate", process.stderr
    assert subprocess.run(["zsh", "-n", str(COMPLETIONS / "_ispmailgate")], timeout=60).returncode == 0


@pytest.fixture
def kept_entry(tmp_path, monkeypatch):
    """A rule file in tmp_path whose keep/ holds one entry, and $PATH finding this ispmailgate:
    the id completions ask it for the ids."""
    from ispmailgate_filters.kept import keep

    from conftest import GATE

    root = 'mail_user = "root"\n' if os.geteuid() == 0 else ""
    (tmp_path / "rules.toml").write_text(f'{root}tmp_dir = "{tmp_path / "spool"}"\nlog_file = "{tmp_path / "log"}"\n')
    kept = keep(str(tmp_path / "spool" / "keep"), b"Subject: kept\n\nbody\n", run_id="0123456789",
                sender="a@example.org", recipients=("b@example.com",), kept_by="ispmailgate",
                action="delivered", verdict="unparsable")
    monkeypatch.setenv("PATH", f"{GATE.parent}:{os.environ['PATH']}")
    return kept.stem


def test_bash_and_fish_complete_the_ids_of_kept_messages(tmp_path, kept_entry):
    for command in ("show", "release", "delete"):
        assert bash_complete(["ispmailgate", "quarantine", command, "-c", "rules.toml", ""], tmp_path) == [kept_entry]
    assert bash_complete(["ispmailgate", "quarantine", "show", "--config", "rules.toml", "2"], tmp_path) == [kept_entry]
    assert bash_complete(["ispmailgate", "quarantine", "show", "-c", "rules.toml", "x"], tmp_path) == []
    assert bash_complete(["ispmailgate", "quarantine", "list", "-c", "rules.toml", ""], tmp_path) == []
    process = subprocess.run(["fish", "--no-config", "-c", f"source {COMPLETIONS / 'ispmailgate.fish'}; "
                              "complete -C 'ispmailgate quarantine release -c rules.toml '; "
                              "complete -C 'ispmailgate quarantine '"],
                             capture_output=True, text=True, timeout=60, check=True, cwd=tmp_path)
    assert [line.split("\t")[0] for line in process.stdout.splitlines()] == [
        kept_entry, "delete", "list", "purge", "release", "show"]


def test_zsh_completes_quarantine_commands_and_ids_at_the_keyboard(tmp_path, kept_entry):
    terminal = Terminal(["zsh", "-f", "-i"], tmp_path)      # $PATH as kept_entry set it
    try:
        terminal.type(f"fpath=({COMPLETIONS} $fpath); autoload -U compinit; compinit -u -D; "
                      "echo $((6 * 7))-ready\n", b"42-ready")
        terminal.type("ispmailgate quarantine rel\t", b"release ")
        terminal.type("-c rules.toml 2\t", kept_entry.encode())
        terminal.type("\x15ispmailgate quarantine purge --ol\t", b"--older-than")
    finally:
        terminal.close()


class Terminal:
    """An interactive shell on a pseudo-terminal, typed into as a person would."""

    def __init__(self, argv: list[str], cwd: Path) -> None:
        self.master, slave = pty.openpty()
        environment = {"PATH": os.environ["PATH"], "TERM": "dumb", "HOME": str(cwd), "PS1": "$ "}
        self.process = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, cwd=cwd,
                                        env=environment, start_new_session=True)
        os.close(slave)
        self.output = b""

    def type(self, text: str, until: bytes, timeout: float = 30) -> bytes:
        """Type ``text``; return what the terminal shows once ``until`` is on it."""
        start = len(self.output)
        os.write(self.master, text.encode())
        deadline = time.monotonic() + timeout
        shown = b""
        while until not in shown and time.monotonic() < deadline:
            ready, _, _ = select.select([self.master], [], [], 0.1)
            if ready:
                try:
                    self.output += os.read(self.master, 4096)
                except OSError:
                    break
            shown = self.shown(start)
        assert until in shown, shown
        return shown

    def shown(self, start: int) -> bytes:
        """The output without bells and terminal control sequences (zsh completes after a bell)."""
        return re.sub(rb"\x07|\x1b\[[0-9;?]*[A-Za-z]", b"", self.output[start:])

    def close(self) -> None:
        os.write(self.master, b"\x15exit\n")
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self.master)


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_tab_completes_in_an_interactive_shell(shell, tmp_path):
    assert shutil.which(shell), f"{shell} is missing (package {shell})"
    if shell == "bash":
        argv, setup = ["bash", "--norc", "--noprofile", "-i"], f"source {COMPLETIONS / 'ispmailgate.bash'}"
    else:
        argv = ["zsh", "-f", "-i"]
        setup = f"fpath=({COMPLETIONS} $fpath); autoload -U compinit; compinit -u -D"
    (tmp_path / "rules.toml").write_text("")
    terminal = Terminal(argv, tmp_path)
    try:
        terminal.type(setup + "; echo $((6 * 7))-ready\n", b"42-ready")    # not in the echoed line
        terminal.type("ispmailgate ex\t", b"explain ")
        terminal.type("\x15ispmailgate --dr\t", b"--dry-run")
        terminal.type("\x15ispmailgate explain --co\t", b"--config")
        terminal.type("\x15ispmailgate -c ru\t", b"rules.toml")
    finally:
        terminal.close()
