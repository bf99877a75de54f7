"""ASTAIRE-MIB: it compiles with pysmi offline, the agent's OIDs agree with it, and net-snmp
can load it with the shipped SMI stubs."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from astaire.snmp import mib


def test_the_mib_compiles_offline_and_the_agent_agrees_with_it():
    compiled = mib.compile_mib()
    assert compiled["astaire"]["oid"] == "1.2.826.0.1.1578918.9.9"
    assert mib.check_against_mib(compiled) == []
    # Index structure as docs/compatibility.md spells it ("Statistics").
    def index(entry):
        return [i["object"] for i in compiled[entry]["indices"]]
    assert index("astaireBandwidthEntry") == ["astaireBandwidthScope"]
    assert index("astaireConnectionEntry") == ["astaireConnectionAddressType", "astaireConnectionAddress",
                                               "astaireConnectionPort"]
    assert index("astaireConnectionBucketEntry")[-1] == "astaireConnectionBucketId"
    assert index("astaireConnectionBucketBandwidthEntry")[-2:] == ["astaireConnectionBucketBandwidthBucketId",
                                                                   "astaireConnectionBucketBandwidthScope"]
    assert all(not i["implied"] for e in ("astaireConnectionEntry",) for i in compiled[e]["indices"])


def test_a_drifted_agent_would_be_caught():
    compiled = mib.compile_mib()
    compiled["astaireBucketsResynchronized"]["oid"] = "1.2.826.0.1.1578918.9.9.12"
    del compiled["astaireConnectionBucketBandwidth"]
    problems = mib.check_against_mib(compiled)
    assert any("astaireBucketsResynchronized" in p for p in problems)
    assert any("astaireConnectionBucketBandwidth is not in" in p for p in problems)


@pytest.mark.skipif(shutil.which("snmptranslate") is None, reason="net-snmp tools not installed")
def test_net_snmp_loads_the_mib_with_the_shipped_stubs(tmp_path):
    from tests.snmp_helpers import snmp_env

    r = subprocess.run(["snmptranslate", "-m", "ASTAIRE-MIB", "-On", "ASTAIRE-MIB::astaireBucketsNeedingResync.0"],
                       capture_output=True, text=True, env=snmp_env(tmp_path))
    assert r.stdout.strip() == ".1.2.826.0.1.1578918.9.9.1.0", r.stderr
