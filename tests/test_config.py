"""The rule file: routing, filter instances, and errors that name file, key and problem."""

from __future__ import annotations

import pytest

from conftest import CORPUS, run_gate, run_inline

SIMPLE = (CORPUS / "plain.eml").read_bytes()


def load(text: str, tmp_path):
    from ispmailgate_core import rules

    path = tmp_path / "rules.toml"
    path.write_text(text)
    return rules.load_config(path)


def routes(config, sender: str, *recipients: str) -> list[tuple[str, str]]:
    from ispmailgate_core import routing

    return [(r.rule, r.chain_label) for r in (routing.route(config, sender, x) for x in recipients)]


def test_first_matching_rule_decides(tmp_path):
    config = load("""
        default_filter = ["dummy"]
        [[recipients]]
        recipient = '@vip\\.example$'
        filters = ["gate_test_filters:Stamp"]
        [[recipients]]
        recipient = '[@.]example\\.com$'
        sender = '^boss@'
        filters = ["gate_test_filters:Upcase"]
        [[recipients]]
        recipient = '[@.]example\\.com$'
        filters = ["gate_test_filters:Stamp", "gate_test_filters:Upcase"]
    """, tmp_path)
    assert routes(config, "boss@corp", "a@vip.example", "b@example.com", "c@mail.example.com",
                  "d@elsewhere.org") == [
        ("recipients[0]", "stamp"), ("recipients[1]", "upcase"), ("recipients[1]", "upcase"),
        ("default", "dummy")]
    assert routes(config, "clerk@corp", "b@EXAMPLE.COM") == [("recipients[2]", "stamp,upcase")]


def test_empty_or_missing_patterns_match_everybody(tmp_path):
    config = load("""
        [[recipients]]
        recipient = ''
        filters = ["gate_test_filters:Stamp"]
    """, tmp_path)
    assert routes(config, "", "anyone@anywhere") == [("recipients[0]", "stamp")]


def test_named_filter_instances_and_plain_types(tmp_path):
    config = load("""
        default_filter = ["tag", "dummy"]
        [filter.tag]
        type = "gate_test_filters:Stamp"
        header = "X-Tag"
        value = "one"
    """, tmp_path)
    tag, dummy = config.default_chain
    assert (tag.title, tag.header, tag.value, dummy.title) == ("tag", "X-Tag", "one", "dummy")


def test_equal_steps_are_equal_whatever_their_names(tmp_path):
    config = load("""
        [filter.a]
        type = "gate_test_filters:Stamp"
        value = "v"
        [filter.b]
        type = "gate_test_filters:Stamp"
        value = "v"
        [filter.c]
        type = "gate_test_filters:Stamp"
        value = "other"
    """, tmp_path)
    a, b, c = (config.filters[x] for x in "abc")
    assert a == b and hash(a) == hash(b)
    assert a != c


def test_no_config_file_gives_the_built_in_default():
    from ispmailgate_core import rules

    config = rules.load_config(None)
    assert [f.name for f in config.default_chain] == ["dummy"]
    assert config.mail_host == "localhost:26" and config.loop_suffix == ".ispmailgate"


@pytest.mark.parametrize("text, path, message", [
    ("no_such_key = 1\n", "no_such_key", "unknown key"),
    ("mail_host = 26\n", "mail_host", "expected a string"),
    ("max_message_size = 'lots'\n", "max_message_size", "expected a size"),
    ("facility = 'kitchen'\n", "facility", "not a syslog facility"),
    ("sendmail_command = '/usr/sbin/sendmail -oi'\n", "sendmail_command", "non-empty list"),
    ("[[recipients]]\nrecipient = 'a'\nfilters = ['dummy']\n[[recipients]]\nrecipient = 'a'\n"
     "filters = ['dummy']\n[[recipients]]\nrecipient = '(unclosed'\nfilters = ['dummy']\n",
     "recipients[2].recipient", "bad regex"),
    ("[[recipients]]\nfilters = ['nonesuch']\n", "recipients[0].filters[0]", "unknown filter 'nonesuch'"),
    ("[[recipients]]\nrecipient = 'x'\n", "recipients[0].filters", "missing"),
    ("[[recipients]]\nfilters = ['dummy']\nrecipeint = 'x'\n", "recipients[0].recipeint", "unknown key"),
    ("[filter.x]\nvalue = 1\n", "filter.x.type", "missing"),
    ("[filter.x]\ntype = 'gate_test_filters:Stamp'\ncolour = 'red'\n", "filter.x.colour",
     "unknown option for filter type 'stamp'"),
    ("[filter.x]\ntype = 'gate_test_filters:Stamp'\nvalue = 3\n", "filter.x.value", "expected a string"),
    ("[filter.x]\ntype = 'gate_test_filters:Judge'\nverdict = 'maybe'\n", "filter.x.verdict", "expected one of"),
])
def test_config_errors_name_file_key_and_problem(tmp_path, text, path, message):
    from ispmailgate_filters.base import ConfigError

    with pytest.raises(ConfigError) as caught:
        load(text, tmp_path)
    assert caught.value.path == path
    assert str(caught.value).startswith(f"{tmp_path / 'rules.toml'}: {path}: ")
    assert message in caught.value.message


def test_a_bad_config_is_a_tempfail_naming_the_problem(tmp_path, config_file):
    config = config_file("[[recipients]]\nrecipient = '(oops'\nfilters = ['dummy']\n")
    run = run_gate(["-c", str(config), "-f", "a@b.example", "c@d.example"], SIMPLE)
    assert run.code == 75
    assert run.first_line.startswith("4.3.5 config error:")
    assert "recipients[0].recipient" in run.first_line and str(config) in run.first_line
    assert "bad regex" in run.first_line


def test_toml_syntax_error_and_missing_file_are_tempfails(tmp_path):
    broken = tmp_path / "broken.toml"
    broken.write_text("tmp_dir = \n")
    for path, words in ((broken, "TOML syntax"), (tmp_path / "absent.toml", "cannot read")):
        run = run_gate(["-c", str(path), "-f", "a@b.example", "c@d.example"], SIMPLE)
        assert run.code == 75 and words in run.first_line, run.stderr


def test_config_from_the_environment(config_file, smtp_sink):
    config = config_file(f'mail_host = "{smtp_sink.address}"\n')
    run = run_gate(["-f", "a@b.example", "c@d.example"], SIMPLE, env={"ISPMAILGATE_CONFIG": str(config)})
    assert run.code == 0, run.stderr
    assert len(smtp_sink.messages) == 1


@pytest.mark.parametrize("registered", ["ispmailgate_filters", "ispmailgate.filters"])
def test_filters_from_entry_points_are_found_under_the_group_and_its_old_name(tmp_path, monkeypatch, registered):
    import importlib.metadata

    from ispmailgate_core import rules

    class Point:
        value = "gate_test_filters:Stamp"

    def entry_points(group=None, name=None):
        return [Point()] if (group, name) == (registered, "thirdparty") else []

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    config = rules.build_config({"default_filter": ["thirdparty"]}, "test")
    assert config.default_chain[0].name == "stamp"


def test_mail_host_forms():
    from ispmailgate_core import addresses

    assert addresses.parse_hop("localhost:26") == ("localhost", 26)
    assert addresses.parse_hop("mx.example") == ("mx.example", 25)
    assert addresses.parse_hop("[::1]:2525") == ("::1", 2525)
    assert addresses.parse_hop("::1") == ("::1", 25)
    for bad in ("", "host:port", "host:99999", "[::1]:x"):
        with pytest.raises(ValueError):
            addresses.parse_hop(bad)


def test_mail_host_option_overrides_sendmail_command(config_file, smtp_sink, recorder):
    script, calls = recorder(0)
    config = config_file(f'sendmail_command = ["{script}"]\n')
    run = run_inline(["-c", str(config), "--mail-host", smtp_sink.address, "-f", "a@b.example",
                      "c@d.example"], SIMPLE)
    assert run.code == 0
    assert len(smtp_sink.messages) == 1 and not calls.exists()


def test_external_senders_without_a_lookahead(tmp_path):
    config = load("""
        internal_domains = ["example.com", "Example.NET."]
        [[recipients]]
        sender_is = "external"
        recipient_is = "internal"
        filters = ["gate_test_filters:Stamp"]
    """, tmp_path)
    assert routes(config, "boss@example.com", "a@example.com") == [("default", "dummy")]
    assert routes(config, "boss@mail.example.net", "a@example.com") == [("default", "dummy")]
    assert routes(config, "spam@elsewhere.org", "a@sub.example.com", "b@elsewhere.org") == [
        ("recipients[0]", "stamp"), ("default", "dummy")]
    assert routes(config, "", "a@example.com") == [("recipients[0]", "stamp")]   # bounces are external
    assert routes(config, "x@notexample.com", "a@example.com") == [("recipients[0]", "stamp")]


def test_negated_patterns(tmp_path):
    config = load("""
        [[recipients]]
        recipient = '@example\\.com$'
        recipient_not = '^(postmaster|abuse)@'
        sender_not = '@partner\\.example$'
        filters = ["gate_test_filters:Stamp"]
    """, tmp_path)
    assert routes(config, "x@y.org", "a@example.com", "abuse@example.com") == [
        ("recipients[0]", "stamp"), ("default", "dummy")]
    assert routes(config, "x@partner.example", "a@example.com") == [("default", "dummy")]


@pytest.mark.parametrize("text, path, message", [
    ("[[recipients]]\nsender_is = 'external'\nfilters = ['dummy']\n", "recipients[0].sender_is",
     "needs internal_domains"),
    ("internal_domains = ['a.example']\n[[recipients]]\nsender_is = 'outside'\nfilters = ['dummy']\n",
     "recipients[0].sender_is", "expected internal or external"),
    ("internal_domains = 'a.example'\n", "internal_domains", "expected a list of domain names"),
    ("[[recipients]]\nsender_not = '(['\nfilters = ['dummy']\n", "recipients[0].sender_not", "bad regex"),
])
def test_rule_key_errors(tmp_path, text, path, message):
    from ispmailgate_filters.base import ConfigError

    with pytest.raises(ConfigError) as caught:
        load(text, tmp_path)
    assert caught.value.path == path and message in caught.value.message
