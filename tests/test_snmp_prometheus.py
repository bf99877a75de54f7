"""astaire-snmp --prometheus: the gauges and counters docs/compatibility.md names, from a real daemon's resync."""
from __future__ import annotations

import re
import urllib.request

from astaire.demo import workload
from astaire.cluster.view import ClusterView
from tests.snmp_helpers import wait_until


def _metrics(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def test_prometheus_metrics_follow_the_daemon(servers, daemons, snmp_agents, tmp_path):
    a, b = servers(2)
    records = list(workload.make_records(500, table="prom"))
    workload.load(ClusterView([a.name, b.name]), records)
    d = daemons(a.name, [a.name, b.name], source="crawler", start=False)
    agent = snmp_agents("--pidfile", str(d.pidfile), "--config", str(tmp_path / "none"),
                        "--prometheus", "127.0.0.1:0")
    port = int(wait_until(lambda: re.search(r"metrics on http://127\.0\.0\.1:(\d+)/", agent.log()), 10,
                          "the metrics port").group(1))
    m = _metrics(port)
    assert m["astaire_up"] == 0 and "astaire_buckets_needing_resync" not in m  # no daemon: no numbers
    d.start()
    d.wait_sync()  # the start-up full resync pulls b's copies
    m = wait_until(lambda: (m := _metrics(port)) and m.get('astaire_resyncs_total{result="ok"}') == 1 and m, 10,
                   "one resync counted")
    assert m["astaire_up"] == 1
    for g in ("astaire_buckets_needing_resync", "astaire_buckets_resynchronized", "astaire_entries_resynchronized",
              "astaire_data_resynchronized_bytes", "astaire_bandwidth_bytes_per_second"):
        assert g in m
    assert m["astaire_buckets_needing_resync"] == 0
    assert m['astaire_resyncs_total{result="failed"}'] == 0
    last = d.snapshot()["last_resync"]
    assert m["astaire_entries_resynchronized_total"] == last["entries"] == len(records)
    assert m["astaire_data_resynchronized_bytes_total"] == last["bytes"] > 0
    d.stop()
    wait_until(lambda: _metrics(port)["astaire_up"] == 0, 10, "astaire_up 0 after the daemon stops")
