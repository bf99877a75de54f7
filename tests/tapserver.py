"""A fake TAP server that speaks as docs/compatibility.md describes Project Clearwater's memcached fork.

Stock memcached has no TAP, so this is the one fake the tests use. It is written
independently of ``astaire.codec`` (plain ``struct``) so that it checks the codec rather
than sharing its mistakes.

On ``TAP_CONNECT`` (0x40) it sends every item it holds, in insertion order, as
``TAP_MUTATION`` (0x41) *requests*: magic 0x80, vbucket field 0, header CAS = the item's
CAS, 16 bytes of extras (engine-specific length 0, TAP flags 0, TTL 0xff, 3 reserved,
item flags, absolute expiration), then key and value. It ignores the vbucket list it was
sent (but records it), and then closes the connection with nothing else sent.

Fault injection (constructor keywords, or attributes set before the client connects):

- ``die_after=N``: send N mutations, then reset the connection (SO_LINGER 0 + close).
- ``cut_mid_frame_after=N``: send N mutations and half of the next frame, then close.
- ``garbage_after=N``: send N mutations, then a frame whose magic byte is wrong, then close.
- ``interleave_other_opcodes=True``: send one of each of 0x42..0x47, with plausible
  bodies, before the first mutation and again every ``interleave_every`` mutations.
- ``no_tap=True``: answer TAP_CONNECT as stock memcached does (magic 0x81, opcode 0x40,
  status 0x0081, empty body) and keep the connection open.
- ``delay_per_frame=s``: sleep this long before each frame (a slow stream).

Early closes (the fork's defect: a client that closes a TAP stream before the server does can
crash it) are recorded, never caused: ``client_closed_early`` counts dumps whose client closed
(FIN or RST) before the server's close, or reset the connection after it with bytes still
unread (a client that reads to the end closes with a clean FIN); ``early_closes`` says how
many mutations had been sent each time. The server's close is a FIN after the last frame, as
before; the connection is then kept until the client closes too (or ``close_wait`` s).

Binary NOOP and VERSION are answered; any other request gets UNKNOWN_COMMAND. A connection
whose first byte is not the binary request magic speaks text, as on the real fork
(memcached fixes a connection's protocol at its first byte): ``version`` is answered
``VERSION <version>``, ``stats`` (which crashes the real fork) is counted in ``text_stats``
and the connection is dropped, and every other command gets ``ERROR`` (the fork has no meta
commands and no LRU crawler).

Run it standalone (``python tests/tapserver.py --generate 1000000``) to serve generated
items from a separate process, e.g. for throughput measurements.
"""
from __future__ import annotations

import argparse
import itertools
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

HEADER = struct.Struct(">BBHBBHIIQ")
MUTATION_EXTRAS = struct.Struct(">HHB3xII")
OTHER_EXTRAS = struct.Struct(">HHB3x")  # delete/flush/opaque/vbucket-set/checkpoints

MAGIC_REQ = 0x80
MAGIC_RES = 0x81
OP_NOOP = 0x0A
OP_VERSION = 0x0B
OP_TAP_CONNECT = 0x40
OP_TAP_MUTATION = 0x41
OP_TAP_DELETE = 0x42
OP_TAP_FLUSH = 0x43
OP_TAP_OPAQUE = 0x44
OP_TAP_VBUCKET_SET = 0x45
OP_TAP_CHECKPOINT_START = 0x46
OP_TAP_CHECKPOINT_END = 0x47
STATUS_UNKNOWN_COMMAND = 0x0081

TAP_FLAG_BACKFILL = 0x01
TAP_FLAG_LIST_VBUCKETS = 0x04

VERSION = b"1.4.15-clearwater"

Item = tuple  # (key, value, flags, expiration, cas)


@dataclass(frozen=True)
class TapConnect:
    """What one client asked for in its TAP_CONNECT."""

    flags: int
    vbuckets: tuple[int, ...] | None  # None when LIST_VBUCKETS was not set
    name: bytes


def mutation_frame(key: bytes, value: bytes, flags: int, expiration: int, cas: int) -> bytes:
    extras = MUTATION_EXTRAS.pack(0, 0, 0xFF, flags, expiration)
    header = HEADER.pack(MAGIC_REQ, OP_TAP_MUTATION, len(key), len(extras), 0, 0,
                         len(extras) + len(key) + len(value), 0, cas)
    return header + extras + key + value


def request_frame(opcode: int, extras: bytes = b"", key: bytes = b"", value: bytes = b"", cas: int = 0) -> bytes:
    header = HEADER.pack(MAGIC_REQ, opcode, len(key), len(extras), 0, 0,
                         len(extras) + len(key) + len(value), 0, cas)
    return header + extras + key + value


def response_frame(opcode: int, status: int = 0, value: bytes = b"", opaque: int = 0) -> bytes:
    return HEADER.pack(MAGIC_RES, opcode, 0, 0, 0, status, len(value), opaque, 0) + value


def other_tap_frames(n: int) -> list[bytes]:
    """One frame of each non-mutation TAP opcode, as a TAP producer would send them."""
    extras = OTHER_EXTRAS.pack(0, 0, 0xFF)
    return [
        request_frame(OP_TAP_DELETE, extras, key=b"other\\\\deleted-%d" % n),
        request_frame(OP_TAP_FLUSH, extras),
        request_frame(OP_TAP_OPAQUE, extras, value=struct.pack(">I", 0x00000002)),  # "open checkpoint"
        request_frame(OP_TAP_VBUCKET_SET, extras, value=struct.pack(">I", 1)),       # vbucket_state_active
        request_frame(OP_TAP_CHECKPOINT_START, extras, value=struct.pack(">Q", n + 1)),
        request_frame(OP_TAP_CHECKPOINT_END, extras, value=struct.pack(">Q", n + 1)),
    ]


def parse_tap_connect(extras: bytes, key: bytes, value: bytes) -> TapConnect:
    flags = struct.unpack(">I", extras[:4])[0] if len(extras) >= 4 else 0
    body = value
    if flags & TAP_FLAG_BACKFILL:
        body = body[8:]
    vbuckets = None
    if flags & TAP_FLAG_LIST_VBUCKETS and len(body) >= 2:
        count = struct.unpack(">H", body[:2])[0]
        vbuckets = struct.unpack(">%dH" % count, body[2:2 + 2 * count])
    return TapConnect(flags, vbuckets, key)


class TapServer:
    """A threaded fake of the Clearwater fork's TAP producer on 127.0.0.1, port chosen by the OS."""

    def __init__(self, *, die_after: int | None = None, cut_mid_frame_after: int | None = None,
                 garbage_after: int | None = None, interleave_other_opcodes: bool = False,
                 interleave_every: int = 7, no_tap: bool = False, delay_per_frame: float = 0.0,
                 items: Callable[[], Iterable[Item]] | None = None, batch_bytes: int = 256 * 1024):
        self.die_after = die_after
        self.cut_mid_frame_after = cut_mid_frame_after
        self.garbage_after = garbage_after
        self.interleave_other_opcodes = interleave_other_opcodes
        self.interleave_every = interleave_every
        self.no_tap = no_tap
        self.delay_per_frame = delay_per_frame
        self.batch_bytes = batch_bytes
        self._generator = items  # a callable returning a fresh iterable of items per stream
        self._items: dict[bytes, Item] = {}
        self._next_cas = itertools.count(1)
        self._lock = threading.Lock()
        self.connects: list[TapConnect] = []
        self.streams_completed = 0  # dumps sent in full and closed by the server
        self.client_closed_early = 0  # clients that closed before the server did (or left bytes unread)
        self.early_closes: list[tuple[int, str]] = []  # (mutations sent, how) per early close
        self.client_bytes_during_dump = 0  # bytes a client sent after TAP_CONNECT (read, dropped)
        self.close_wait = 60.0  # seconds to wait for the client's own close after the server's
        self.errors: list[str] = []
        self.text_commands: list[bytes] = []  # text commands received, in order
        self.text_stats = 0  # text ``stats`` requests: each would have crashed the real fork
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._conns: set[socket.socket] = set()
        self._stopping = threading.Event()
        self.host = "127.0.0.1"
        self.port = 0

    @property
    def name(self) -> str:
        return f"{self.host}:{self.port}"

    # -- items ---------------------------------------------------------------------------

    def put(self, key: bytes, value: bytes, flags: int = 0, expiration: int = 0, cas: int | None = None) -> None:
        with self._lock:
            self._items[key] = (key, value, flags, expiration, next(self._next_cas) if cas is None else cas)

    def items(self) -> list[Item]:
        with self._lock:
            return list(self._items.values())

    def _stream_items(self) -> Iterator[Item]:
        if self._generator is not None:
            return iter(self._generator())
        return iter(self.items())

    # -- life cycle ----------------------------------------------------------------------

    def start(self) -> "TapServer":
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        listener.listen(64)
        listener.settimeout(0.1)
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._stopping.clear()
        t = threading.Thread(target=self._accept_loop, name=f"tapserver-accept-{self.port}", daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._threads:
            self._threads[0].join(timeout=5)  # the accept loop: no connection threads after this
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in list(self._threads):
            t.join(timeout=5)
        self._threads = [t for t in self._threads if t.is_alive()]
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._threads:
            raise RuntimeError(f"tapserver threads did not stop: {self._threads}")

    def __enter__(self) -> "TapServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- serving -------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            conn.settimeout(0.1)
            with self._lock:
                self._conns.add(conn)
            t = threading.Thread(target=self._serve, args=(conn,), name=f"tapserver-conn-{self.port}", daemon=True)
            self._threads.append(t)
            t.start()

    def _peek(self, conn: socket.socket) -> int | None:
        """The connection's first byte, left unread (None if the client went away first)."""
        while not self._stopping.is_set():
            try:
                b = conn.recv(1, socket.MSG_PEEK)
            except socket.timeout:
                continue
            except OSError:
                return None
            return b[0] if b else None
        return None

    def _recv_exact(self, conn: socket.socket, n: int) -> bytes | None:
        buf = bytearray()
        while len(buf) < n:
            if self._stopping.is_set():
                return None
            try:
                chunk = conn.recv(n - len(buf))
            except socket.timeout:
                continue
            except OSError:
                return None
            if not chunk:
                return None
            buf += chunk
        return bytes(buf)

    def _serve_text(self, conn: socket.socket) -> None:
        buf = b""
        while not self._stopping.is_set():
            while b"\n" not in buf:
                try:
                    chunk = conn.recv(4096)
                except socket.timeout:
                    if self._stopping.is_set():
                        return
                    continue
                if not chunk:
                    return
                buf += chunk
            line, buf = buf.split(b"\n", 1)
            command = line.rstrip(b"\r")
            with self._lock:
                self.text_commands.append(command)
            if command.split(b" ", 1)[0] == b"stats":
                self.text_stats += 1  # the real fork crashes here
                return
            conn.sendall(b"VERSION " + VERSION + b"\r\n" if command == b"version" else b"ERROR\r\n")

    def _serve(self, conn: socket.socket) -> None:
        close_quietly = True
        try:
            first = self._peek(conn)
            if first is not None and first != MAGIC_REQ:
                self._serve_text(conn)
                return
            while not self._stopping.is_set():
                header = self._recv_exact(conn, HEADER.size)
                if header is None:
                    return
                magic, opcode, keylen, extlen, _dt, _vb, bodylen, opaque, _cas = HEADER.unpack(header)
                if magic != MAGIC_REQ:  # e.g. a text command: hang up rather than wait for a "body"
                    self.errors.append(f"bad magic 0x{magic:02x} from client")
                    return
                body = self._recv_exact(conn, bodylen) if bodylen else b""
                if body is None:
                    return
                extras, key, value = body[:extlen], body[extlen:extlen + keylen], body[extlen + keylen:]
                if opcode == OP_NOOP:
                    conn.sendall(response_frame(OP_NOOP, opaque=opaque))
                elif opcode == OP_VERSION:
                    conn.sendall(response_frame(OP_VERSION, value=VERSION, opaque=opaque))
                elif opcode == OP_TAP_CONNECT:
                    with self._lock:
                        self.connects.append(parse_tap_connect(extras, key, value))
                    if self.no_tap:
                        conn.sendall(response_frame(OP_TAP_CONNECT, STATUS_UNKNOWN_COMMAND, opaque=opaque))
                        continue
                    close_quietly = self._dump(conn)
                    return
                else:
                    conn.sendall(response_frame(opcode, STATUS_UNKNOWN_COMMAND, opaque=opaque))
        except OSError as e:
            if not self._stopping.is_set():
                self.errors.append(f"connection error: {e}")
        finally:
            with self._lock:
                self._conns.discard(conn)
            if close_quietly:
                conn.close()

    def _frames(self) -> Iterator[tuple[str, bytes]]:
        """(kind, frame) pairs of one dump, faults included; kind is "mutation" or "other"."""
        sent = 0
        for item in self._stream_items():
            if self.interleave_other_opcodes and sent % self.interleave_every == 0:
                for f in other_tap_frames(sent):
                    yield "other", f
            yield "mutation", mutation_frame(*item)
            sent += 1

    def _client_gone(self, conn: socket.socket, wait: float = 0.0) -> str | None:
        """How the client closed ("fin", "reset"), or None while it is still there. Bytes it
        sent meanwhile are read and dropped (counted in ``client_bytes_during_dump``)."""
        try:
            readable, _, _ = select.select([conn], [], [], wait)
        except (OSError, ValueError):
            return "reset"
        if not readable:
            return None
        try:
            data = conn.recv(65536)
        except OSError:
            return "reset"
        if not data:
            return "fin"
        self.client_bytes_during_dump += len(data)
        return None

    def _early(self, mutations: int, how: str) -> bool:
        with self._lock:
            self.client_closed_early += 1
            self.early_closes.append((mutations, how))
        return True

    def _await_client_close(self, conn: socket.socket, mutations: int) -> None:
        """After the server's close (FIN): a client that read everything closes cleanly; one
        that closes with bytes unread makes its kernel send a reset."""
        try:
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            return
        deadline = time.monotonic() + self.close_wait
        while not self._stopping.is_set() and time.monotonic() < deadline:
            how = self._client_gone(conn, 0.1)
            if how == "reset":
                self._early(mutations, "reset after the server's close, bytes unread")
                return
            if how == "fin":
                return

    def _dump(self, conn: socket.socket) -> bool:
        """Send one dump; returns False when the connection was already closed here (reset)."""
        conn.settimeout(None)
        mutations = 0
        batch = bytearray()
        faults = any(x is not None for x in (self.die_after, self.cut_mid_frame_after, self.garbage_after))

        def flush() -> None:
            if batch:
                conn.sendall(batch)
                batch.clear()

        try:
            for kind, frame in self._frames():
                if self._stopping.is_set():
                    return True
                if kind == "mutation":
                    if self.die_after is not None and mutations >= self.die_after:
                        flush()
                        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        conn.close()
                        return False
                    if self.cut_mid_frame_after is not None and mutations >= self.cut_mid_frame_after:
                        batch += frame[: max(1, len(frame) // 2)]
                        flush()
                        return True
                    if self.garbage_after is not None and mutations >= self.garbage_after:
                        batch += b"\x99" + frame[1:]
                        flush()
                        return True
                    mutations += 1
                if self.delay_per_frame:
                    flush()
                    until = time.monotonic() + self.delay_per_frame
                    while (left := until - time.monotonic()) > 0 and not self._stopping.is_set():
                        how = self._client_gone(conn, min(left, 0.1))
                        if how:
                            return self._early(mutations, f"{how} mid-dump")
                    if self._stopping.is_set():
                        return True
                    conn.sendall(frame)
                else:
                    batch += frame
                    if len(batch) >= self.batch_bytes or faults:
                        flush()
                        how = self._client_gone(conn)
                        if how:
                            return self._early(mutations, f"{how} mid-dump")
            flush()
            how = self._client_gone(conn)
            if how:
                return self._early(mutations, f"{how} before the server's close")
            # The dump ends with the server's close; "nothing sent before the close".
            self.streams_completed += 1
            self._await_client_close(conn, mutations)
            return True
        except (BrokenPipeError, ConnectionResetError):
            return self._early(mutations, "reset mid-dump")


def _generated(count: int, value_size: int) -> Callable[[], Iterator[Item]]:
    def gen() -> Iterator[Item]:
        value = b"v" * value_size
        for i in range(count):
            yield (b"bench\\\\key-%08d" % i, value, (1_700_000_000_000 + i) & 0xFFFFFFFF, 0, i + 1)
    return gen


def main() -> None:
    ap = argparse.ArgumentParser(description="fake Clearwater TAP server (tests/bench only)")
    ap.add_argument("--generate", type=int, default=0, help="serve this many generated items")
    ap.add_argument("--value-size", type=int, default=100)
    args = ap.parse_args()
    server = TapServer(items=_generated(args.generate, args.value_size)).start()
    print(server.port, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
