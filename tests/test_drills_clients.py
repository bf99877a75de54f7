"""Drill 5 (issue 8): clients keep writing during a resize, MemcachedStore style.

Client threads keep writing newer records and tombstones to every write replica of the
resizing view (GET, then ADD if absent or CAS over what was read, retried when a race is
lost; flags = the write's millisecond timestamp), to existing keys and to new ones, while
a daemon on every node resyncs. Afterwards every key is checked on every owner in the new
ring against the newest acknowledged write: an old record that Astaire copied must never
have overwritten a newer client write, and tombstones must stay. Every client write sets a
different TTL; on stock memcached each record must carry the expiry of the write it holds.
"""
from __future__ import annotations

import time

import pytest

from astaire.cluster.view import ClusterView
from tests.drills import Clients, Model, load, set_tag, settle

CASES = {  # name: (nodes before, nodes after, records)
    "2->3": (2, 3, 6000),
    "3->2": (3, 2, 6000),
    "6->8": (6, 8, 6000),
    "8->6": (8, 6, 6000),
}


@pytest.mark.parametrize("kind", ["stock", "fork"])
@pytest.mark.parametrize("case", [c if c in ("2->3", "3->2") else pytest.param(c, marks=pytest.mark.slow)
                                  for c in CASES])
def test_clients_write_during_a_resize(case, kind, nodes, daemons, drill):
    nb, na, count = CASES[case]
    servers = nodes(max(nb, na), kind)
    names = [s.name for s in servers]
    before = ClusterView(names[:nb])
    after = ClusterView(before.servers, names[:na])
    model = Model()
    keys = load(model, before, count, table=f"cl{kind}")
    keys += [f"cl{kind}\\\\new-{i}".encode() for i in range(count // 10)]  # created during the resize
    for name in before.servers:
        set_tag(name)  # the old nodes were in sync before the resize
    clients = Clients(model, after, keys, threads=2).start()
    try:
        time.sleep(0.3)  # some writes land before the daemons start
        ds = [daemons(name, before.servers, after.new_servers, workers=1, tag_interval=1, source="auto")
              for name in dict.fromkeys([*before.servers, *after.new_servers])]
        problems: list[str] = []
        for d in ds:
            settle(d, d.local, problems)
        time.sleep(0.3)  # and some after
    finally:
        clients.stop()
    drill.extra["client_writes"] = model.writes - count
    drill.extra["races"] = clients.races
    assert not clients.errors, clients.errors[:3]
    assert model.writes - count > 100, "the clients hardly wrote: the drill proves nothing"
    # Stock memcached lists expiries: each record must carry the expiry of the write it holds
    # (a crawler that takes the TTL from the listing and the value from a later read would not).
    result = drill.check(model, after, ttl_nodes=set(names) if kind == "stock" else ())
    assert result.ok, result.summary()
    assert not problems, problems
