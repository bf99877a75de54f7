"""Pacing (astaire.resync.pace): the TAP streams of a resync keep within LEAD records of
one another, so the settled table still holds the notes the lagging stream's copies need."""
from __future__ import annotations

import array
import logging
import re
import threading
import time

import pytest

from astaire.resync import pace, settled
from astaire.resync.stream import StreamJob, run_stream
from tests.drills import Node
from tests.test_stream_tap import mc_get_many, mc_store

NOW_MS = int(time.time() * 1000) & 0xFFFFFFFF


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def slots():
    return memoryview(array.array("Q", [0] * pace.SLOTS))


def test_a_stream_alone_may_take_a_lead_and_publishes_its_count():
    words = slots()
    p = pace.Pacer(words, 3, 7)
    assert p.allowance(1000) == pace.LEAD
    assert words[3] == (7 << 56) | 1001
    p.close()
    assert words[3] == 0


def test_a_stream_far_ahead_of_a_moving_one_waits_until_it_catches_up():
    words, clock = slots(), Clock()
    ahead = pace.Pacer(words, 0, 1, lead=100, clock=clock)
    behind = pace.Pacer(words, 1, 1, lead=100, clock=clock)
    assert behind.allowance(50) == 100           # nobody else has published yet
    assert ahead.allowance(200) == -50           # 200 > 50 + 100: wait
    assert behind.allowance(120) == 180          # the slowest is never held
    clock.now += 0.01
    assert ahead.allowance(200) == 20            # 120 + 100 - 200: may go on
    assert ahead.allowance(230) == -10


def test_a_stream_that_stops_moving_is_not_waited_for_until_it_moves_again():
    words, clock = slots(), Clock()
    ahead = pace.Pacer(words, 0, 1, lead=100, stall=0.25, clock=clock)
    stuck = pace.Pacer(words, 1, 1, lead=100, clock=clock)
    stuck.publish(10)
    assert ahead.allowance(500) < 0
    clock.now += 0.2
    assert ahead.allowance(500) < 0              # still within the stall time
    clock.now += 0.1
    assert ahead.allowance(500) == 100           # stopped for longer than the stall time: not waited for
    stuck.publish(11)                            # it moves again: waited for again
    clock.now += 0.01
    assert ahead.allowance(500) == 11 + 100 - 500


def test_only_live_slots_of_the_same_resync_count():
    words, clock = slots(), Clock()
    me = pace.Pacer(words, 5, 2, lead=100, clock=clock)
    words[6] = (1 << 56) | 11                    # an earlier resync's stream (a dead worker's slot)
    assert me.allowance(1000) == 100
    other = pace.Pacer(words, 7, 2, lead=100, clock=clock)
    other.publish(10)
    assert me.allowance(1000) < 0
    other.close()                                # it ended: nobody waits for it
    assert me.allowance(1000) == 100
    words[6] = (2 << 56) | 11
    stale = pace.Pacer(words, 6, 1, clock=clock)
    stale.close()                                # not its generation any more: left alone
    assert words[6] == (2 << 56) | 11


@pytest.mark.parametrize("slot, generation", [(-1, 1), (pace.SLOTS, 1), (0, 0), (0, 256)])
def test_a_bad_slot_or_generation_is_refused(slot, generation):
    with pytest.raises(ValueError):
        pace.Pacer(slots(), slot, generation)


def test_the_settled_table_clears_the_pace_slots_with_every_resync():
    t = settled.SettledTable(1 << 4)
    gen = t.next_generation()
    pace.Pacer(t.pace_words, 0, gen).publish(42)
    assert t.pace_words[0] != 0
    t.next_generation()
    assert t.pace_words[0] == 0


# -- two real Clearwater fork sources, one of them slowed down ---------------------------------

RECORDS = 100000


def _stream_pair(sources, target, slots_for, slow, gen):
    """Run one TAP stream per source at once, ``slow`` stopped (SIGSTOP) 30 ms of every 40:
    the streams' results and, for each, how many records the other had taken when it ended."""
    counts = [0, 0]
    lock = threading.Lock()

    def progress(i):
        def on(delta):
            with lock:
                counts[i] += sum(e for e, _ in delta.values())
        return on

    results = [None, None]
    other_at_end = [0, 0]

    def run(i):
        job = StreamJob(source=sources[i].name, vbuckets=list(range(128)), target=target.name, source_kind="tap",
                        settled_generation=gen, pace_slot=slots_for[i])
        results[i] = run_stream(job, progress=progress(i), progress_interval=0.002)
        with lock:
            other_at_end[i] = counts[1 - i]

    stop = threading.Event()

    def throttle():
        while not stop.is_set():
            slow.pause()
            time.sleep(0.03)
            slow.resume()
            time.sleep(0.01)

    threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
    slower = threading.Thread(target=throttle)
    slower.start()
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        stop.set()
        slower.join()
        slow.resume()
    return results, other_at_end


@pytest.mark.parametrize("paced", [True, False])
def test_a_stream_from_a_fast_fork_waits_for_one_from_a_slow_fork(tap_fork, memcached, paced, caplog):
    """Both old replicas hold the same records; one is stopped 30 ms of every 40. Paced, the
    stream from the fast one never gets more than about LEAD records ahead of the slow one's,
    so when it ends the slow one is nearly done too (and it says how long it waited); not
    paced, it ends with the slow one far behind. Either way the target ends with every
    record."""
    caplog.set_level(logging.INFO, logger="astaire.stream")
    fast, slow = Node("fork", memory_mb=128).start(), Node("fork", memory_mb=128).start()
    try:
        records = [(b"t\\\\pace%d" % i, b"v" * 100, NOW_MS, 0) for i in range(RECORDS)]
        for node in (fast, slow):
            mc_store(node, records)
        table = settled.create()
        gen = table.next_generation()
        results, other_at_end = _stream_pair((fast, slow), memcached, (0, 1) if paced else (-1, -1), slow, gen)
    finally:
        fast.kill()
        slow.kill()
    assert all(r is not None and r.ok for r in results), [r and r.error for r in results]
    assert [r.stats["entries"] for r in results] == [RECORDS, RECORDS]
    got = mc_get_many(memcached, [k for k, *_ in records])
    assert len(got) == RECORDS and all(got[k][:2] == (v, f) for k, v, f, _ in records)
    paced_lines = [float(m) for m in re.findall(r"paced (\d+\.\d+) s", caplog.text)]
    # within a step of the Pump (10 ms) and a read (512 KiB) of the lead, and the progress
    # reports' lag
    near = RECORDS - pace.LEAD - 10000
    if paced:
        assert other_at_end[0] >= near, other_at_end
        assert len(paced_lines) == 2 and max(paced_lines) > 0.05, paced_lines
    else:
        assert other_at_end[0] < near, other_at_end   # the check above can fail
        assert paced_lines == []


def test_the_daemons_tap_streams_pace_one_another_and_place_everything(nodes, daemons):
    """A 2 -> 3 scale-up with the Clearwater fork as every node and two workers: the
    conductor gives each TAP stream a pace slot (each stream's log line says how long it
    waited), and the new node ends with exactly what the view gives it."""
    from tests.drills import settle, verify
    from tests.test_drills_sources import scale_up
    a, b = nodes(2, "fork")
    (n,) = nodes(1, "fork")
    _before, after, model, d = scale_up("fork", a, b, n, daemons, records=6000)
    d.start()
    problems: list[str] = []
    settle(d, n.name, problems)
    check = verify(model, after)
    assert check.ok, check.summary()
    assert not problems, problems
    done = [line for line in d.log().splitlines() if "astaire.stream:" in line and " done: " in line]
    assert len(done) == 2 and all(re.search(r"\(tap, \d+ vbuckets\).*; paced \d+\.\d+ s$", line) for line in done), done
