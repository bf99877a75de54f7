"""The resync tag in the local memcached: set, read, and clear errors when the target misbehaves."""
from __future__ import annotations

import socket
import struct
import threading
import time

import pytest

from astaire.resync import target
from astaire.demo.localcluster import free_port
from tests.test_stream_tap import mc_get_many

HEADER = struct.Struct(">BBHBBHIIQ")


class OneShotServer:
    """Accepts connections and answers every request with ``reply(header, body)`` (None: say nothing, close)."""

    def __init__(self, reply):
        self.reply = reply
        self.requests: list[tuple] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.name = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except socket.timeout:
                continue
            with conn:
                conn.settimeout(2)
                try:
                    header = HEADER.unpack(self._exact(conn, 24))
                    body = self._exact(conn, header[6])
                except (OSError, EOFError):
                    continue
                self.requests.append((header, body))
                answer = self.reply(header, body)
                if answer is not None:
                    conn.sendall(answer)
                    time.sleep(0.2)

    @staticmethod
    def _exact(conn, n):
        buf = b""
        while len(buf) < n:
            more = conn.recv(n - len(buf))
            if not more:
                raise EOFError
            buf += more
        return buf

    def close(self):
        self.stopping.set()
        self.thread.join(5)
        self.listener.close()


def response(opcode, status=0, value=b"", extras=b""):
    return HEADER.pack(0x81, opcode, 0, len(extras), 0, status, len(extras) + len(value), 0, 0) + extras + value


@pytest.fixture
def fake():
    servers = []

    def make(reply):
        servers.append(OneShotServer(reply))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def test_tag_is_absent_on_a_fresh_memcached_and_present_once_set(memcached):
    assert target.tag_present(memcached.name) is False
    target.set_tag(memcached.name)
    assert target.tag_present(memcached.name) is True


def test_tag_is_an_empty_json_object_with_flags_0_and_no_expiry(memcached):
    target.set_tag(memcached.name)
    assert mc_get_many(memcached, [b"astaire\\\\tag"]) == {b"astaire\\\\tag": (b"{}", 0, -1)}


def test_tag_is_gone_after_memcached_restarts(memcached):
    target.set_tag(memcached.name)
    memcached.restart()
    assert target.tag_present(memcached.name) is False


def test_tag_requests_are_binary_with_vbucket_0(fake):
    server = fake(lambda h, b: response(h[1]))
    target.set_tag(server.name)
    assert target.tag_present(server.name) is True
    (set_h, set_b), (get_h, get_b) = server.requests
    assert (set_h[0], set_h[1], set_h[5]) == (0x80, 0x01, 0)
    assert set_b == struct.pack(">II", 0, 0) + b"astaire\\\\tag" + b"{}"
    assert (get_h[0], get_h[1], get_h[5], get_b) == (0x80, 0x00, 0, b"astaire\\\\tag")


def test_refused_write_is_a_clear_error(fake):
    server = fake(lambda h, b: response(h[1], 0x0007, b"Not my vbucket"))
    with pytest.raises(target.TargetError, match=r"setting the tag: target .* status 0x0007 \(Not my vbucket\)"):
        target.set_tag(server.name)
    with pytest.raises(target.TargetError, match="reading the tag"):
        target.tag_present(server.name)


def test_unreachable_target_is_a_clear_error():
    name = f"127.0.0.1:{free_port()}"
    with pytest.raises(target.TargetError, match=f"cannot connect to target {name}"):
        target.set_tag(name, timeout=1)
    with pytest.raises(target.TargetError, match=f"cannot connect to target {name}"):
        target.tag_present(name, timeout=1)


def test_silent_target_times_out(fake):
    server = fake(lambda h, b: (time.sleep(1.5), None)[1])
    t0 = time.monotonic()
    with pytest.raises(target.TargetError, match="did not answer within 0.3 s"):
        target.tag_present(server.name, timeout=0.3)
    assert time.monotonic() - t0 < 1.4


def test_target_closing_without_answer_is_a_clear_error(fake):
    server = fake(lambda h, b: None)
    with pytest.raises(target.TargetError, match="closed the connection without answering"):
        target.set_tag(server.name)


def test_garbage_answer_is_a_clear_error(fake):
    server = fake(lambda h, b: b"ERROR\r\n")
    with pytest.raises(target.TargetError, match="broke the binary protocol"):
        target.tag_present(server.name)


def test_malformed_name_is_a_clear_error():
    with pytest.raises(target.TargetError, match="not HOST:PORT"):
        target.set_tag("nonsense")
