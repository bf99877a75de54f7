"""The fake TAP server sends what docs/compatibility.md says the Clearwater fork sends, byte for byte."""
from __future__ import annotations

import socket
import struct
import threading
import time

import pytest

from tests.tapserver import HEADER, TapConnect, TapServer

# The raw frame observed from the fork (layout: docs/compatibility.md): key tapcheck:0000, flags 0xa5000000,
# expiration 0x6b04d198, CAS 1, value "value-0000-".
OBSERVED = bytes.fromhex(
    "8041000d100000000000002800000000000000000000000100000000ff000000a50000006b04d198"
    "746170636865636b3a3030303076616c75652d303030302d"
)


def tap_connect(flags: int = 0x02, vbuckets: list[int] | None = None, name: bytes = b"") -> bytes:
    body = b""
    if vbuckets is not None:
        flags |= 0x04
        body = struct.pack(">H%dH" % len(vbuckets), len(vbuckets), *vbuckets)
    extras = struct.pack(">I", flags)
    return HEADER.pack(0x80, 0x40, len(name), 4, 0, 0, 4 + len(name) + len(body), 0, 0) + extras + name + body


def request(opcode: int, opaque: int = 0) -> bytes:
    return HEADER.pack(0x80, opcode, 0, 0, 0, 0, 0, opaque, 0)


def read_to_close(sock: socket.socket, timeout: float = 5.0) -> tuple[bytes, str]:
    """Everything until the server closes; and how it closed: "eof" or "reset"."""
    sock.settimeout(timeout)
    data = bytearray()
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return bytes(data), "reset"
        if not chunk:
            return bytes(data), "eof"
        data += chunk


def split_frames(data: bytes) -> tuple[list[tuple], bytes]:
    """(magic, opcode, keylen, extlen, status/vbucket, opaque, cas, extras, key, value) tuples and the leftover."""
    frames, off = [], 0
    while len(data) - off >= 24:
        magic, opcode, keylen, extlen, _dt, vb, bodylen, opaque, cas = HEADER.unpack_from(data, off)
        if len(data) - off < 24 + bodylen:
            break
        body = data[off + 24: off + 24 + bodylen]
        frames.append((magic, opcode, keylen, extlen, vb, opaque, cas,
                       body[:extlen], body[extlen:extlen + keylen], body[extlen + keylen:]))
        off += 24 + bodylen
    return frames, data[off:]


def dump(server: TapServer, connect: bytes | None = None) -> tuple[bytes, str]:
    with socket.create_connection((server.host, server.port), timeout=5) as s:
        s.sendall(connect if connect is not None else tap_connect())
        return read_to_close(s)


def dump_items(values: list[bytes], **faults) -> tuple[list[tuple], bytes, str]:
    """Items k0, k1, ... with ``values`` in a TapServer with ``faults``, dumped once:
    (whole frames, the leftover bytes, how the server ended the stream)."""
    with TapServer(**faults) as server:
        for i, value in enumerate(values):
            server.put(b"k%d" % i, value)
        data, how = dump(server)
    frames, rest = split_frames(data)
    return frames, rest, how


def test_mutation_matches_the_observed_fork_frame_byte_for_byte():
    with TapServer() as server:
        server.put(b"tapcheck:0000", b"value-0000-", 0xA5000000, 0x6B04D198, cas=1)
        data, how = dump(server)
    assert len(OBSERVED) == 64
    assert data == OBSERVED
    assert how == "eof"


def test_dump_sends_every_item_whatever_the_vbucket_list_then_closes_with_nothing_else():
    with TapServer() as server:
        for i in range(50):
            server.put(b"t\\\\k%d" % i, b"v" * i, i, 0)
        data, how = dump(server, tap_connect(vbuckets=[3, 9]))
        assert server.connects == [TapConnect(0x06, (3, 9), b"")]
        assert server.streams_completed == 1
    frames, rest = split_frames(data)
    assert how == "eof" and rest == b""
    assert [f[8] for f in frames] == [b"t\\\\k%d" % i for i in range(50)]
    for i, (magic, opcode, keylen, extlen, vb, opaque, cas, extras, key, value) in enumerate(frames):
        assert (magic, opcode, extlen, vb) == (0x80, 0x41, 16, 0)
        assert struct.unpack(">HHB3xII", extras) == (0, 0, 0xFF, i, 0)
        assert value == b"v" * i
        assert cas == i + 1  # CAS counts up from 1 when the test gives none


def test_tap_connect_is_recorded_with_flags_name_and_no_list():
    with TapServer() as server:
        dump(server, tap_connect(0x02, None, b"astaire"))
        assert server.connects == [TapConnect(0x02, None, b"astaire")]


def test_empty_server_closes_at_once():
    with TapServer() as server:
        assert dump(server) == (b"", "eof")


def test_noop_and_version_are_answered_and_other_opcodes_get_unknown_command():
    with TapServer() as server, socket.create_connection((server.host, server.port), timeout=5) as s:
        s.sendall(request(0x0A, opaque=7) + request(0x0B, opaque=8) + request(0x01, opaque=9))
        data = bytearray()
        while True:
            frames, _ = split_frames(bytes(data))
            if len(frames) == 3:
                break
            data += s.recv(4096)
    assert [(f[0], f[1], f[4], f[5]) for f in frames] == [
        (0x81, 0x0A, 0, 7), (0x81, 0x0B, 0, 8), (0x81, 0x01, 0x0081, 9)]
    assert frames[1][9].startswith(b"1.4")


def test_no_tap_answers_like_stock_memcached():
    with TapServer(no_tap=True) as server, socket.create_connection((server.host, server.port), timeout=5) as s:
        server.put(b"k", b"v")
        s.sendall(tap_connect(vbuckets=[1]))
        reply = b""
        while len(reply) < 24:
            reply += s.recv(24 - len(reply))
    assert reply == bytes.fromhex("81400000000000810000000000000000" "0000000000000000")


def test_die_after_resets_the_connection_after_n_mutations():
    frames, rest, how = dump_items([b"v"] * 10, die_after=3)
    assert how == "reset"
    assert len(frames) <= 3 and rest == b""  # a reset may discard what was still in flight


def test_cut_mid_frame_closes_with_half_a_frame_buffered():
    frames, rest, how = dump_items([b"value-%d" % i for i in range(5)], cut_mid_frame_after=2)
    assert how == "eof" and len(frames) == 2 and 0 < len(rest) < 24 + 16 + 2 + 7


def test_garbage_after_sends_a_frame_with_a_bad_magic():
    frames, rest, how = dump_items([b"v"] * 3, garbage_after=1)
    assert how == "eof"
    assert [f[0] for f in frames] == [0x80, 0x99]


def test_interleave_sends_every_other_tap_opcode_among_the_mutations():
    frames, rest, _ = dump_items([b"v"] * 5, interleave_other_opcodes=True, interleave_every=2)
    assert rest == b""
    opcodes = [f[1] for f in frames]
    assert opcodes.count(0x41) == 5
    assert set(opcodes) == {0x41, 0x42, 0x43, 0x44, 0x45, 0x46, 0x47}
    assert all(f[0] == 0x80 and f[3] == 8 for f in frames if f[1] != 0x41)


def test_delay_per_frame_slows_the_stream_and_stop_ends_it():
    with TapServer(delay_per_frame=0.05) as server:
        for i in range(100):
            server.put(b"k%d" % i, b"v")
        s = socket.create_connection((server.host, server.port), timeout=5)
        s.sendall(tap_connect())
        time.sleep(0.3)
        s.settimeout(0.5)
        got = s.recv(65536)
        assert 0 < len(split_frames(got)[0]) < 20
        t0 = time.monotonic()
        server.stop()
        assert time.monotonic() - t0 < 2
        s.close()
    assert not [t for t in threading.enumerate() if t.name.startswith(f"tapserver-conn-{server.port}")]


def test_generated_items_stream_without_holding_them():
    def gen():
        for i in range(1000):
            yield (b"g%d" % i, b"x", 0, 0, i + 1)

    with TapServer(items=gen) as server:
        data, how = dump(server)
        data2, _ = dump(server)
    assert how == "eof" and len(split_frames(data)[0]) == 1000 and data2 == data


@pytest.mark.parametrize("n", [0, 1])
def test_stop_is_clean_with_connections_open(n):
    server = TapServer(no_tap=True).start()
    socks = [socket.create_connection((server.host, server.port)) for _ in range(n)]
    server.stop()
    for s in socks:
        s.close()


# -- early closes: recorded, so a test can assert that none happened -------------------------------

def _connected(server: TapServer) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    s.sendall(tap_connect())
    return s


@pytest.mark.parametrize("delay", [0.0, 0.002])
def test_a_client_that_reads_to_the_servers_close_is_not_an_early_close(delay):
    with TapServer(delay_per_frame=delay) as server:
        for i in range(300):
            server.put(b"t\\\\k%d" % i, b"v" * 50)
        with _connected(server) as s:
            data, how = read_to_close(s)
        assert how == "eof"
        time.sleep(0.3)
        assert server.streams_completed == 1
        assert server.client_closed_early == 0 and server.early_closes == []


@pytest.mark.parametrize("delay", [0.0, 0.002])
def test_a_client_that_closes_mid_dump_is_recorded(delay):
    with TapServer(delay_per_frame=delay, batch_bytes=4096) as server:
        # 7.5 MB against a 4 KB receive buffer here and at most 4 MB (tcp_wmem's ceiling) in the
        # server's send buffer: the dump cannot all be sent before the close. (690 KB into
        # default buffers could be, and once was: the stream then counted as completed.)
        for i in range(3000):
            server.put(b"t\\\\k%d" % i, b"v" * 2500)
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: the window follows
        s.settimeout(5)
        s.connect(("127.0.0.1", server.port))
        s.sendall(tap_connect())
        s.recv(100)
        s.close()  # bytes unread: the kernel resets the connection
        deadline = time.monotonic() + 5
        while server.client_closed_early == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.client_closed_early == 1, server.early_closes
        assert server.streams_completed == 0


def test_a_client_that_closes_after_the_servers_close_without_reading_everything_is_recorded():
    with TapServer() as server:
        for i in range(50):
            server.put(b"t\\\\k%d" % i, b"v" * 50)
        s = _connected(server)
        time.sleep(0.3)  # the whole dump (and the server's FIN) is in s's receive buffer, unread
        s.close()
        deadline = time.monotonic() + 5
        while server.client_closed_early == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.streams_completed == 1
        assert server.client_closed_early == 1 and "unread" in server.early_closes[0][1]
