"""Two contract drills (issue 8) with the data model: a local memcached started with -C, and a
local node named in neither server list. Neither may look like a finished resync, and
neither may cost a record: with -C, a blind SET could overwrite a newer client write."""
from __future__ import annotations

import time

from astaire.cluster.view import ClusterView
from tests.daemon_helpers import wait_for
from tests.drills import Clients, Model, Node, events, load, status, wait_sync


def test_a_local_memcached_with_cas_disabled_is_refused_and_newer_writes_survive(nodes, daemons, drill):
    a, b = nodes(2, "stock")
    n = Node("stock", extra_args=("-C",)).start()
    try:
        before = ClusterView([a.name, b.name])
        after = ClusterView(before.servers, [a.name, b.name, n.name])
        model = Model()
        keys = load(model, before, 3000, table="nocas")
        clients = Clients(model, after, keys[::3], threads=1).start()  # newer writes land on n too
        try:
            time.sleep(0.5)
            d = daemons(n.name, before.servers, after.new_servers, workers=2, tag_interval=1, source="crawler")
            wait_for(lambda: d.snapshot()["last_resync"]["result"] == "refused", 30, what="the refusal")
        finally:
            clients.stop()
        drill.extra["client_writes"] = model.writes - 3000
        # What n holds is exactly what the clients wrote to it: nothing older was SET over it.
        client_keys = {k for k in model.keys() if model.acked[k][0] != next(iter(model.attempted[k]))}
        result = drill.check(model, ClusterView(before.servers), label="old replicas")
        assert result.ok, result.summary()
        sub = Model()
        for k in client_keys:
            flags, value = model.acked[k]
            sub.ack(k, flags, value)
            sub.attempted[k] = dict(model.attempted[k])
        on_n = drill.check(sub, after, nodes={n.name}, label="client writes on the -C node")
        assert not on_n.stale and not on_n.wrong, on_n.summary()
        st = status(d)
        assert st["target_cas_disabled"] is True and st["last_resync"]["result"] == "refused", st
        assert events(d, 7008) >= 1
        r = wait_sync(d, timeout=60, no_progress=10)
        assert r.returncode == 6, (r.returncode, r.stderr)
    finally:
        n.kill()


def test_a_local_node_in_neither_list_never_looks_synced(nodes, daemons, drill):
    a, b, n = nodes(3, "stock")
    before = ClusterView([a.name, b.name])
    after = ClusterView(before.servers, [a.name, b.name, n.name])
    model = Model()
    load(model, before, 2000, table="neither")
    typo = f"localhost:{n.port}"  # the operator's typo: reachable, but named in neither list
    d = daemons(typo, before.servers, after.new_servers, workers=2, tag_interval=1, source="crawler")
    wait_for(lambda: d.snapshot()["resyncs_completed"] >= 1, 30, what="the first (empty) resync")
    st = status(d)
    assert st["local_in_cluster"] is False, st
    assert events(d, 7009) >= 1
    r = wait_sync(d, timeout=60, no_progress=10)
    assert r.returncode == 5, (r.returncode, r.stderr)
    result = drill.check(model, before, label="old replicas untouched")
    assert result.ok, result.summary()
