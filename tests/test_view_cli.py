"""``astaire view`` prints the table, the summary and views.jsonl-shaped JSON."""
import json
import subprocess

from astaire.cluster.view import ClusterView
from astaire.demo.run import CLI

A, B, C = "10.0.0.1:11211", "10.0.0.2:11211", "10.0.0.3:11211"


def astaire(*args):
    return subprocess.run([*CLI, *args], capture_output=True, text=True)


def test_view_json_matches_the_library():
    r = astaire("view", "--servers", f"{A},{B}", "--new-servers", f"{A},{B},{C}", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    view = ClusterView([A, B], [A, B, C])
    assert doc["current"] == view.current and doc["new"] == view.new
    assert doc["read"] == view.read and doc["write"] == view.write


def test_view_table_shows_moves_and_summary():
    r = astaire("view", "--servers", f"{A},{B}", "--new-servers", f"{A},{B},{C}")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[0] == "vbucket"
    assert len([l for l in lines if l.rstrip().endswith("yes")]) == 84
    assert any(l.split() == [C, "84", "0"] for l in lines)


def test_view_from_cluster_settings_file(tmp_path):
    f = tmp_path / "cluster_settings"
    f.write_text(f"servers={A},{B}\nnew_servers={A},{B},{C}\n")
    r = astaire("view", "--cluster-settings-file", str(f), "--json")
    assert json.loads(r.stdout)["new"] == ClusterView([A, B], [A, B, C]).new


def test_broken_cluster_settings_file_exits_3_naming_the_line(tmp_path):
    f = tmp_path / "cluster_settings"
    f.write_text("servers=a:1\nfoo=bar\n")
    r = astaire("view", "--cluster-settings-file", str(f))
    assert r.returncode == 3
    assert f"{f}:2: unknown key 'foo'" in r.stderr


def test_bad_vbuckets_is_a_usage_error():
    r = astaire("view", "--servers", A, "--vbuckets", "100")
    assert r.returncode == 2 and "power of two" in r.stderr


def test_help_explains():
    r = astaire("view", "--help")
    assert r.returncode == 0 and "--new-servers" in r.stdout and "resize" in r.stdout
