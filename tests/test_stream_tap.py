"""run_stream with a TAP source (the fake Clearwater fork) into a real memcached target."""
from __future__ import annotations

import base64
import hashlib
import logging
import random
import socket
import struct
import threading
import time

import psutil
import pytest

from astaire.resync import source
from astaire.demo.localcluster import MemcachedServer, free_port
from astaire.resync.stream import StreamJob, run_stream
from tests.drills import Mc, Node
from tests.tapserver import TapServer

HEADER = struct.Struct(">BBHBBHIIQ")


# -- helpers shared with test_stream_crawler ------------------------------------------------

def vbucket(key: bytes, vbuckets: int = 128) -> int:
    """md5(key)[0:4] little-endian & (vbuckets - 1) (docs/compatibility.md); computed without the codec."""
    return int.from_bytes(hashlib.md5(key).digest()[:4], "little") & (vbuckets - 1)


def keys_in(vbs, prefix: bytes, count: int, start: int = 0) -> list[bytes]:
    """``count`` keys ``prefix<n>`` whose vbucket is in ``vbs``."""
    vbs = set(vbs)
    out, n = [], start
    while len(out) < count:
        k = b"%s%d" % (prefix, n)
        if vbucket(k) in vbs:
            out.append(k)
        n += 1
    return out


def _connect(server) -> socket.socket:
    return socket.create_connection((server.host, server.port), timeout=10)


def mc_store(server, records, opcode: int = 0x11) -> None:
    """Pipelined binary SETQ (or ``opcode``) of (key, value, flags, exp) records; raises on any error."""
    with _connect(server) as s:
        out = bytearray()
        for key, value, flags, exp in records:
            out += HEADER.pack(0x80, opcode, len(key), 8, 0, 0, 8 + len(key) + len(value), 0, 0)
            out += struct.pack(">II", flags, exp) + key + value
        out += HEADER.pack(0x80, 0x0A, 0, 0, 0, 0, 0, 0xFEED, 0)
        threading.Thread(target=s.sendall, args=(bytes(out),), daemon=True).start()
        buf = b""
        while True:
            while len(buf) >= 24:
                magic, op, _kl, _el, _dt, status, bodylen, opaque, _cas = HEADER.unpack_from(buf)
                if len(buf) < 24 + bodylen:
                    break
                body, buf = buf[24:24 + bodylen], buf[24 + bodylen:]
                if op == 0x0A and opaque == 0xFEED:
                    return
                raise AssertionError(f"store failed: opcode 0x{op:02x} status 0x{status:04x} {body!r}")
            more = s.recv(1 << 20)
            assert more, "memcached closed while storing"
            buf += more


def mc_get_many(server, keys) -> dict:
    """{key: (value, flags, ttl)} for the keys present (ttl -1 = never expires), via meta get with base64 keys."""
    keys = list(keys)
    result = {}
    with _connect(server) as s:
        f = s.makefile("rb")
        for i in range(0, len(keys), 2000):
            batch = keys[i:i + 2000]
            s.sendall(b"".join(b"mg %s b v f t\r\n" % base64.b64encode(k) for k in batch))
            for k in batch:
                line = f.readline()
                if line.startswith(b"EN"):
                    continue
                parts = line.split()
                assert parts[0] == b"VA", line
                size = int(parts[1])
                opts = {p[:1]: p[1:] for p in parts[2:]}
                value = f.read(size + 2)[:size]
                result[k] = (value, int(opts[b"f"]), int(opts[b"t"]))
    return result


def mc_text(server, command: bytes) -> bytes:
    with _connect(server) as s:
        s.sendall(command)
        data = b""
        while not data.endswith(b"\r\n"):
            data += s.recv(65536)
        return data


def assert_ttl(ttl: int, exp: int) -> None:
    if exp == 0:
        assert ttl == -1
    else:
        assert abs(ttl - (exp - time.time())) <= 5, (ttl, exp - time.time())


# -- fixtures -------------------------------------------------------------------------------

@pytest.fixture
def tapserver():
    with TapServer() as server:
        yield server


def job(src, target, vbs, **kw) -> StreamJob:
    return StreamJob(source=src.name, vbuckets=sorted(vbs), target=target.name, **kw)


WANTED = set(range(0, 128, 3))
UNWANTED = set(range(128)) - WANTED


# -- tests ----------------------------------------------------------------------------------

def test_wanted_records_arrive_intact_and_everything_else_stays_behind(tapserver, memcached):
    rng = random.Random(1)
    now = int(time.time())
    records = {}
    for k in keys_in(WANTED, b"test\\\\k", 600) + keys_in(UNWANTED, b"test\\\\u", 600):
        size = rng.choice([0, 1, 10, 100, 1000, 5000])
        exp = rng.choice([0, now + 3600, now + 86400 * 40])
        records[k] = (rng.randbytes(size), rng.getrandbits(32), exp)
    odd = keys_in(WANTED, b"test\\\\a key with spaces and %25 ", 3)
    own = keys_in(WANTED, b"astaire\\\\x", 5)
    for k in odd:
        records[k] = (b"odd " + k, 7, 0)
    for k in own:
        records[k] = (b"mine", 1, 0)
    for k, (v, fl, exp) in records.items():
        tapserver.put(k, v, fl, exp)

    result = run_stream(job(tapserver, memcached, WANTED))

    assert result.ok, result.error
    assert result.kind == "tap"
    assert tapserver.connects[0].flags == 0x06 and set(tapserver.connects[0].vbuckets) == WANTED
    got = mc_get_many(memcached, records)
    wanted = {k for k in records if vbucket(k) in WANTED and not k.startswith(b"astaire\\\\")}
    assert set(got) == wanted
    for k in wanted:
        value, flags, ttl = got[k]
        assert (value, flags) == records[k][:2]
        assert_ttl(ttl, records[k][2])
    s = result.stats
    tombstones = sum(1 for k in wanted if records[k][0] == b"")
    assert tombstones > 0
    assert (s["entries"], s["added"], s["tombstones"], s["failed"]) == (len(wanted), len(wanted), tombstones, 0)
    assert s["skipped_own"] == len(own) and s["skipped_unwanted"] == 600
    assert sum(e for e, _ in result.vbucket_counts.values()) == len(wanted)
    assert set(result.vbucket_counts) == WANTED
    assert tapserver.streams_completed == 1 and tapserver.client_closed_early == 0


def test_local_newer_kept_local_older_replaced_wrap_safe(tapserver, memcached):
    newer, older, wrapped, absent = keys_in(WANTED, b"t\\\\c", 4)
    mc_store(memcached, [(newer, b"local-newer", 2000, 0), (older, b"local-older", 1000, 0),
                         (wrapped, b"local-before-wrap", 0xFFFFFFF0, 0)])
    tapserver.put(newer, b"remote-older", 1500)
    tapserver.put(older, b"remote-newer", 1500)
    tapserver.put(wrapped, b"remote-after-wrap", 0x10)  # int32(0xfffffff0 - 0x10) < 0: local is older
    tapserver.put(absent, b"remote-only", 5)

    result = run_stream(job(tapserver, memcached, WANTED))

    assert result.ok, result.error
    got = mc_get_many(memcached, [newer, older, wrapped, absent])
    assert got[newer][:2] == (b"local-newer", 2000)
    assert got[older][:2] == (b"remote-newer", 1500)
    assert got[wrapped][:2] == (b"remote-after-wrap", 0x10)
    assert got[absent][:2] == (b"remote-only", 5)
    s = result.stats
    assert (s["added"], s["replaced"], s["kept"], s["failed"]) == (1, 2, 1, 0)


def test_other_tap_opcodes_are_skipped(memcached):
    with TapServer(interleave_other_opcodes=True, interleave_every=5) as server:
        keys = keys_in(WANTED, b"t\\\\o", 40)
        for k in keys:
            server.put(k, b"v-" + k, 3)
        result = run_stream(job(server, memcached, WANTED))
    assert result.ok, result.error
    assert result.stats["other_tap"] == 6 * 8 and result.stats["added"] == 40
    assert {k: v[:2] for k, v in mc_get_many(memcached, keys).items()} == {k: (b"v-" + k, 3) for k in keys}


@pytest.mark.parametrize("fault, words", [
    ("die_after", ("source", "reset")),
    ("cut_mid_frame_after", ("source", "mid-frame")),
    ("garbage_after", ("source", "bad magic")),
])
def test_broken_source_fails_the_stream_and_what_was_written_is_right(memcached, fault, words):
    keys = keys_in(WANTED, b"t\\\\d", 3000)
    with TapServer(**{fault: 2000}) as server:
        for i, k in enumerate(keys):
            server.put(k, b"value-%d" % i, i)
        result = run_stream(job(server, memcached, WANTED))
    assert not result.ok
    assert all(w in result.error.lower() for w in words), result.error
    assert 0 < result.stats["entries"] <= 2000
    got = mc_get_many(memcached, keys)  # records fed but not yet settled when it failed may be missing
    assert len(got) <= 2000
    for i, k in enumerate(keys):
        if k in got:
            assert got[k][:2] == (b"value-%d" % i, i)
    assert set(got) == set(keys[:len(got)])  # a prefix of the dump, nothing from beyond the fault


def test_auto_against_a_server_with_neither_meta_commands_nor_tap_fails_cleanly(memcached):
    with TapServer(no_tap=True) as server:
        server.put(b"k", b"v")
        auto = run_stream(job(server, memcached, WANTED, connect_timeout=2))
        tap = run_stream(job(server, memcached, WANTED, source_kind="tap"))
        assert len(server.connects) == 2
        # auto asked for meta commands first (version and mn, ERROR), then for TAP; never stats
        assert server.text_commands == [b"version", b"mn"] and server.text_stats == 0
    assert not auto.ok and auto.kind is None
    assert f"source {server.name} has neither meta commands" in auto.error and "nor TAP" in auto.error
    assert not tap.ok and "no TAP" in tap.error
    assert source.cached_kind(server.name) is None  # a failure forgets what was learnt


def test_target_dying_mid_stream_fails_it_but_the_tap_stream_is_still_read_to_its_end(tapserver):
    for k in keys_in(WANTED, b"t\\\\x", 200):
        tapserver.put(k, b"v")
    tapserver.delay_per_frame = 0.005
    target = MemcachedServer(memory_mb=64).start()
    try:
        seen = []

        def kill_target_once(delta):
            seen.append(delta)
            if len(seen) == 1:
                target.kill()

        result = run_stream(job(tapserver, target, WANTED), progress=kill_target_once, progress_interval=0.05)
    finally:
        target.stop()
    assert not result.ok and "target" in result.error, result.error
    assert tapserver.streams_completed == 1 and tapserver.client_closed_early == 0
    assert result.drained_bytes > 0


def test_stop_request_reads_the_tap_stream_to_its_end(tapserver, memcached):
    for k in keys_in(WANTED, b"t\\\\s", 100):
        tapserver.put(k, b"v")
    tapserver.delay_per_frame = 0.003
    t0 = time.monotonic()
    result = run_stream(job(tapserver, memcached, WANTED), should_stop=lambda: time.monotonic() - t0 > 0.1)
    assert not result.ok and "stopped" in result.error
    assert tapserver.streams_completed == 1 and tapserver.client_closed_early == 0


def test_failing_progress_callback_ends_the_stream_but_reads_tap_to_its_end(tapserver, memcached):
    for k in keys_in(WANTED, b"t\\\\f", 100):
        tapserver.put(k, b"v")
    tapserver.delay_per_frame = 0.003

    def broken(_delta):
        raise BrokenPipeError("supervisor gone")

    result = run_stream(job(tapserver, memcached, WANTED), progress=broken, progress_interval=0.01)
    assert not result.ok and "progress callback failed" in result.error
    assert tapserver.streams_completed == 1 and tapserver.client_closed_early == 0


def test_bad_job_is_a_failed_result(tapserver, memcached):
    result = run_stream(job(tapserver, memcached, [1, 200]))
    assert not result.ok and result.error.startswith("bad stream job") and "200" in result.error
    bad_kind = run_stream(job(tapserver, memcached, [1], source_kind="telepathy"))
    assert not bad_kind.ok and "telepathy" in bad_kind.error
    assert tapserver.connects == []


def test_unreachable_target_fails_before_the_source_is_touched(tapserver):
    dead = MemcachedServer()
    dead.port = free_port()
    result = run_stream(StreamJob(tapserver.name, [1], dead.name, connect_timeout=1))
    assert not result.ok and f"target {dead.name}" in result.error
    assert tapserver.connects == []


def test_unreachable_source_fails_readably(memcached):
    name = f"127.0.0.1:{free_port()}"
    result = run_stream(StreamJob(name, [1], memcached.name, connect_timeout=1))
    assert not result.ok and name in result.error and "connect" in result.error


def test_silent_source_fails_after_idle_timeout(memcached):
    release = threading.Event()

    def one_then_silence():
        yield (keys_in(WANTED, b"t\\\\i", 1)[0], b"v", 0, 0, 1)
        release.wait(30)

    with TapServer(items=one_then_silence, delay_per_frame=0.001) as server:
        t0 = time.monotonic()
        result = run_stream(job(server, memcached, WANTED, idle_timeout=0.5))
        assert time.monotonic() - t0 < 5
        release.set()
    assert not result.ok and "no progress from source" in result.error, result.error
    assert result.stats["added"] == 1


def test_source_silent_after_tap_connect_fails_readably(memcached):
    with TapServer(delay_per_frame=30) as server:
        server.put(b"k", b"v")
        result = run_stream(job(server, memcached, WANTED, connect_timeout=0.5))
    assert not result.ok and "did not answer TAP_CONNECT" in result.error, result.error


def test_progress_deltas_add_up_and_are_rate_limited(memcached):
    keys = keys_in(WANTED, b"t\\\\p", 400)
    with TapServer(delay_per_frame=0.001) as server:
        for k in keys:
            server.put(k, b"x" * 10)
        calls = []
        result = run_stream(job(server, memcached, WANTED), progress=lambda d: calls.append((time.monotonic(), d)),
                            progress_interval=0.1)
    assert result.ok, result.error
    totals = {}
    for _t, delta in calls:
        for vb, (e, b) in delta.items():
            te, tb = totals.get(vb, (0, 0))
            totals[vb] = (te + e, tb + b)
    assert totals == {vb: c for vb, c in result.vbucket_counts.items() if c != (0, 0)}
    assert len(calls) >= 2
    gaps = [b[0] - a[0] for a, b in zip(calls, calls[1:-1])]
    assert all(g >= 0.09 for g in gaps), gaps


def test_auto_detection_logs_the_choice_and_is_cached(tapserver, memcached, caplog):
    tapserver.put(keys_in(WANTED, b"t\\\\l", 1)[0], b"v")
    caplog.set_level(logging.INFO, logger="astaire.stream")
    source.forget_kind(tapserver.name)
    assert run_stream(job(tapserver, memcached, WANTED)).ok
    assert f"source {tapserver.name} speaks TAP" in caplog.text
    assert source.cached_kind(tapserver.name) == "tap"
    # It was asked for meta commands first, on a text connection that the fork answers
    # without harm, and never sent the text stats that crash the real fork.
    assert tapserver.text_commands == [b"version", b"mn"] and tapserver.text_stats == 0
    # Cached: the next stream goes straight to TAP.
    assert run_stream(job(tapserver, memcached, WANTED)).ok
    assert tapserver.text_commands == [b"version", b"mn"] and len(tapserver.connects) == 2


def test_auto_detection_against_the_real_fork_asks_meta_then_taps_and_leaves_it_serving(tap_fork, memcached,
                                                                                          caplog):
    """The real Clearwater fork answers the crawler's opening ``version`` + ``mn`` with its
    version and ERROR, survives it, and is then streamed over TAP."""
    caplog.set_level(logging.INFO, logger="astaire.stream")
    with Node("fork") as fork:
        keys = keys_in(WANTED, b"t\\\\rf", 50)
        mc_store(fork, [(k, b"value-%d" % i, i, 0) for i, k in enumerate(keys)])
        source.forget_kind(fork.name)
        result = run_stream(job(fork, memcached, WANTED))
        assert result.ok, result.error
        assert result.kind == "tap"
        assert f"source {fork.name} speaks TAP (no meta commands)" in caplog.text
        got = mc_get_many(memcached, keys)
        assert {k: got[k][:2] for k in keys} == {k: (b"value-%d" % i, i) for i, k in enumerate(keys)}
        time.sleep(0.5)  # the fork's crash after a mishandled connection would come soon after
        assert fork.alive()
        with Mc(fork.name) as c:
            assert "pid" in c.stats()


def test_the_crawler_asked_of_the_real_fork_fails_cleanly_and_never_sends_it_stats(tap_fork, memcached):
    """``--source crawler`` pointed at a fork: the opening ``mn`` finds no meta commands and the
    stream fails saying so, before the crawler's text ``stats`` (which crashes the fork)."""
    with Node("fork") as fork:
        mc_store(fork, [(k, b"v", 1, 0) for k in keys_in(WANTED, b"t\\\\cf", 5)])
        result = run_stream(job(fork, memcached, WANTED, source_kind="crawler"))
        assert not result.ok
        assert f"source {fork.name} (memcached 1.6.00) has no meta commands" in result.error
        time.sleep(0.5)
        assert fork.alive()
        with Mc(fork.name) as c:
            assert "pid" in c.stats()


def test_a_server_remembered_as_stock_that_now_speaks_tap_is_streamed_over_tap(tapserver, memcached, caplog):
    """A worker remembers each server's kind; a server replaced by the fork at the same address
    answers mn with ERROR and is then streamed over TAP, saying so."""
    keys = keys_in(WANTED, b"t\\\\sw", 3)
    for k in keys:
        tapserver.put(k, b"v")
    caplog.set_level(logging.INFO, logger="astaire.stream")
    source._remember(tapserver.name, "crawler")
    result = run_stream(job(tapserver, memcached, WANTED))
    assert result.ok and result.kind == "tap", result.error
    assert f"source {tapserver.name} no longer answers meta commands" in caplog.text
    assert source.cached_kind(tapserver.name) == "tap" and tapserver.text_stats == 0
    assert set(mc_get_many(memcached, keys)) == set(keys)


def test_two_hundred_thousand_records_keep_rss_flat():
    """Flow control: 200k x 1 KiB (~210 MB) through the stream; RSS must not grow with it."""
    count, size = 200_000, 1024
    value = b"v" * size

    def items():
        for i in range(count):
            yield (b"bulk\\\\%08d" % i, value, i, 0, i + 1)

    proc = psutil.Process()
    peak = [0]

    def sample(_delta):
        peak[0] = max(peak[0], proc.memory_info().rss)

    with MemcachedServer(memory_mb=512, threads=2) as target, TapServer(items=items) as server:
        base = proc.memory_info().rss
        t0 = time.monotonic()
        result = run_stream(job(server, target, range(128)), progress=sample, progress_interval=0.05)
        elapsed = time.monotonic() - t0
        sample(None)
        stats = mc_text(target, b"stats\r\n")
    assert result.ok, result.error
    assert result.stats["added"] == count
    assert b"STAT curr_items %d\r\n" % count in stats
    growth = (peak[0] - base) / 2 ** 20
    logging.getLogger(__name__).info("200k TAP records in %.2f s (%.0f/s), RSS growth %.1f MiB",
                                     elapsed, count / elapsed, growth)
    assert growth < 100, f"RSS grew {growth:.1f} MiB"
