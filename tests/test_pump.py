"""The Pump: the hot part of a stream's I/O loop (both codec builds), on socketpairs
whose far ends the tests play by hand. The streams it runs against real servers are in
test_stream_tap.py and test_stream_crawler.py."""
from __future__ import annotations

import signal
import socket

import pytest

from astaire.protocol_errors import ProtocolError
from tests.test_writer import frames_of, meta_gets, response

KEY = b"t\\\\k1"


def _pair():
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.settimeout(5)
    return ours, theirs


def _read_all(sock, want):
    """Read from ``sock`` until ``want(data)`` holds."""
    data = b""
    while not want(data):
        chunk = sock.recv(65536)
        assert chunk, "closed before the expected bytes came"
        data += chunk
    return data


def _frames_complete(data):
    """Whole binary frames only (the NOOP fence last)."""
    if len(data) < 24:
        return False
    frames = frames_of(data)
    return bool(frames) and frames[-1].opcode == 0x0A


@pytest.fixture
def target():
    ours, theirs = _pair()
    yield ours, theirs
    ours.close()
    theirs.close()


def _writer(tap, **kw):
    return tap.Writer(range(128), **kw)


def test_it_sends_the_writers_requests_and_ends_when_the_source_has_ended_and_all_settled(tap, target):
    ours, theirs = target
    w = _writer(tap)
    w.feed_tap(tap.encode_tap_mutation(KEY, b"value", flags=7))
    w.finish()
    pump = tap.Pump(w, ours.fileno())
    assert pump.run(0.05, src_ended=True) == tap.PUMP_TIMEOUT  # sent, and waiting for the fence
    sent = _read_all(theirs, _frames_complete)
    frames = frames_of(sent)
    assert [(f.opcode, f.key) for f in frames] == [(tap.OP_ADDQ, KEY), (tap.OP_NOOP, b"")]
    assert pump.target_pending == 0
    theirs.sendall(response(tap.OP_NOOP, opaque=frames[-1].opaque))
    assert pump.run(5, src_ended=True) == tap.PUMP_DONE
    assert w.stats()["added"] == 1 and w.done
    assert pump.target_reads == 1 and pump.target_bytes_read == 24


def test_not_done_while_the_source_has_not_ended(tap, target):
    ours, theirs = target
    w = _writer(tap)
    pump = tap.Pump(w, ours.fileno())
    assert pump.run(0.05) == tap.PUMP_TIMEOUT
    w.finish()
    assert pump.run(0.05, src_ended=True) == tap.PUMP_DONE


def test_it_reads_a_tap_source_and_reports_its_end(tap, target):
    ours, theirs = target
    src, far = _pair()
    with src, far:
        w = _writer(tap)
        pump = tap.Pump(w, ours.fileno())
        far.sendall(tap.encode_tap_mutation(KEY, b"v1") + tap.encode_tap_mutation(b"t\\\\k2", b"v2"))
        far.shutdown(socket.SHUT_WR)
        assert pump.run(5, src.fileno(), tap.PUMP_SRC_TAP) == tap.PUMP_SOURCE_EOF
        assert w.stats()["entries"] == 2 and pump.source_reads >= 1
        assert pump.source_bytes_read == 2 * len(tap.encode_tap_mutation(KEY, b"v1"))


def test_a_tap_source_is_not_read_while_the_writer_has_no_room(tap, target):
    ours, theirs = target
    src, far = _pair()
    with src, far:
        w = tap.Writer(range(128), window=1)
        w.feed_tap(tap.encode_tap_mutation(KEY, b"v1"))  # one unsettled record fills the window
        pump = tap.Pump(w, ours.fileno())
        far.sendall(tap.encode_tap_mutation(b"t\\\\k2", b"v2"))
        assert pump.run(0.1, src.fileno(), tap.PUMP_SRC_TAP) == tap.PUMP_TIMEOUT
        assert w.stats()["entries"] == 1 and pump.source_reads == 0
        frames = frames_of(_read_all(theirs, _frames_complete))
        theirs.sendall(response(tap.OP_NOOP, opaque=frames[-1].opaque))  # settled: room again
        for _ in range(3):
            pump.run(0.1, src.fileno(), tap.PUMP_SRC_TAP)
        assert w.stats()["entries"] == 2


def test_the_caller_reads_a_source_it_keeps(tap, target):
    ours, theirs = target
    src, far = _pair()
    with src, far:
        pump = tap.Pump(_writer(tap), ours.fileno())
        far.sendall(b"key=a exp=-1\r\n")
        assert pump.run(5, src.fileno(), tap.PUMP_SRC_CALLER) == tap.PUMP_SOURCE
        assert src.recv(100) == b"key=a exp=-1\r\n"  # untouched by the pump
        assert pump.source_reads == 0


@pytest.fixture
def crawler():
    """A crawler stream's other two connections: (fetch, its far end, listing, its far end)."""
    fetch, fetch_far = _pair()
    src, far = _pair()
    yield fetch, fetch_far, src, far
    for s in (fetch, fetch_far, src, far):
        s.close()


def _listing(start, n):
    return b"".join(b"key=t%%5C%%5Ck%d exp=-1 la=1 cas=1 fetch=no cls=1 size=60\r\n" % i
                    for i in range(start, start + n))


def test_a_listing_is_read_into_the_writer_and_its_end_reported(tap, target, crawler):
    ours, theirs = target
    fetch, fetch_far, src, far = crawler
    w = tap.Writer(range(128), window=64)
    pump = tap.Pump(w, ours.fileno(), fetch.fileno())
    far.sendall(_listing(0, 5))
    assert pump.run(0.2, src.fileno(), tap.PUMP_SRC_LISTING) == tap.PUMP_TIMEOUT
    assert w.fetch_backlog == 5 and pump.source_reads >= 1  # read by the pump, not left for the caller
    gets = meta_gets(_read_all(fetch_far, lambda d: d.endswith(b"mn\r\n")))
    assert [g[0] for g in gets if g != ("mn",)] == [b"t\\\\k%d" % i for i in range(5)]
    far.sendall(_listing(5, 3) + b"END\r\n")
    assert pump.run(5, src.fileno(), tap.PUMP_SRC_LISTING) == tap.PUMP_SOURCE_END
    assert w.fetch_backlog == 8
    assert pump.source_bytes_read == len(_listing(0, 8)) + 5
    w.finish()  # what the stream does next; the source is no longer watched
    fetch_far.sendall(b"MN\r\n" * 2)
    assert pump.run(5, src_ended=True) == tap.PUMP_DONE  # no fetch found a key: nothing to write


def test_a_listing_is_left_to_the_caller_while_fetches_fill_the_window_or_text_is_spooled(tap, target, crawler):
    ours, theirs = target
    fetch, fetch_far, src, far = crawler
    w = tap.Writer(range(128), window=8)
    pump = tap.Pump(w, ours.fileno(), fetch.fileno())
    w.feed_metadump(_listing(0, 8))  # a window of fetches
    far.sendall(_listing(8, 2))
    assert pump.run(5, src.fileno(), tap.PUMP_SRC_LISTING) == tap.PUMP_SOURCE
    assert w.fetch_backlog == 8 and pump.source_reads == 0
    assert src.recv(1 << 16) == _listing(8, 2)  # untouched: the caller spools it
    w2 = tap.Writer(range(128), window=8)
    pump2 = tap.Pump(w2, ours.fileno(), fetch.fileno())
    far.sendall(_listing(10, 1))
    assert pump2.run(5, src.fileno(), tap.PUMP_SRC_LISTING, spool_waiting=True) == tap.PUMP_SPOOL
    w2.feed_metadump(_listing(0, 8))  # the spooled text, fed: the window is full again
    assert pump2.run(5, src.fileno(), tap.PUMP_SRC_LISTING, spool_waiting=True) == tap.PUMP_SOURCE
    assert pump2.source_reads == 0


def test_a_listing_closed_before_its_end_is_reported(tap, target, crawler):
    ours, theirs = target
    fetch, fetch_far, src, far = crawler
    w = tap.Writer(range(128), window=64)
    pump = tap.Pump(w, ours.fileno(), fetch.fileno())
    far.sendall(_listing(0, 2) + b"key=t%5C%5Ck")  # a line cut short
    far.close()
    assert pump.run(5, src.fileno(), tap.PUMP_SRC_LISTING) == tap.PUMP_SOURCE_EOF
    assert w.fetch_backlog == 2 and not w.done


def test_a_bad_listing_line_names_the_source(tap, target, crawler):
    ours, theirs = target
    fetch, fetch_far, src, far = crawler
    pump = tap.Pump(tap.Writer(range(128)), ours.fileno(), fetch.fileno())
    far.sendall(b"key=t%5C%5Ck exp=-1\r\nEND\r\nkey=late exp=-1\r\n")
    with pytest.raises(ProtocolError, match="after END"):
        pump.run(5, src.fileno(), tap.PUMP_SRC_LISTING)
    assert pump.peer == "source"


def test_listing_text_waiting_is_asked_for_once_a_batch_of_fetches_fits(tap, target):
    ours, theirs = target
    fetch, far = _pair()
    with fetch, far:
        w = tap.Writer(range(128), window=8)
        pump = tap.Pump(w, ours.fileno(), fetch.fileno())
        assert pump.run(5, spool_waiting=True) == tap.PUMP_SPOOL
        w.feed_metadump(b"".join(b"key=t%%5C%%5Ck%d exp=-1 la=1 cas=1 fetch=no cls=1 size=60\r\n" % i
                                 for i in range(8)))
        assert w.fetch_backlog == 8
        assert pump.run(0.05, spool_waiting=True) == tap.PUMP_TIMEOUT  # the backlog is full
        gets = meta_gets(_read_all(far, lambda d: d.count(b"mn\r\n") == 4))
        assert len([g for g in gets if g != ("mn",)]) == 8 and pump.fetch_pending == 0
        far.sendall(b"MN\r\n" * 2)  # two batches answered, their keys gone: room for a batch
        assert pump.run(5, spool_waiting=True) == tap.PUMP_SPOOL
        assert pump.fetch_reads >= 1


def test_a_target_that_closes_is_reported(tap, target):
    ours, theirs = target
    pump = tap.Pump(_writer(tap), ours.fileno())
    theirs.close()
    assert pump.run(5) == tap.PUMP_TARGET_EOF


def test_a_fetch_connection_that_closes_is_reported(tap, target):
    ours, theirs = target
    fetch, far = _pair()
    with fetch, far:
        pump = tap.Pump(_writer(tap), ours.fileno(), fetch.fileno())
        far.close()
        assert pump.run(5) == tap.PUMP_FETCH_EOF


def test_a_protocol_error_names_its_peer(tap, target):
    ours, theirs = target
    pump = tap.Pump(_writer(tap), ours.fileno())
    theirs.sendall(b"\x00" * 24)
    with pytest.raises(ProtocolError):
        pump.run(5)
    assert pump.peer == "target"
    fetch, far = _pair()
    with fetch, far:
        pump = tap.Pump(_writer(tap), ours.fileno(), fetch.fileno())
        far.sendall(b"XX nonsense\r\n")
        with pytest.raises(ProtocolError):
            pump.run(5)
        assert pump.peer == "fetch"


def test_a_send_that_fails_names_its_peer_and_that_it_was_sending(tap, target):
    ours, theirs = target
    w = _writer(tap)
    w.feed_tap(tap.encode_tap_mutation(KEY, b"value"))
    theirs.close()
    pump = tap.Pump(w, ours.fileno())
    with pytest.raises(OSError):
        pump.run(5)
    assert (pump.peer, pump.op) == ("target", "send")


def test_bytes_the_socket_does_not_take_wait_in_order(tap, target):
    ours, theirs = target
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    w = tap.Writer(range(128), window=64)
    records = [(b"t\\\\k%d" % i, bytes([i]) * 20000) for i in range(32)]
    for key, value in records:
        w.feed_tap(tap.encode_tap_mutation(key, value))
    pump = tap.Pump(w, ours.fileno())
    assert pump.run(0.05) == tap.PUMP_TIMEOUT
    assert pump.target_pending > 0  # the socket is full: the rest waits in the Writer's buffer
    got = b""
    while True:
        pump.run(0.01)
        try:
            theirs.settimeout(0.05)
            got += theirs.recv(1 << 20)
        except socket.timeout:
            if pump.target_pending == 0:
                break
    frames = [f for f in frames_of(got) if f.opcode == tap.OP_ADDQ]
    assert [(f.key, f.value) for f in frames] == records


def test_bad_arguments_are_refused(tap, target):
    ours, _ = target
    w = _writer(tap)
    with pytest.raises(ValueError):
        tap.Pump(w, -1)
    with pytest.raises(ValueError):
        tap.Pump(w, ours.fileno(), window_bytes=0)
    with pytest.raises(TypeError):
        tap.Pump(None, ours.fileno())


def test_a_signal_handler_runs_during_the_wait_and_what_it_raises_ends_the_run(tap, target):
    ours, _ = target
    pump = tap.Pump(_writer(tap), ours.fileno())

    class Alarm(Exception):
        pass

    def on_alarm(signum, frame):
        raise Alarm()

    old = signal.signal(signal.SIGALRM, on_alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        with pytest.raises(Alarm):
            pump.run(30)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_compiled_pump_returns_at_a_signal_whose_handler_did_not_raise(tap, target):
    if tap.Pump.__module__ == "astaire._tap_py":
        pytest.skip("the pure Pump's poll is retried after a handler (PEP 475): it returns at its deadline")
    ours, _ = target
    pump = tap.Pump(_writer(tap), ours.fileno())
    seen = []
    old = signal.signal(signal.SIGALRM, lambda signum, frame: seen.append(signum))
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        assert pump.run(30) == tap.PUMP_SIGNAL
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert seen == [signal.SIGALRM]
