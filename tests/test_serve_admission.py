"""Which requests a server runs for whom (attack finding 8): never a rule file or an option
that gives a client more than the one-shot ispmailgate gives that same user."""

from __future__ import annotations

import pwd
import subprocess

import pytest

from conftest import CORPUS
from support.prepared import e2e_gate
from support.serving import Server, client_env, drain, shared_folder
from support.serving import python, sink  # noqa: F401  (fixtures)

SIMPLE = (CORPUS / "plain.eml").read_bytes()
ENVELOPE = ["-f", "a@b.example", "c@d.example"]


# -- the command line as the server reads it ----------------------------------------------------

def test_the_scan_reads_options_as_the_one_shot_parser_does():
    from ispmailgate_core.serve.admission import scan

    assert scan(["-df", "s@x", "r@y"]) == (["-d", "-f"], {"-f": "s@x"}, ["r@y"])
    assert scan(["-fs@x", "--config=/r.toml", "r@y"]).values == {"-f": "s@x", "-c": "/r.toml"}
    assert scan(["--mail-host", "h:25", "--", "--stdout"]) == (["--mail-host"], {"-m": "h:25"}, ["--stdout"])
    assert scan(["-c", "a.toml", "-c", "b.toml"]).values["-c"] == "b.toml"      # the last one wins
    assert scan(["-f", "--stdout"]).options == ["-f"]          # a value, whatever it looks like


@pytest.fixture
def settings():
    from ispmailgate_core.serve.section import settings_of

    return settings_of({})


@pytest.mark.parametrize("argv, declined", [
    (ENVELOPE, ""),
    (["-d", "-c", "/srv.toml", *ENVELOPE], ""),
    (["--help"], ""),
    (["--stdout", *ENVELOPE], "--stdout: for root and mail_user only"),
    (["-fa@b", "-m", "evil:25", "c@d"], "-m: for root and mail_user only"),
    (["--tmp-dir=/home/u", *ENVELOPE], "--tmp-dir: for root and mail_user only"),
    (["--dry-run", *ENVELOPE], "--dry-run: for root and mail_user only"),
    ([], "shell test mode writes the result to stdout"),
    (["check"], "'check' is for root and mail_user"),
    (["explain", *ENVELOPE], "'explain' is for root and mail_user"),
])
def test_a_user_other_than_root_and_mail_user_may_only_hand_in_mail(settings, argv, declined):
    from ispmailgate_core.serve.admission import decline_reason

    reason = decline_reason(argv, 1000, 65534, None, settings)
    assert declined in reason and bool(reason) == bool(declined), reason
    assert decline_reason(argv, 0, 65534, None, settings) == ""           # root
    assert decline_reason(argv, 65534, 65534, None, settings) == ""       # mail_user
    assert decline_reason(argv, 1000, 65534, None, settings.with_overrides(client_options="any")) == ""


def test_another_rule_file_runs_only_if_root_alone_can_change_it(settings, tmp_path):
    from ispmailgate_core.serve.admission import decline_reason

    folder = shared_folder()
    theirs = folder / "rules.toml"
    theirs.write_text('sendmail_command = ["/bin/sh", "-c", "id > /tmp/owned"]\n')
    ours = tmp_path / "server.toml"
    ours.write_text("")
    argv = ["-c", str(theirs), *ENVELOPE]
    assert "is writable by group or others" in decline_reason(argv, 1000, 65534, str(ours), settings)
    assert "is writable by group or others" in decline_reason(argv, 0, 65534, str(ours), settings)
    assert decline_reason(argv, 65534, 65534, str(ours), settings) == ""      # mail_user's own choice
    folder.chmod(0o755)
    assert decline_reason(argv, 1000, 65534, str(ours), settings) == ""        # root's alone
    closed = settings.with_overrides(other_rule_files=False)
    assert "is not the server's (serve.other_rule_files = false)" in \
        decline_reason(argv, 65534, 65534, str(ours), closed)
    assert decline_reason(["-c", str(ours), *ENVELOPE], 1000, 65534, str(ours), closed) == ""


# -- served: a user who is neither root nor mail_user --------------------------------------------

@pytest.fixture(scope="module")
def server(python, sink):
    with Server(python, f'mail_host = "{sink.address}"\nloop_suffix = ""\n'
                        "[serve]\nworkers = 1\nsocket_mode = \"0666\"\n") as server:
        yield server


def as_daemon(server: Server, args: list[str], cwd=None) -> subprocess.CompletedProcess:
    daemon = pwd.getpwnam("daemon")
    client = e2e_gate().parent / "ispmailgate-client"      # a client the user daemon can run
    return subprocess.run([str(client), "--socket", str(server.socket), "--fallback", "tempfail", *args],
                          input=SIMPLE, capture_output=True, env=client_env(), timeout=60, cwd=cwd,
                          user=daemon.pw_uid, group=daemon.pw_gid, extra_groups=[])


def test_mail_handed_in_by_another_user_is_delivered(server, sink):
    drain(sink)
    run = as_daemon(server, ["-c", str(server.config), *ENVELOPE])
    assert run.returncode == 0, run.stderr
    assert [m.rcpt_tos for m in drain(sink)] == [["c@d.example"]]


def test_stdout_is_declined_for_another_user_who_falls_back_to_its_own_rights(server, sink):
    drain(sink)
    run = as_daemon(server, ["-c", str(server.config), "--stdout", *ENVELOPE])
    assert run.returncode == 75         # the fallback (tempfail here): not run by the server
    assert "does not run this request: --stdout: for root and mail_user only" in \
        (server.folder / "gate.log").read_text() + run.stderr.decode()
    assert run.stdout == b"" and drain(sink) == []
    assert "declined for pid=" in server.log() and "--stdout" in server.log()


def test_a_rule_file_of_the_clients_choice_is_never_run_by_the_server(server, sink):
    folder = shared_folder()
    proof = folder / "ran"
    theirs = folder / "rules.toml"
    theirs.write_text(f'sendmail_command = ["/bin/sh", "-c", "id > {proof}"]\n')
    theirs.chmod(0o666)
    run = as_daemon(server, ["-c", str(theirs), *ENVELOPE])
    assert run.returncode == 75
    assert not proof.exists()
    assert "declined for pid=" in server.log() and f"the rule file {theirs}" in server.log()
