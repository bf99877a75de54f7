"""run_stream with stock memcached as the source (LRU crawler + binary fetches) into a real memcached."""
from __future__ import annotations

import logging
import random
import socket
import tempfile
import threading
import time

import psutil
import pytest

from astaire import codec
from astaire.resync import settled, source, stream
from astaire.resync.stream import StreamJob, run_stream
from tests.test_drills_bad_input import FakeCrawler
from tests.test_stream_tap import (UNWANTED, WANTED, assert_ttl, keys_in, mc_get_many, mc_store, mc_text,
                                   vbucket)

log = logging.getLogger(__name__)


@pytest.fixture
def pair(cluster_factory):
    """(source, target): two real memcached servers."""
    c = cluster_factory(2, memory_mb=256, threads=2)
    return c.servers[0], c.servers[1]


def job(src, target, vbs=WANTED, **kw) -> StreamJob:
    kw.setdefault("source_kind", "crawler")
    return StreamJob(source=src.name, vbuckets=sorted(vbs), target=target.name, **kw)


def load(server, records: dict) -> None:
    mc_store(server, [(k, v, f, e) for k, (v, f, e) in records.items()])


def stat(server, name: bytes) -> int:
    for line in mc_text(server, b"stats\r\n").split(b"\r\n"):
        if line.startswith(b"STAT " + name + b" "):
            return int(line.split()[2])
    raise KeyError(name)


def assert_holds(target, expected: dict) -> None:
    """The target holds exactly ``expected``'s keys, each with its value, flags and TTL."""
    got = mc_get_many(target, expected)
    assert set(got) == set(expected)
    for k, (value, flags, exp) in expected.items():
        assert got[k][:2] == (value, flags), k
        assert_ttl(got[k][2], exp)


def healthy(server) -> bool:
    with socket.create_connection((server.host, server.port), timeout=2) as s:
        s.sendall(b"set health 0 0 2\r\nok\r\nget health\r\n")
        data = b""
        while not data.endswith(b"END\r\n"):
            more = s.recv(4096)
            if not more:
                return False
            data += more
    return data == b"STORED\r\nVALUE health 0 2\r\nok\r\nEND\r\n"


class MetadumpHog:
    """Another client's ``lru_crawler metadump all``: stalled (not read) until ``release()``,
    or read slowly so the crawl stays running."""

    def __init__(self, server, slow: bool = False):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.connect((server.host, server.port))
        self.sock.sendall(b"lru_crawler metadump all\r\n")
        self.released = threading.Event()
        self.slow = slow
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        tail = b""
        while True:
            if not self.released.is_set():
                if not self.slow:
                    self.released.wait()
                    continue
                time.sleep(0.02)
            chunk = self.sock.recv(4096 if not self.released.is_set() else 1 << 20)
            tail = (tail + chunk)[-5:]
            if not chunk or tail == b"END\r\n":
                return

    def release(self):
        self.released.set()
        self.thread.join(30)
        self.sock.close()


def busy_records(n: int = 20000) -> dict:
    # Long keys make a metadump of several MB, more than the socket buffers can hide.
    return {b"hog\\\\%06d" % i + b"x" * 200: (b"v", 0, 0) for i in range(n)}


# -- tests ----------------------------------------------------------------------------------

def test_crawler_copies_tens_of_thousands_of_records_intact(pair):
    src, target = pair
    rng = random.Random(7)
    now = int(time.time())
    records = {}
    for i, k in enumerate(keys_in(WANTED, b"data\\\\k", 12000) + keys_in(UNWANTED, b"data\\\\u", 18000)):
        size = rng.choice([0, 0, 1, 20, 100, 100, 300, 1000, 4000]) if i % 1500 else 100 * 1024
        exp = rng.choice([0, now + 3600, now + 86400 * 40])
        records[k] = (rng.randbytes(size), rng.getrandbits(32), exp)
    odd = keys_in(WANTED, b"data\\\\has space and %41 and %", 5)  # metadump URL-encodes these
    own = keys_in(WANTED, b"astaire\\\\y", 5)
    for k in odd:
        records[k] = (b"odd:" + k, 11, now + 7200)
    for k in own:
        records[k] = (b"{}", 0, 0)
    load(src, records)
    wanted = {k for k in records if vbucket(k) in WANTED and not k.startswith(b"astaire\\\\")}

    t0 = time.monotonic()
    result = run_stream(job(src, target))
    elapsed = time.monotonic() - t0

    assert result.ok, result.error
    assert result.kind == "crawler"
    got = mc_get_many(target, records)
    assert set(got) == wanted
    for k in wanted:
        value, flags, ttl = got[k]
        assert value == records[k][0], k
        assert flags == records[k][1], k
        assert_ttl(ttl, records[k][2])
    s = result.stats
    assert (s["entries"], s["added"], s["failed"], s["vanished"]) == (len(wanted), len(wanted), 0, 0)
    assert s["tombstones"] == sum(1 for k in wanted if not records[k][0]) > 0
    assert s["skipped_own"] == len(own)
    assert s["skipped_unwanted"] == len(records) - len(wanted) - len(own)
    log.info("crawler: %d records (%d wanted) in %.2f s, %.0f wanted records/s",
             len(records), len(wanted), elapsed, len(wanted) / elapsed)


def test_live_reads_on_the_source_do_not_hide_records_from_the_crawl(pair):
    """Reads move items between LRU segments; an LRU walk (metadump all) then misses some
    (1-14% measured on 1.6.18). The hash walk must list every one."""
    src, target = pair
    records = {k: (b"v" * 50, 1, 0) for k in keys_in(range(128), b"live\\\\k", 30000)}
    load(src, records)
    keys = list(records)
    stop = threading.Event()

    def reader():
        rng = random.Random(3)
        with socket.create_connection((src.host, src.port)) as s:
            f = s.makefile("rb")
            while not stop.is_set():
                s.sendall(b"".join(b"mg %s v\r\n" % k for k in rng.sample(keys, 200)) + b"mn\r\n")
                while f.readline() != b"MN\r\n":
                    pass

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        result = run_stream(job(src, target, range(128)))
    finally:
        stop.set()
        t.join(10)
    assert result.ok, result.error
    assert result.stats["entries"] == len(records)
    assert stat(target, b"curr_items") == len(records)


@pytest.mark.parametrize("ring", ["default", "64 KiB"])
def test_metadump_is_read_at_once_even_when_the_fetches_lag(pair, monkeypatch, ring):
    """A metadump hash left unread blocks the crawler inside an item lock, and our own GETs
    of keys under that lock then hang: the listing must be read at once and spooled. With a
    64 KiB ring the backlog (megabytes of listing) goes on through the spool's file."""
    src, target = pair
    spools = []

    class Recorded(stream._Spool):
        def __init__(self):
            super().__init__()
            spools.append(self)

    monkeypatch.setattr(stream, "_Spool", Recorded)
    if ring != "default":
        monkeypatch.setattr(stream, "SPOOL_IN_MEMORY", 64 * 1024)
    records = {k + b"x" * 200: (b"v", 1, 0) for k in keys_in(range(128), b"lag\\\\k", 40000)}
    load(src, records)
    result = run_stream(job(src, target, range(128), window=16, idle_timeout=10))
    assert result.ok, result.error
    assert result.stats["entries"] == len(records)
    assert stat(target, b"curr_items") == len(records)
    assert len(spools) == 1
    if ring != "default":
        assert spools[0].spilled > 1 << 20


def test_a_spool_file_that_cannot_be_made_fails_the_stream_readably(pair, monkeypatch, tmp_path):
    """A listing backlog past the ring needs a temporary file; when the temporary directory is
    gone the stream fails and says why (the worker does not crash), and the source's crawler
    is left free: the same stream then succeeds with a usable directory."""
    src, target = pair
    records = {k + b"x" * 200: (b"v", 1, 0) for k in keys_in(range(128), b"nodir\\\\k", 20000)}
    load(src, records)
    monkeypatch.setattr(stream, "SPOOL_IN_MEMORY", 64 * 1024)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "gone"))
    result = run_stream(job(src, target, range(128), window=16, idle_timeout=10))
    assert not result.ok
    assert "cannot hold the metadump backlog" in result.error and "gone" in result.error, result.error
    assert not result.target_failed
    assert healthy(src)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    result = run_stream(job(src, target, range(128), window=16, idle_timeout=10))
    assert result.ok, result.error
    assert stat(target, b"curr_items") == len(records) + 1  # and healthy()'s own key


def test_conflict_rule_through_the_crawler(pair):
    src, target = pair
    newer, older, absent = keys_in(WANTED, b"t\\\\c", 3)
    load(src, {newer: (b"remote-older", 1500, 0), older: (b"remote-newer", 1500, 0), absent: (b"remote", 9, 0)})
    load(target, {newer: (b"local-newer", 2000, 0), older: (b"local-older", 1000, 0)})
    result = run_stream(job(src, target))
    assert result.ok, result.error
    got = mc_get_many(target, [newer, older, absent])
    assert [got[k][:2] for k in (newer, older, absent)] == [
        (b"local-newer", 2000), (b"remote-newer", 1500), (b"remote", 9)]
    assert (result.stats["added"], result.stats["replaced"], result.stats["kept"]) == (1, 1, 1)


def test_auto_picks_the_crawler_on_stock_memcached_and_leaves_it_healthy(pair, caplog):
    src, target = pair
    caplog.set_level(logging.INFO, logger="astaire.stream")
    source.forget_kind(src.name)
    records = {k: (b"val-" + k, 5, 0) for k in keys_in(WANTED, b"t\\\\a", 3000)}
    load(src, records)
    conns_before = stat(src, b"total_connections")

    result = run_stream(job(src, target, source_kind="auto"))

    assert result.ok, result.error
    assert result.kind == "crawler"
    assert f"source {src.name} answers meta commands (memcached " in caplog.text
    assert {k: v[:2] for k, v in mc_get_many(target, records).items()} == {k: v[:2] for k, v in records.items()}
    # fetch + metadump connections, no TAP probe: the answer to mn showed stock memcached
    assert stat(src, b"total_connections") - conns_before == 2 + 1  # + this stats connection
    assert healthy(src)
    # memcached counts a connection closed once its worker thread sees the close (and the
    # crawler's once its thread lets go of it): on a loaded machine that took over 2 s
    deadline = time.monotonic() + 10
    while stat(src, b"curr_connections") > stat(target, b"curr_connections") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stat(src, b"curr_connections") <= stat(target, b"curr_connections")  # nothing of ours left open

    # The decision is cached.
    assert source.cached_kind(src.name) == "crawler"
    conns_before = stat(src, b"total_connections")
    again = run_stream(job(src, target, source_kind="auto"))
    assert again.ok and again.kind == "crawler" and again.stats["kept"] == len(records)
    assert stat(src, b"total_connections") - conns_before == 2 + 1


def test_a_server_remembered_as_tap_that_now_is_stock_is_streamed_with_the_crawler(pair, caplog):
    """The reverse: a server remembered as speaking TAP is asked for TAP first (the probe,
    on a connection then thrown away), finds none, and is streamed with the crawler."""
    src, target = pair
    records = {k: (b"val-" + k, 5, 0) for k in keys_in(WANTED, b"t\\\\rt", 50)}
    load(src, records)
    caplog.set_level(logging.INFO, logger="astaire.stream")
    source._remember(src.name, "tap")
    result = run_stream(job(src, target, source_kind="auto"))
    assert result.ok and result.kind == "crawler", result.error
    assert f"source {src.name} no longer speaks TAP" in caplog.text
    assert source.cached_kind(src.name) == "crawler"
    assert {k: v[:2] for k, v in mc_get_many(target, records).items()} == {k: v[:2] for k, v in records.items()}
    assert healthy(src)


def test_busy_crawler_is_waited_for_then_streamed(pair, caplog):
    src, target = pair
    caplog.set_level(logging.INFO, logger="astaire.stream")
    load(src, busy_records())
    records = {k: (b"x", 1, 0) for k in keys_in(WANTED, b"t\\\\b", 500)}
    load(src, records)
    hog = MetadumpHog(src, slow=True)
    try:
        time.sleep(0.3)
        assert stat(src, b"lru_crawler_running") == 1
        timer = threading.Timer(1.0, hog.release)
        timer.start()
        result = run_stream(job(src, target))
        timer.join()
    finally:
        hog.release()
    assert result.ok, result.error
    assert "LRU crawler busy" in caplog.text
    assert set(mc_get_many(target, records)) == set(records)


def test_crawler_busy_for_good_fails_without_wedging_the_source(cluster_factory):
    # One worker thread: had a second metadump been sent while the hog's crawl is stalled,
    # memcached 1.6.18 would block that thread and with it every connection.
    src = cluster_factory(1, memory_mb=64, threads=1).servers[0]
    target = cluster_factory(1, memory_mb=64).servers[0]
    load(src, busy_records())
    hog = MetadumpHog(src)
    try:
        time.sleep(0.3)
        t0 = time.monotonic()
        result = run_stream(job(src, target, crawler_busy_retries=2))
        assert time.monotonic() - t0 < 3
        assert not result.ok and "busy" in result.error, result.error
        assert healthy(src)
    finally:
        hog.release()


IDLE = b"STAT lru_crawler_running 0\r\nEND\r\n"
LISTING = b"key=a exp=-1 la=1 cas=1 fetch=no cls=1 size=60\nEND\r\n"


def start_metadump_against(answers):
    """``source._start_metadump`` against a scripted server answering each request line with
    the next of ``answers``: (bytes read, walk, the request lines the server heard)."""
    ours, theirs = socket.socketpair()
    heard = []

    def server():
        f = theirs.makefile("rb")
        for a in answers:
            heard.append(f.readline())
            theirs.sendall(a)

    t = threading.Thread(target=server, daemon=True)
    t.start()
    try:
        first, walk = source._start_metadump("fake:1", ours, 5, 5, 3, 0.01)
        t.join(5)
        return first, walk, heard
    finally:
        ours.close()
        theirs.close()


def test_busy_answer_is_retried():
    """The BUSY line itself (a crawl moving, caught between its pauses) is retried like the stat."""
    first, walk, heard = start_metadump_against([IDLE, b"BUSY currently processing crawler request\r\n", IDLE, LISTING])
    assert heard == [b"stats\r\n", b"lru_crawler metadump hash\r\n"] * 2
    assert first.endswith(b"END\r\n") and walk == source.WALK_HASH


@pytest.mark.parametrize("refusal", [b"BADCLASS invalid class id", b"ERROR", b"CLIENT_ERROR bad command line format"])
def test_a_server_refusing_the_hash_walk_is_listed_by_lru_and_says_so(refusal):
    """A server without ``metadump hash`` (memcached before 1.6.x had only class ids and
    ``all``) is asked for ``all`` on the same connection, and the source says which walk it
    gives: the stream keeps the duplicate check for it (an LRU walk can list an item twice)."""
    first, walk, heard = start_metadump_against([IDLE, refusal + b"\r\n", IDLE, LISTING])
    assert heard == [b"stats\r\n", b"lru_crawler metadump hash\r\n", b"stats\r\n", b"lru_crawler metadump all\r\n"]
    assert first.endswith(b"END\r\n") and walk == source.WALK_ALL


def test_a_hash_walk_stream_skips_the_duplicate_check(pair, monkeypatch):
    """Against real memcached (whose listing is the hash walk), the stream turns the Writer's
    duplicate check off, and every record still lands."""
    src, target = pair
    records = {k: (b"v:" + k, 40 + i, 0) for i, k in enumerate(keys_in(WANTED, b"data\\\\w", 300))}
    load(src, records)
    writers = []
    real = codec.Writer

    def spy(*args, **kwargs):
        writers.append(real(*args, **kwargs))
        return writers[-1]

    monkeypatch.setattr(codec, "Writer", spy)
    result = run_stream(job(src, target))
    assert result.ok, result.error
    assert [w.check_duplicates for w in writers] == [False]
    assert result.stats["added"] == len(records) and result.stats["duplicates"] == 0
    assert_holds(target, records)


def test_keys_vanishing_between_listing_and_fetching_are_not_errors(pair):
    src, target = pair
    records = {k: (b"v-" + k, 3, 0) for k in keys_in(WANTED, b"t\\\\v", 3000)}
    load(src, records)
    flushed = []

    def flush_source_once(delta):
        if delta and not flushed:  # after some records (an empty delta is a heartbeat)
            flushed.append(mc_text(src, b"flush_all\r\n"))

    result = run_stream(job(src, target, window=32), progress=flush_source_once, progress_interval=0.001)
    assert result.ok, result.error
    s = result.stats
    # Keys flushed before the crawl reached them are not listed at all; listed ones either
    # arrive or vanish.
    assert s["vanished"] > 0 and s["entries"] + s["vanished"] <= len(records)
    assert s["failed"] == 0
    got = mc_get_many(target, records)
    assert len(got) == s["entries"]
    assert all(got[k][:2] == records[k][:2] for k in got)


def test_source_killed_mid_stream_fails_and_what_was_written_is_right(pair):
    src, target = pair
    records = {k: (b"v-" + k, 4, 0) for k in keys_in(WANTED, b"t\\\\k", 5000)}
    load(src, records)

    def kill_source_once(delta):
        if delta and src.proc is not None:  # after some records (an empty delta is a heartbeat)
            src.kill()

    result = run_stream(job(src, target, window=64), progress=kill_source_once, progress_interval=0.001)
    assert not result.ok and f"source {src.name}" in result.error, result.error
    assert 0 < result.stats["entries"] < len(records)
    got = mc_get_many(target, records)
    assert len(got) < len(records)
    assert all(got[k][:2] == records[k][:2] for k in got)


def test_a_listing_closed_before_its_end_fails_the_stream_readably(pair):
    """The listing's connection closes after some lines and half of one, with no END, while
    the fetch connection stays up (a fake source: no real server does that on cue)."""
    _src, target = pair
    lines = b"".join(b"key=%s exp=-1 la=1 cas=1 fetch=no cls=1 size=60\r\n" % k.replace(b"\\", b"%5C")
                     for k in keys_in(UNWANTED, b"t\\u", 50))
    fake = FakeCrawler(lines + b"key=t%5C%5Ccut", close=True)
    try:
        result = run_stream(job(fake, target))
    finally:
        fake.stop()
    assert fake.metadumps == 1
    assert not result.ok and result.error.startswith(f"source {fake.name} closed the metadump before END"), result.error
    assert result.stats["skipped_unwanted"] == 50 and result.stats["entries"] == 0


def test_target_killed_mid_stream_fails_the_stream(pair):
    src, target = pair
    load(src, {k: (b"v" * 100, 4, 0) for k in keys_in(WANTED, b"t\\\\t", 5000)})

    def kill_target_once(delta):
        if delta and target.proc is not None:  # after some records (an empty delta is a heartbeat)
            target.kill()

    result = run_stream(job(src, target, window=64), progress=kill_target_once, progress_interval=0.001)
    assert not result.ok and f"target {target.name}" in result.error, result.error
    assert healthy(src)


def test_stop_request_ends_a_crawler_stream_promptly(pair):
    src, target = pair
    load(src, {k: (b"v", 4, 0) for k in keys_in(WANTED, b"t\\\\s", 5000)})
    result = run_stream(job(src, target, window=16), should_stop=lambda: True)
    assert not result.ok and "stopped" in result.error
    assert healthy(src)


def test_source_that_is_not_memcached_fails_readably(pair):
    _src, target = pair
    with socket.create_server(("127.0.0.1", 0)) as listener:
        name = "127.0.0.1:%d" % listener.getsockname()[1]

        def answer_garbage():
            conn, _ = listener.accept()
            with conn:
                conn.recv(100)
                conn.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\n")

        t = threading.Thread(target=answer_garbage, daemon=True)
        t.start()
        result = run_stream(StreamJob(name, [1], target.name, source_kind="crawler", connect_timeout=2))
        t.join(5)
    assert not result.ok and name in result.error and "unusable answer to version" in result.error, result.error


def test_two_hundred_thousand_records_keep_rss_flat(cluster_factory):
    """Flow control on the crawler path: 200k x 1 KiB; the metadump spool spills to disk."""
    src, target = cluster_factory(2, memory_mb=512, threads=2).servers
    count, value = 200_000, b"v" * 1024
    for i in range(0, count, 20_000):
        mc_store(src, [(b"bulk\\\\%08d" % j, value, j, 0) for j in range(i, i + 20_000)])
    proc = psutil.Process()
    peak = [0]

    def sample(_delta):
        peak[0] = max(peak[0], proc.memory_info().rss)

    base = proc.memory_info().rss
    t0 = time.monotonic()
    result = run_stream(job(src, target, range(128), window=1024), progress=sample, progress_interval=0.05)
    elapsed = time.monotonic() - t0
    sample(None)
    assert result.ok, result.error
    assert result.stats["added"] == count
    growth = (peak[0] - base) / 2 ** 20
    log.info("200k crawler records in %.2f s (%.0f/s), RSS growth %.1f MiB", elapsed, count / elapsed, growth)
    assert growth < 100, f"RSS grew {growth:.1f} MiB"


def test_a_small_copy_whose_key_the_table_knows_is_asked_for_its_flags_alone(cluster_factory):
    """Small items are not deferred, but when a fetch goes out for a key the settled table
    already notes (the other replica's copy settled first), only the flags are asked for:
    a copy not newer is kept with no value sent, a newer one is fetched again whole and
    replaces the first. Streamed one replica after the other, so every shared key is noted
    by the time the second replica's fetches go out."""
    c = cluster_factory(3, memory_mb=64, threads=2)
    a, b, target = c.servers
    rng = random.Random(12)
    now = int(time.time())
    keys = keys_in(WANTED, b"small\\\\k", 2000)
    both = {k: (rng.randbytes(100), 1000 + i, now + 3600) for i, k in enumerate(keys)}
    only_b = {k: (rng.randbytes(100), 7, 0) for k in keys_in(WANTED, b"small\\\\b", 50)}
    newer_b = {k: (b"newer:" + v, f + 1, e) for k, (v, f, e) in list(both.items())[::25]}
    load(a, both)
    load(b, {**both, **only_b, **newer_b})
    gen = settled.create().next_generation()
    results = [run_stream(job(src, target, settled_generation=gen)) for src in (a, b)]
    assert all(r.ok for r in results), [r.error for r in results]
    assert_holds(target, {**both, **only_b, **newer_b})
    sb = results[1].stats
    assert sb["held"] == 0 and sb["failed"] == 0
    assert sb["replaced"] == len(newer_b) and sb["added"] == len(only_b)
    assert sb["kept"] == len(both) - len(newer_b)
    # Notes are not kept for ever: a key whose bucket two later notes took loses its
    # note (they go through the conflict rule instead, and a note lost between a fetch going
    # out and its answer sends that copy for a whole fetch too). The rest:
    assert sb["deduplicated"] >= 0.95 * sb["kept"]          # kept on their flags alone
    assert 0.9 * len(newer_b) <= sb["refetched"] <= len(newer_b) + 0.01 * len(both)  # newer: fetched whole
    # no values came for the kept copies: far fewer bytes than the first replica's stream
    assert sb["bytes"] < results[0].stats["bytes"] / 2, (sb["bytes"], results[0].stats["bytes"])


def test_two_crawler_streams_deferring_opposite_halves_place_the_newest_copy_of_everything(cluster_factory):
    """Two old replicas of large records, streamed one after the other with a settled table
    and opposite ``hold`` bits, as the daemon runs them: each defers the fetches of its half
    of the large items (listed size >= 1 KB), and the target ends up with the newest copy of
    every record, the other replica's own and newer copies included."""
    c = cluster_factory(3, memory_mb=128, threads=2)
    a, b, target = c.servers
    rng = random.Random(11)
    now = int(time.time())
    keys = keys_in(WANTED, b"big\\\\k", 600)
    both = {k: (rng.randbytes(rng.choice([50, 2000, 5000])), 1000 + i, now + 3600) for i, k in enumerate(keys)}
    only_b = {k: (rng.randbytes(3000), 7, 0) for k in keys_in(WANTED, b"big\\\\b", 30)}
    newer_b = {k: (b"newer:" + v, f + 1, e) for k, (v, f, e) in list(both.items())[::20]}
    load(a, both)
    load(b, {**both, **only_b, **newer_b})
    table = settled.create()
    gen = table.next_generation()
    results = [run_stream(job(src, target, settled_generation=gen, hold=[[vb, bit] for vb in sorted(WANTED)]))
               for src, bit in ((a, 0), (b, 1))]
    assert all(r.ok for r in results), [r.error for r in results]
    assert_holds(target, {**both, **only_b, **newer_b})
    sa, sb = results[0].stats, results[1].stats
    assert sa["held"] > 100 and sb["held"] > 100  # both deferred their half of the large items
    assert sa["failed"] == sb["failed"] == 0
    assert sb["replaced"] == len(newer_b) and sb["added"] == len(only_b)
    assert sb["deduplicated"] > 400  # what the first stream wrote cost the second no request
    assert 0 < sb["refetched"] <= len(newer_b)  # asked for flags alone, found newer, fetched whole
