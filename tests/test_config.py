"""cluster_settings and node config readers follow docs/compatibility.md's rules; errors name file and line."""
import pytest

from astaire.cluster.nodeconfig import local_name_from_config, parse_node_config, read_node_config
from astaire.cluster.settings import (ConfigError, parse_cluster_settings, parse_server, read_cluster_settings,
                                      settings_digest)


def test_servers_and_new_servers_with_comments_blank_lines_and_whitespace():
    s = parse_cluster_settings("# comment\n\n  servers=10.0.0.1:11211, 10.0.0.2:11211 \nnew_servers=10.0.0.1:11211,,10.0.0.3:11211,\n")
    assert s.servers == ["10.0.0.1:11211", "10.0.0.2:11211"]
    assert s.new_servers == ["10.0.0.1:11211", "10.0.0.3:11211"]
    assert s.resizing


def test_servers_line_is_required():
    with pytest.raises(ConfigError, match=r"f\.txt: no 'servers' line"):
        parse_cluster_settings("new_servers=10.0.0.1:11211\n", "f.txt")


def test_more_than_one_equals_is_an_error_naming_the_line():
    with pytest.raises(ConfigError, match=r"f:2: more than one '='"):
        parse_cluster_settings("servers=a:1\nnew_servers=b:1=c:1\n", "f")


def test_unknown_key_is_an_error():
    with pytest.raises(ConfigError, match=r"f:1: unknown key 'server'"):
        parse_cluster_settings("server=a:1\n", "f")


def test_line_without_equals_is_a_key_with_empty_value():
    assert parse_cluster_settings("servers\n").servers == []
    with pytest.raises(ConfigError, match="unknown key 'bogus'"):
        parse_cluster_settings("servers=a:1\nbogus\n")


def test_malformed_entry_is_an_error():
    with pytest.raises(ConfigError, match=r"f:1: servers: 'a' is not HOST:PORT"):
        parse_cluster_settings("servers=a\n", "f")


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read cluster settings"):
        read_cluster_settings(str(tmp_path / "nope"))


def test_digest_changes_with_content(tmp_path):
    p = tmp_path / "cs"
    p.write_text("servers=a:1\n")
    d1 = settings_digest(str(p))
    p.write_text("servers=a:1\nnew_servers=a:1,b:1\n")
    assert settings_digest(str(p)) != d1 and len(d1) == 64
    assert settings_digest(str(tmp_path / "missing")) == ""


@pytest.mark.parametrize("name,expected", [
    ("10.0.0.1:11211", ("10.0.0.1", 11211)),
    ("[::1]:11211", ("::1", 11211)),
    ("host.example:1", ("host.example", 1)),
])
def test_parse_server(name, expected):
    assert parse_server(name) == expected


@pytest.mark.parametrize("name", ["a", "a:", ":1", "a:0", "a:70000", "::1:11211", "[::1:11211", "a:b"])
def test_parse_server_rejects(name):
    with pytest.raises(ValueError):
        parse_server(name)


def test_node_config_is_parsed_not_executed(tmp_path):
    marker = tmp_path / "executed"
    text = (f"# clearwater config\nlocal_ip=10.0.0.7\nlog_level='4'\n"
            f"export astaire_cpu_limit_percentage=\"12\"  # trailing comment\n"
            f"snmp_ip=$(touch {marker})\nnot an assignment\n")
    cfg = parse_node_config(text)
    assert cfg["local_ip"] == "10.0.0.7"
    assert cfg["log_level"] == "4"
    assert cfg["astaire_cpu_limit_percentage"] == "12"
    assert cfg["snmp_ip"] == f"$(touch {marker})"
    assert not marker.exists()
    assert local_name_from_config(cfg) == "10.0.0.7:11211"


def test_missing_node_config_is_empty(tmp_path):
    assert read_node_config(str(tmp_path / "missing")) == {}


def test_ipv6_local_ip_is_bracketed():
    assert local_name_from_config({"local_ip": "::1"}) == "[::1]:11211"
    assert local_name_from_config({}) is None
