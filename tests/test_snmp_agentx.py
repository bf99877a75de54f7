"""astaire-snmp as an AgentX subagent of a real net-snmp snmpd started by the test
(``master agentx`` on a socket in a temp directory); snmpd is restarted mid-test."""
from __future__ import annotations

import os
import shutil
import struct
import subprocess

import pytest

from astaire.snmp import agentx
from astaire.snmp.mib import Tree
from astaire.stats import Connection, StatsReader, StatsWriter
from tests.snmp_helpers import SCALARS, A, NetSnmp, free_udp_port, snmp_env, stop_process, wait_until

needs_snmpd = pytest.mark.skipif(shutil.which("snmpd") is None, reason="snmpd not installed (scripts/setup)")


class Snmpd:
    def __init__(self, tmp, socket_path):
        self.tmp, self.socket = tmp, socket_path
        self.conf = tmp / "snmpd.conf"
        self.conf.write_text(f"master agentx\nagentXSocket {socket_path}\nrocommunity clearwater 127.0.0.1\n"
                             "agentXTimeout 2\n")
        self.port = free_udp_port()
        self.proc = None

    def start(self) -> "Snmpd":
        self.log = open(self.tmp / "snmpd.log", "ab")
        self.proc = subprocess.Popen(["snmpd", "-f", "-Lo", "-C", "-c", str(self.conf), "-p", str(self.tmp / "snmpd.pid"),
                                      f"udp:127.0.0.1:{self.port}"], stdout=self.log, stderr=subprocess.STDOUT,
                                     env=snmp_env(self.tmp))
        wait_until(lambda: os.path.exists(self.socket) or self.proc.poll() is not None, 10, "snmpd's agentx socket")
        assert self.proc.poll() is None, (self.tmp / "snmpd.log").read_text()
        return self

    def stop(self) -> None:
        stop_process(self.proc, self.log)


@pytest.fixture
def stats_file(tmp_path):
    w = StatsWriter(str(tmp_path / "astaire.stats"), 128, 4)
    w.state = 1
    w.buckets_needing, w.buckets_resynchronized, w.entries, w.bytes = 84, 12, 3456, 789012
    c = Connection("127.0.0.1", 40001, list(range(0, 128, 3)), resynced=4)
    c.entries.update({vb: vb for vb in c.vbuckets})
    w.connections["s1"] = c
    w.connections["s2"] = Connection("::1", 40002, [1, 2])
    w.publish()
    yield w
    w.close()


@needs_snmpd
def test_reads_through_snmpd_and_the_subagent_comes_back_after_a_restart(snmp_agents, tmp_path, stats_file):
    sock = str(tmp_path / "agentx" / "master")
    os.makedirs(os.path.dirname(sock))
    snmpd = Snmpd(tmp_path, sock).start()
    try:
        agent = snmp_agents("--stats-file", stats_file.path, "--config", os.devnull, "--agentx", sock,
                            standalone=False, wait_for_port=False)
        wait_until(lambda: "AgentX: registered" in agent.log(), 10, "the subagent to register")
        snmp = NetSnmp(tmp_path, snmpd.port)
        got = snmp.values("snmpget", *SCALARS)
        assert [got[o] for o in SCALARS] == ["84", "12", "3456", "789012"]
        walk = snmp.values("snmpbulkwalk", A)
        tree = Tree(StatsReader(stats_file.path).snapshot())
        assert list(walk) == [".".join(map(str, r.oid)) for r in tree.rows]  # every instance, in order
        v6 = f"{A}.6.1.4.2.16." + ".".join(["0"] * 15) + ".1.40002"
        assert walk[v6] == "2"
        plain = snmp.cmd("snmpwalk", A, opts=("-On", "-Oq"))
        assert "OID not increasing" not in plain.stdout + plain.stderr
        assert len(plain.stdout.splitlines()) == len(walk)
        nxt = snmp.values("snmpgetnext", f"{A}.4.0")
        assert list(nxt) == [f"{A}.5.1.2.1"]
        assert snmp.values("snmpget", f"{A}.1.7")[f"{A}.1.7"].startswith("No Such")
        r = snmp.cmd("snmpset", f"{A}.1.0", "u", "0", check=False)
        assert r.returncode != 0
        assert snmp.values("snmpget", f"{A}.1.0")[f"{A}.1.0"] == "84"

        snmpd.stop()  # restart snmpd: the subagent reconnects and registers again
        snmpd.start()
        wait_until(lambda: agent.log().count("AgentX: registered") >= 2, 15, "the subagent to register again")
        assert snmp.values("snmpget", f"{A}.1.0")[f"{A}.1.0"] == "84"
        assert "reconnecting" in agent.log() or "session with" in agent.log() or "closed the session" in agent.log()
    finally:
        snmpd.stop()


def test_agentx_encoding_round_trip_and_getbulk():
    oid = (1, 3, 6, 1, 4, 1, 8072, 1)
    enc = agentx.encode_oid(oid, include=1)
    assert enc[:4] == bytes([3, 4, 1, 0])  # 1.3.6.1.4 compressed into the prefix
    r = agentx.Reader(enc + agentx.encode_oid(()), True)
    assert r.oid() == (oid, 1) and r.oid() == ((), 0)
    little = struct.pack("<BBBB3I", 3, 0, 0, 0, 1, 2, 826)
    assert agentx.Reader(little, False).oid() == ((1, 2, 826), 0)
    assert agentx.Reader(agentx.encode_octets(b"abcde"), True).octets() == b"abcde"
    with pytest.raises(agentx.ProtocolError):
        agentx.Reader(b"\x05\x00\x00\x00\x00", True).oid()
    snap = {"buckets_needing_resync": 1, "buckets_resynchronized": 0, "entries_resynchronized": 0,
            "data_resynchronized": 0, "bandwidth": 0, "connections": []}
    tree = Tree(snap)
    body = agentx.answer_getbulk(tree, 1, 10, [((1, 2, 826), 0, ()), ((1, 2, 826, 0, 1, 1578918, 9, 9, 4, 0), 0, ())])
    # 1 non-repeater + the repeater's one instance (5.1.2.1) + endOfMibView, then it stops.
    types = []
    r = agentx.Reader(body, True)
    while r.pos < len(body):
        vtype, _ = r.take("HH")
        name, _ = r.oid()
        if vtype == agentx.T_GAUGE32:
            r.take("I")
        types.append((vtype, name[-3:]))
    assert types == [(66, (9, 1, 0)), (66, (1, 2, 1)), (130, (1, 2, 1))]
