"""astaire-snmp without a healthy daemon, against bad or hostile managers, over v1 and v3,
and the INFORM retries. The statistics come from a StatsWriter in this test process."""
from __future__ import annotations

import os
import random
import socket
import time
from unittest import mock

import pytest

from astaire.stats import Connection, StatsWriter
from tests.snmp_helpers import SCALARS, A, NetSnmp, needs_netsnmp, wait_until

pytestmark = needs_netsnmp

NEEDING = f"{A}.1.0"


@pytest.fixture
def stats_file(tmp_path):
    """A statistics file published by this (live) process: a resync with one connection."""
    w = StatsWriter(str(tmp_path / "astaire.stats"), 128, 4)
    w.state = 1
    w.buckets_needing, w.buckets_resynchronized, w.entries, w.bytes = 42, 7, 1000, 5 * 2 ** 32
    c = Connection("10.1.2.3", 11211, [3, 5, 8], resynced=1)
    c.entries.update({3: 10, 5: 20}), c.bytes.update({3: 1000, 5: 2000})
    w.connections["s1"] = c
    w.connections["s2"] = Connection("memcached-7.example.com", 11311, [9])
    w.publish()
    yield w
    w.close()


def test_no_daemon_means_no_such_instance_and_the_log_says_why(snmp_agents, tmp_path):
    agent = snmp_agents("--pidfile", str(tmp_path / "nothing" / "astaire.pid"), "--config", os.devnull)
    snmp = NetSnmp(tmp_path, agent.port)
    got = snmp.values("snmpget", *SCALARS)
    assert set(got.values()) == {"No Such Instance currently exists at this OID"}
    assert snmp.values("snmpbulkwalk", A) == {}  # no rows at all, no reassuring 0
    assert "noSuchInstance" in agent.log() and "no statistics file" in agent.log()


def test_a_stale_statistics_file_means_no_such_instance(snmp_agents, tmp_path, stats_file):
    with mock.patch("astaire.stats.time.time", return_value=time.time() - 60):
        stats_file.publish()  # a heartbeat a minute old: the daemon is hung
    agent = snmp_agents("--stats-file", stats_file.path, "--config", os.devnull)
    snmp = NetSnmp(tmp_path, agent.port)
    assert snmp.values("snmpget", NEEDING)[NEEDING] == "No Such Instance currently exists at this OID"
    assert "is stale: last heartbeat" in agent.log()
    stats_file.publish()  # fresh again
    assert snmp.values("snmpget", NEEDING)[NEEDING] == "42"
    assert "statistics available" in agent.log()


def test_daemon_stopping_turns_values_into_no_such_instance(snmp_agents, tmp_path, stats_file):
    agent = snmp_agents("--stats-file", stats_file.path, "--config", os.devnull)
    snmp = NetSnmp(tmp_path, agent.port)
    assert snmp.values("snmpget", NEEDING)[NEEDING] == "42"
    stats_file.close(remove=False)  # a clean stop leaves the file in state "stopped"
    assert snmp.values("snmpget", NEEDING)[NEEDING] == "No Such Instance currently exists at this OID"
    assert "has stopped" in agent.log()


def test_tables_v1_getbulk_and_clamping(snmp_agents, tmp_path, stats_file):
    agent = snmp_agents("--stats-file", stats_file.path, "--config", os.devnull)
    snmp = NetSnmp(tmp_path, agent.port)
    walk = snmp.values("snmpbulkwalk", A, opts=("-Cr3",))
    assert walk[f"{A}.4.0"] == str(2 ** 32 - 1)  # 5 GiB stays at 2^32-1
    ip = "1.4.10.1.2.3.11211"
    name = "16.23." + ".".join(str(b) for b in b"memcached-7.example.com") + ".11311"
    assert walk[f"{A}.6.1.4.{ip}"] == "3" and walk[f"{A}.6.1.5.{ip}"] == "1"
    assert walk[f"{A}.6.1.4.{name}"] == "1"
    assert walk[f"{A}.7.1.5.{ip}.5"] == "20" and walk[f"{A}.7.1.6.{ip}.5"] == "2000"
    assert walk[f"{A}.7.1.5.{ip}.8"] == "0" and f"{A}.8.1.6.{ip}.8.1" in walk
    assert len(walk) == 4 + 1 + 2 * 2 + 4 * 2 + 4
    v1 = snmp.values("snmpwalk", A, version="1")
    assert v1 == walk or set(v1) == set(walk)  # v1 sees the same instances (all 32-bit)
    assert snmp.values("snmpget", f"{A}.1.5", version="2c")[f"{A}.1.5"].startswith("No Such Instance")
    assert snmp.values("snmpget", f"{A}.99.0")[f"{A}.99.0"].startswith("No Such Object")
    r = snmp.cmd("snmpget", f"{A}.99.0", version="1", check=False)
    assert "noSuchName" in r.stdout + r.stderr
    # GETBULK with a non-repeater and large repetitions
    r = snmp.cmd("snmpbulkget", A, f"{A}.5", opts=("-On", "-Cn1", "-Cr50"))
    lines = r.stdout.splitlines()
    assert lines[0].startswith(f".{A}.1.0 ") and lines[1].startswith(f".{A}.5.1.2.1 ")


def test_set_is_refused_and_wrong_community_gets_no_answer(snmp_agents, tmp_path, stats_file):
    agent = snmp_agents("--stats-file", stats_file.path, "--config", os.devnull)
    snmp = NetSnmp(tmp_path, agent.port)
    r = snmp.cmd("snmpset", NEEDING, "u", "0", check=False)
    assert r.returncode != 0 and "notWritable" in r.stdout + r.stderr
    assert snmp.values("snmpget", NEEDING)[NEEDING] == "42"
    t0 = time.monotonic()
    r = snmp.cmd("snmpget", NEEDING, community="public", timeout=0.5, retries=1, check=False)
    assert r.returncode != 0 and "Timeout" in r.stdout + r.stderr, r.stdout
    assert time.monotonic() - t0 >= 0.9  # no answer at all, not an error answer


def test_garbage_and_oversized_datagrams_neither_crash_nor_stall_the_agent(snmp_agents, tmp_path, stats_file):
    agent = snmp_agents("--stats-file", stats_file.path, "--config", os.devnull)
    snmp = NetSnmp(tmp_path, agent.port)
    rng = random.Random(9)
    # A valid GET to mutate: garbage that gets past the outer BER layers too.
    valid = bytes.fromhex("3029020101040a636c6561727761746572a01802047b0000000201000201003010300e060a2a863a0001e0"
                          "b62609090100 0500".replace(" ", ""))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for i in range(1000):
            kind = i % 4
            if kind == 0:
                data = rng.randbytes(rng.randrange(1, 200))
            elif kind == 1:
                data = bytearray(valid)
                for _ in range(rng.randrange(1, 4)):
                    data[rng.randrange(len(data))] = rng.randrange(256)
                data = bytes(data)
            elif kind == 2:
                data = valid[:rng.randrange(1, len(valid))]
            else:
                data = b"\x30\x84\x7f\xff\xff\xff" + rng.randbytes(rng.choice([100, 8000, 60000]))
            s.sendto(data, ("127.0.0.1", agent.port))
    t0 = time.monotonic()
    assert snmp.values("snmpget", NEEDING, timeout=2, retries=3)[NEEDING] == "42"
    assert time.monotonic() - t0 < 5
    assert agent.proc.poll() is None


def test_snmpv3_authpriv_sha_aes(snmp_agents, tmp_path, stats_file):
    agent = snmp_agents("--stats-file", stats_file.path, "--config", os.devnull,
                        "--v3-user", "orchestrator", "--v3-auth-key", "auth-pass-1", "--v3-priv-key", "priv-pass-1")
    snmp = NetSnmp(tmp_path, agent.port)
    v3 = ("-l", "authPriv", "-u", "orchestrator", "-a", "SHA", "-A", "auth-pass-1", "-x", "AES", "-X", "priv-pass-1")
    r = snmp.cmd("snmpget", NEEDING, version="3", opts=("-On", "-Oq", *v3))
    assert r.stdout.strip() == f".{NEEDING} 42"
    bad = ("-l", "authPriv", "-u", "orchestrator", "-a", "SHA", "-A", "wrong-pass-1", "-x", "AES", "-X", "priv-pass-1")
    r = snmp.cmd("snmpget", NEEDING, version="3", opts=("-On", "-Oq", *bad), check=False)
    assert r.returncode != 0 and "42" not in r.stdout
    r = snmp.cmd("snmpget", NEEDING, version="3", check=False, opts=("-l", "noAuthNoPriv", "-u", "orchestrator"))
    assert r.returncode != 0 and "42" not in r.stdout
    assert snmp.values("snmpget", NEEDING)[NEEDING] == "42"  # v2c still answers


def test_informs_are_retried_until_acknowledged(snmp_agents, trapd, tmp_path, stats_file):
    """Nobody answers at first: the raise is repeated; then snmptrapd starts on that port and acknowledges."""
    catcher = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    catcher.bind(("127.0.0.1", 0))
    port = catcher.getsockname()[1]
    node_config = tmp_path / "node-config"
    node_config.write_text("snmp_ip=127.0.0.1\n")
    agent = snmp_agents("--stats-file", stats_file.path, "--config", str(node_config), "--inform-port", str(port))
    catcher.settimeout(5)
    seen = []
    t0 = time.monotonic()
    try:
        while len(seen) < 3:
            data, _ = catcher.recvfrom(65536)
            seen.append((time.monotonic() - t0, data))
    finally:
        catcher.close()
    assert all(b"\x2b\x06\x01\x02\x01\x76\x00\x02" in d for _, d in seen)  # alarmActiveState in each
    assert "not acknowledged" in agent.log() and "attempt 2" in agent.log()
    trapd.start(port)  # now someone acknowledges: the next retry gets through and retries stop
    wait_until(lambda: "5501.4" in trapd.log(), 15, "the retried raise at snmptrapd")
    wait_until(lambda: "raise acknowledged" in agent.log(), 5, "the agent to see the acknowledgement")
    stats_file.reset_counters()
    stats_file.publish()
    wait_until(lambda: "5501.1" in trapd.log(), 10, "the clear")
    assert trapd.log().count("5501.4") == 1
