"""astaire-snmp as a standalone agent, read with net-snmp's real tools, on a live resync."""
from __future__ import annotations

import ipaddress
import json
import os
import signal
import time

from astaire.demo import workload
from astaire.snmp.mib import clamp
from astaire.cluster.view import ClusterView
from tests.snmp_helpers import SCALARS, A, NetSnmp, needs_netsnmp, parse_values, wait_until

pytestmark = needs_netsnmp


def _conn_index(c: dict) -> str:
    if c["address_type"] in (1, 2):
        octets = ipaddress.ip_address(c["address"]).packed
    else:
        octets = c["address"].encode()
    return ".".join(map(str, (c["address_type"], len(octets), *octets, c["port"])))


def _between(lo, value, hi) -> bool:
    return clamp(min(lo, hi)) <= value <= clamp(max(lo, hi))


def test_a_resync_read_with_snmpget_getnext_bulkwalk_table_and_walk_and_the_alarm_informs(
        servers, daemons, snmp_agents, trapd, tmp_path):
    a, b, n = servers(3)
    before = ClusterView([a.name, b.name])
    workload.load(before, list(workload.make_records(3000, table="snmp")))
    trapd.start()
    node_config = tmp_path / "node-config"
    node_config.write_text("local_ip=127.0.0.1\nsnmp_ip=127.0.0.1\n")
    d = daemons(n.name, [a.name, b.name], [a.name, b.name, n.name], source="crawler", start=False,
                extra=("--connect-timeout", "30"))
    agent = snmp_agents("--pidfile", str(d.pidfile), "--config", str(node_config),
                        "--inform-port", str(trapd.port))
    snmp = NetSnmp(tmp_path, agent.port)
    # Freeze both old replicas: the streams are handed out but cannot read a byte, so the
    # resync holds still while we look (--connect-timeout 30 bounds the hold).
    for s in (a, b):
        os.kill(s.proc.pid, signal.SIGSTOP)
    held = True
    try:
        d.start()
        wait_until(lambda: len(d.snapshot()["connections"]) == 2, 10, "both streams handed out")
        t0 = time.monotonic()
        st0 = json.loads(d.cli("status", "--json").stdout)
        got = snmp.values("snmpget", *SCALARS)
        nxt = snmp.values("snmpgetnext", A, f"{A}.1.0", f"{A}.6")
        walk = snmp.values("snmpbulkwalk", A)
        table = snmp.cmd("snmptable", "ASTAIRE-MIB::astaireConnectionTable",
                         opts=("-m", "ASTAIRE-MIB", "-Ci", "-Cf", "|")).stdout
        plain = snmp.cmd("snmpwalk", A, opts=("-On", "-Oq"))
        st1 = json.loads(d.cli("status", "--json").stdout)
        # The raise arrives while both sources are still frozen.
        wait_until(lambda: "118.1.1.2.1.3.0.5501.4" in trapd.log(), 3, "the raise INFORM")
        sample_walk = snmp.cmd("snmpwalk", A).stdout
        hold = time.monotonic() - t0
        for s in (a, b):
            os.kill(s.proc.pid, signal.SIGCONT)
        held = False
    finally:
        if held:
            for s in (a, b):
                os.kill(s.proc.pid, signal.SIGCONT)
    assert hold < 25, f"reads took {hold:.1f} s: the frozen sources may have timed out"
    assert st0["state"] == st1["state"] == "resyncing"

    # Scalars: each between the status before and the one after; a resync in progress.
    for oid, field in SCALARS.items():
        assert _between(st0[field], int(got[oid]), st1[field]), (field, got[oid], st0[field], st1[field])
        assert walk[oid] == got[oid]
    assert int(got[f"{A}.1.0"]) > 0
    assert int(got[f"{A}.2.0"]) < int(got[f"{A}.1.0"])
    # GETNEXT: from the subtree root to the first scalar, from a scalar to the next, into a table.
    first, second, third = nxt
    assert (first, second) == (f"{A}.1.0", f"{A}.2.0") and third.startswith(f"{A}.6.1.4.1.4.127.0.0.1.")

    # A connection row for each streaming source, values between before and after.
    assert {(c["address"], c["port"]) for c in st1["connections"]} == {("127.0.0.1", a.port), ("127.0.0.1", b.port)}
    for c0 in st0["connections"]:
        c1 = next(c for c in st1["connections"] if c["port"] == c0["port"])
        idx = _conn_index(c0)
        assert _between(c0["buckets_needing_resync"], int(walk[f"{A}.6.1.4.{idx}"]), c1["buckets_needing_resync"])
        assert _between(c0["buckets_resynchronized"], int(walk[f"{A}.6.1.5.{idx}"]), c1["buckets_resynchronized"])
        for bk in c0["buckets"]:
            assert f"{A}.7.1.5.{idx}.{bk['vbucket']}" in walk
            assert f"{A}.7.1.6.{idx}.{bk['vbucket']}" in walk
            assert f"{A}.8.1.6.{idx}.{bk['vbucket']}.1" in walk
    rows = {k for k in walk if k.startswith(f"{A}.7.1.5.")}
    assert len(rows) == sum(len(c["buckets"]) for c in st0["connections"])
    assert f"{A}.5.1.2.1" in walk  # the bandwidth scope row
    # snmptable shows one line per connection, indexed by (type, address, port).
    lines = [ln for ln in table.splitlines() if "|" in ln and "astaire" not in ln and "index" not in ln]
    assert len(lines) == 2, table
    assert all(ln.split("|")[0].startswith("1.\"") or ln.split("|")[0].startswith("ipv4") or "127" in ln
               for ln in lines), table
    # A plain GETNEXT walk: every value the bulk walk saw, in increasing order, and no complaint.
    assert "OID not increasing" not in plain.stdout + plain.stderr
    assert list(parse_values(plain.stdout)) == list(walk)

    # After the resync: all four scalars 0, no connection rows; the clear INFORM.
    d.wait_sync(60)
    after = wait_until(lambda: (v := snmp.values("snmpget", *SCALARS)) and all(x == "0" for x in v.values()) and v,
                       10, "the scalars back to 0")
    assert set(after) == set(SCALARS)
    tail = snmp.values("snmpbulkwalk", A)
    assert not any(k.startswith((f"{A}.6.", f"{A}.7.", f"{A}.8.")) for k in tail)
    wait_until(lambda: "118.1.1.2.1.3.0.5501.1" in trapd.log(), 10, "the clear INFORM")
    log = trapd.log()
    raise_at = log.index("5501.4")
    assert log.index("5501.1") > raise_at
    assert ".1.3.6.1.2.1.118.0.2" in log and ".1.3.6.1.2.1.118.0.3" in log
    print(sample_walk)
    print(log)
