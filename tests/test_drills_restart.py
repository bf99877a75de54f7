"""Drills 1 and 2 (issue 8): the local memcached restarts empty, or is down for a while.

A 3 -> 2 scale-down with a daemon on each remaining node (a and b). The local node a already
holds most of its vbuckets, so a view resync pulls only what it gains: after a restart only a
*full* resync puts everything back, which is what the drills check. a's workers are held to 1%
of a CPU by the real cgroup cpu controller while the drill reads the resync's progress off a
itself (``reach_capped``), so a restart lands at a chosen point of the resync (they are frozen
while a restarts, so it cannot land after the end by accident).
"""
from __future__ import annotations

import signal
import time

import pytest

from astaire.cluster.view import ClusterView
from tests.daemon_helpers import wait_for
from tests.drills import (Model, Placed, events, load, new_records, reach_capped, set_tag, settle, sources_blamed, status,
                          tag_present, wait_sync)

# The fork's whole resync of these records is some 20 ms of CPU: enough for the 1% cap to make
# it last a second or more, so the drill can stop it within a few percent of where it wants.
RECORDS = 40000  # both kinds: stock and fork


def scale_down(kind, nodes, daemons, count, start=True, **daemon_kw):
    a, b, c = nodes(3, kind)
    before = ClusterView([a.name, b.name, c.name])
    after = ClusterView(before.servers, [a.name, b.name])
    model = Model()
    load(model, before, count, table=f"restart{kind}", value_size=100)
    for n in (a, b):
        set_tag(n.name)  # as after an earlier resync: the daemons start with a view resync
    kw = dict(workers=2, tag_interval=1, source="crawler" if kind == "stock" else "tap", **daemon_kw)
    da = daemons(a.name, before.servers, after.new_servers, start=start, **kw)
    db = daemons(b.name, before.servers, after.new_servers, start=start, **kw)
    return a, b, c, before, after, model, da, db


@pytest.mark.parametrize("kind", ["stock", "fork"])
@pytest.mark.parametrize("when", ["before", "at-30%", "just-before-end", "after-end"])
def test_local_memcached_restarts_empty(kind, when, nodes, daemons, freezers, drill, group_name):
    if when == "before":
        # The daemons run idle on the stable view, tag seen; a restarts; the resize is
        # announced before the next tag check (1 s): the resync starts believing a is intact.
        a, b, c, before, after, model, da, db = scale_down(kind, nodes, daemons, RECORDS, start=False)
        for d in (da, db):
            d.write_settings(before.servers)
            d.start()
        for d in (da, db):
            d.wait_sync()
        a.down()
        a.up()
        for d in (da, db):
            d.write_settings(before.servers, after.new_servers)
            d.signal(signal.SIGHUP)
    else:
        a, b, c, before, after, model, da, db = scale_down(kind, nodes, daemons, RECORDS, start=False)
        placed = Placed(a.name, new_records(model, after, a.name))  # progress read off a itself
        db.start()
        da.start(wait=False)
        workers = freezers(lambda: [w.pid for w in da.children()])  # a's workers, frozen at birth
        wait_for(lambda: len(da.children()) == 2, 10, interval=0.001, what="a's workers")
        workers.hold()
        if when == "after-end":
            workers.release()
            da.wait_sync(timeout=120)
            assert tag_present(a.name)
            a.down()
            a.up()
            # The tag check (every second) notices; until then nothing says a restarted.
            wait_for(lambda: da.snapshot()["resyncs_completed"] >= 2 or da.snapshot()["state"] == "resyncing",
                     20, what="the restart noticed by the tag check")
        else:
            reached = reach_capped(da, workers, 0.3 if when == "at-30%" else 0.75, placed, group_name)
            a.down()
            a.up()
            time.sleep(0.3)
            workers.release()
            drill.extra["restarted_at"] = f"{reached:.0%}"
    problems: list[str] = []
    settle(da, a.name, problems, full=True)  # only a full resync puts back what a held before the resize
    settle(db, b.name, problems)
    problems += sources_blamed(da, b.name, c.name)
    if events(da, 7007) < 1:
        problems.append("no event 7007 in a's log")
    result = drill.check(model, after)
    assert result.ok, result.summary()
    assert not problems, problems


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["stock", "fork"])
def test_local_memcached_down_5s_during_a_stream(kind, nodes, daemons, freezers, drill, group_name):
    """Drill 2: a is killed mid-stream and comes back (empty) 5 s later; no record is lost,
    b and c are never blamed, and status/wait-sync say Astaire waits for the local node."""
    a, b, c, before, after, model, da, db = scale_down(kind, nodes, daemons, RECORDS, start=False)
    placed = Placed(a.name, new_records(model, after, a.name))
    db.start()
    da.start(wait=False)
    workers = freezers(lambda: [w.pid for w in da.children()])
    wait_for(lambda: len(da.children()) == 2, 10, interval=0.001, what="a's workers")
    workers.hold()
    drill.extra["down_at"] = f"{reach_capped(da, workers, 0.3, placed, group_name):.0%}"
    a.down()
    workers.release()
    problems: list[str] = []
    t0 = time.monotonic()
    seen = []
    while time.monotonic() - t0 < 3:
        try:
            seen.append(status(da).get("waiting_for_local"))
        except Exception as e:  # noqa: BLE001
            seen.append(repr(e))
        if seen[-1] is True:
            break
        time.sleep(0.2)
    if seen[-1] is not True:
        problems.append(f"status never said waiting_for_local: true while a was down: {seen[-3:]}")
    r = wait_sync(da, timeout=30, no_progress=1)
    if r.returncode == 0:
        problems.append("wait-sync exited 0 while the local memcached was down")
    time.sleep(max(0.0, 5 - (time.monotonic() - t0)))
    a.up()
    settle(da, a.name, problems, full=True)
    settle(db, b.name, problems)
    problems += sources_blamed(da, b.name, c.name)
    result = drill.check(model, after)
    assert result.ok, result.summary()
    assert not problems, problems
