"""``/metrics`` in Prometheus text format (prometheus_client), from the same statistics file.

Gauges are read at scrape time; they carry the full values (no 2^32-1 ceiling). The
counters only grow while this agent runs: they are fed by the agent's poll loop
(``observe``), which sees each resync's progress and its end.
"""
from __future__ import annotations

import logging
import threading
import time

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

log = logging.getLogger("astaire.snmp")

GAUGES = (
    ("astaire_buckets_needing_resync", "buckets_needing_resync",
     "(vbucket, source) pairs the running resync must stream; 0 when no resync runs"),
    ("astaire_buckets_resynchronized", "buckets_resynchronized",
     "(vbucket, source) pairs streamed so far by the running resync"),
    ("astaire_entries_resynchronized", "entries_resynchronized", "records received so far by the running resync"),
    ("astaire_data_resynchronized_bytes", "data_resynchronized", "bytes received so far by the running resync"),
    ("astaire_bandwidth_bytes_per_second", "bandwidth", "resync bandwidth over the previous 5 s"),
)


class MetricsExporter:
    def __init__(self, source):
        self.source = source
        self._lock = threading.Lock()
        self.resyncs = {"ok": 0, "failed": 0}
        self.entries_total = 0
        self.bytes_total = 0
        self._finished_seen = None  # the finish time of the last resync already counted
        self._since = time.time()  # resyncs that end after this are counted
        self._current = None  # (resync_started_at, entries counted, bytes counted)
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(self)
        self._server = None

    def observe(self, snap: dict | None) -> None:
        if snap is None:
            return
        with self._lock:
            last = snap["last_resync"]
            finished = last["finished_at"]
            if finished and finished != self._finished_seen and finished >= self._since:
                if last["result"] in self.resyncs:
                    self.resyncs[last["result"]] += 1
                if self._current is not None:  # the tail of the resync we were following
                    _, e, b = self._current
                    self.entries_total += max(0, last["entries"] - e)
                    self.bytes_total += max(0, last["bytes"] - b)
                elif finished - last["seconds"] >= self._since:  # began and ended between two looks
                    self.entries_total += last["entries"]
                    self.bytes_total += last["bytes"]
                self._current = None
                self._finished_seen = finished
            if snap["state"] == "resyncing" and snap["resync_started_at"]:
                key = snap["resync_started_at"]
                if self._current is None or self._current[0] != key:
                    self._current = (key, 0, 0)
                _, e, b = self._current
                ne, nb = snap["entries_resynchronized"], snap["data_resynchronized"]
                self.entries_total += max(0, ne - e)
                self.bytes_total += max(0, nb - b)
                self._current = (key, max(e, ne), max(b, nb))

    def collect(self):
        snap = self.source.snapshot()
        up = GaugeMetricFamily("astaire_up", "1 when the daemon runs and its statistics are fresh, else 0")
        up.add_metric([], 1 if snap is not None else 0)
        yield up
        if snap is not None:
            for name, field, doc in GAUGES:
                g = GaugeMetricFamily(name, doc)
                g.add_metric([], snap[field])
                yield g
        with self._lock:
            c = CounterMetricFamily("astaire_resyncs", "resyncs that ended while this agent ran, by result",
                                    labels=["result"])
            for result, n in self.resyncs.items():
                c.add_metric([result], n)
            yield c
            yield CounterMetricFamily("astaire_entries_resynchronized", "records resynchronized while this agent ran",
                                      value=self.entries_total)
            yield CounterMetricFamily("astaire_data_resynchronized_bytes",
                                      "bytes resynchronized while this agent ran", value=self.bytes_total)

    def describe(self):
        return []

    def serve(self, host: str, port: int) -> int:
        result = start_http_server(port, addr=host, registry=self.registry)
        self._server = result[0] if isinstance(result, tuple) else None
        bound = self._server.server_port if self._server is not None else port
        log.info("Prometheus metrics on http://%s:%d/metrics", host, bound)
        return bound

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
