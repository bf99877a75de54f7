"""The README's main job, `astaire demo`, runs end to end and reports a correct resize."""
import json
import subprocess

from astaire.demo.run import CLI


def test_demo_resizes_2_to_3_and_every_record_ends_where_the_view_says():
    r = subprocess.run([*CLI, "demo", "--records", "3000", "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["last_resync"] == "ok" and report["failed_vbuckets"] == []
    assert report["placement_ok"] and report["missing"] == report["wrong"] == report["misplaced"] == 0
    # Every vbucket the new node gains comes from both old replicas.
    assert report["records_streamed"] == 2 * report["records_for_new_node"] > 0
    assert report["records_checked"] == 2 * 3000 + report["records_for_new_node"]


def test_demo_rejects_impossible_sizes():
    r = subprocess.run([*CLI, "demo", "--records", "0"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--records must be at least 1" in r.stderr
