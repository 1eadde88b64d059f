"""Started as root, the rule file and what it names must be root's alone (issue 14, class 8).

The review: a rule file owned by ``nobody`` with mode 0664 was accepted by a root run, and
``mail_user = "root"`` with a ``sendmail_command`` in it ran a command as uid 0.  As
Postfix and sendmail check their own configuration, the file and every directory above it
must be owned by root and not writable by group or others (a sticky directory of root's,
like /tmp, is fine: nobody else can rename what root owns in it); so must the commands it
runs and the secret files it names.  Otherwise the run refuses with 75 and says why, and
``check`` says the same.
"""

from __future__ import annotations

import os
import pwd

import pytest

from conftest import recorded_calls, run_gate

SIMPLE = b"From: a@example.org\nTo: b@example.net\nSubject: trust\n\nbody\n"
NOBODY = pwd.getpwnam("nobody").pw_uid

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (CI runs as root)")


def refused(config, words: str) -> None:
    run = run_gate(["-c", str(config), "-f", "a@b.example", "c@d.example"], SIMPLE)
    assert run.code == 75, run.stderr
    assert run.first_line.startswith("4.3.5 config error: ") and words in run.first_line, run.first_line
    check = run_gate(["check", "-c", str(config)], b"")
    assert check.code == 78 and words in check.stdout.decode()


def test_the_reviews_rule_file_runs_nothing_as_root(config_file, recorder):
    script, calls = recorder(0)
    config = config_file(f'mail_user = "root"\nsendmail_command = ["{script}"]\n')
    os.chown(config, NOBODY, -1)
    config.chmod(0o664)
    refused(config, f"{config} is owned by uid {NOBODY}, not by root")
    assert recorded_calls(calls) == []


@pytest.mark.parametrize("mode", [0o664, 0o646, 0o666])
def test_a_rule_file_others_can_write_is_refused(config_file, mode):
    config = config_file()
    config.chmod(mode)
    refused(config, "is writable by group or others (chmod go-w")


def test_a_directory_above_that_someone_else_owns_is_refused(config_file, tmp_path):
    folder = tmp_path / "etc"
    folder.mkdir()
    config = config_file(name="etc/rules.toml")
    os.chown(folder, NOBODY, -1)
    refused(config, f"{folder} is owned by uid {NOBODY}, not by root")


def test_a_group_writable_directory_above_is_refused_a_sticky_one_of_roots_is_not(config_file, tmp_path):
    folder = tmp_path / "etc"
    folder.mkdir()
    config = config_file(name="etc/rules.toml")
    folder.chmod(0o775)
    refused(config, f"{folder} is writable by group or others")
    folder.chmod(0o1777)        # like /tmp: nobody else can rename what root owns in it
    run = run_gate(["-c", str(config), "--stdout", "-f", "a@b.example", "c@d.example"], SIMPLE)
    assert run.code == 0, run.stderr


def test_root_mail_0640_is_fine(config_file):
    import grp

    config = config_file()
    os.chown(config, 0, grp.getgrnam("mail").gr_gid)
    config.chmod(0o640)
    run = run_gate(["-c", str(config), "--stdout", "-f", "a@b.example", "c@d.example"], SIMPLE)
    assert run.code == 0, run.stderr


def test_a_symlinked_rule_file_is_judged_by_where_it_leads(config_file, tmp_path):
    target = config_file(name="real.toml")
    other = tmp_path / "theirs"
    other.mkdir()
    os.chown(other, NOBODY, -1)
    moved = other / "real.toml"
    target.rename(moved)
    link = tmp_path / "rules.toml"
    link.symlink_to(moved)
    refused(link, f"{other} is owned by uid {NOBODY}, not by root")


def test_an_untrusted_rule_file_has_none_of_its_filters_imported(config_file):
    config = config_file('default_filter = ["no_such_module_here:Filter"]\n')
    config.chmod(0o666)
    refused(config, "writable by group or others")
    run = run_gate(["-c", str(config), "-f", "a@b.example", "c@d.example"], SIMPLE)
    assert "no_such_module_here" not in run.stderr


# -- what the rule file names --------------------------------------------------------------------

def test_a_sendmail_command_someone_else_can_change_is_refused(config_file, recorder):
    script, calls = recorder(0)
    config = config_file(f'sendmail_command = ["{script}"]\n')
    script.chmod(0o777)
    refused(config, "sendmail_command[0]: ")
    os.chown(script, NOBODY, -1)
    script.chmod(0o755)
    refused(config, f"{script} is owned by uid {NOBODY}")
    assert recorded_calls(calls) == []


def test_a_command_in_a_directory_others_can_write_is_refused(config_file, tmp_path, recorder):
    script, _ = recorder(0)
    shared = tmp_path / "bin"
    shared.mkdir()
    moved = shared / "pack"
    script.rename(moved)
    shared.chmod(0o777)
    config = config_file(f'[filter.z]\ntype = "packer"\ncodec = "zz"\ncommand_pos = ["{moved}"]\n'
                         f'command_neg = ["/bin/cat"]\n[[recipients]]\nfilters = ["z"]\n')
    refused(config, f"filter.z.command_pos[0]: {shared} is writable by group or others")


@pytest.mark.parametrize("option", ["command", "sevenzip"])
def test_virscan_commands_are_checked(config_file, recorder, option):
    script, _ = recorder(0)
    os.chown(script, NOBODY, -1)
    line = (f'scanner = "command"\ncommand = ["{script}", "{{paths}}"]\n' if option == "command"
            else f'sevenzip = "{script}"\n')
    config = config_file(f'[filter.v]\ntype = "virscan"\n{line}[[recipients]]\nfilters = ["v"]\n')
    refused(config, f"filter.v.{option}{'[0]' if option == 'command' else ''}: {script} is owned by uid")


def test_a_passphrase_file_someone_else_can_change_is_refused(config_file, tmp_path):
    secrets = tmp_path / "passphrases.toml"
    secrets.write_text('"ABCD" = "x"\n')
    secrets.chmod(0o620)
    home = tmp_path / "gnupg"
    home.mkdir(mode=0o700)
    config = config_file(f'[filter.g]\ntype = "pgp"\ndirection = "neg"\ngnupghome = "{home}"\n'
                         f'passphrase_file = "{secrets}"\n[[recipients]]\nfilters = ["g"]\n')
    refused(config, f"filter.g.passphrase_file: {secrets} is writable by group or others")


def test_an_arc_key_someone_else_owns_is_refused(config_file, tmp_path):
    key = tmp_path / "arc.pem"
    key.write_text("-----BEGIN PRIVATE KEY-----\nMII\n-----END PRIVATE KEY-----\n")
    key.chmod(0o600)
    os.chown(key, NOBODY, -1)
    config = config_file(f'[arc]\ndomain = "gw.example"\nselector = "s"\nauthserv_id = "mx"\n'
                         f'private_key_file = "{key}"\n')
    refused(config, f"arc.private_key_file: {key} is owned by uid {NOBODY}")
