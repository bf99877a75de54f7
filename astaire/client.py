"""A small blocking binary-protocol memcached client for everything off the hot path: the
resync tag, VERSION and STAT, and loading or reading back test and demo workloads.

The hot path (streams) uses its own non-blocking pipelines in ``astaire.resync.stream``;
this client only opens the connection the same way (``connect``). Requests carry vbucket
0 in the header (the Clearwater fork answers NOT_MY_VBUCKET otherwise), and only the
binary protocol is used: the text ``stats`` command crashes the fork.

Errors are ``ClientError`` (an OSError) with a message that names the server and says what
was being done; ``reason`` turns any socket error into a short phrase for such messages.
"""
from __future__ import annotations

import socket

from astaire import codec
from astaire.cluster.settings import parse_server
from astaire.protocol_errors import ProtocolError

MAX_ANSWER = 1 << 20  # bytes: a single answer larger than this is not a memcached answer
OP_STAT = 0x10  # binary STAT: the only statistics request the Clearwater fork survives


class ClientError(OSError):
    """The server could not be reached, timed out, or answered something unusable."""


def reason(e: BaseException) -> str:
    """A short phrase for ``e``: "timed out", the OS's error text, or the message."""
    if isinstance(e, socket.timeout):
        return "timed out"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


def connect(server: str, timeout: float) -> socket.socket:
    """A blocking TCP connection to ``server`` ("host:port") with ``timeout`` on every call.

    Nagle stays on (TCP_NODELAY off): the connections carry bulk pipelined frames.
    Raises OSError (ValueError for a malformed name).
    """
    host, port = parse_server(server)
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)
    except OSError:
        pass
    return sock


class BinaryClient:
    """One blocking binary-protocol connection to ``server``; ``role`` names it in errors
    ("target", "source", "server")."""

    def __init__(self, server: str, timeout: float = 30.0, role: str = "server"):
        self.server, self.timeout, self.role = server, timeout, role
        self.parser = codec.FrameParser(MAX_ANSWER)
        try:
            self.sock = connect(server, timeout)
        except (OSError, ValueError) as e:
            raise ClientError(f"cannot connect to {role} {server}: {reason(e)}") from e

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "BinaryClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _frames(self, what: str):
        """Frames as they arrive; ClientError on EOF, timeout, or broken framing."""
        try:
            while True:
                yield from self.parser
                data = self.sock.recv(1 << 18)
                if not data:
                    raise ClientError(f"{what}: {self.role} {self.server} closed the connection without answering")
                self.parser.feed(data)
        except socket.timeout as e:
            raise ClientError(f"{what}: {self.role} {self.server} did not answer within {self.timeout:g} s") from e
        except ProtocolError as e:
            raise ClientError(f"{what}: {self.role} {self.server} broke the binary protocol: {e}") from e
        except OSError as e:
            if isinstance(e, ClientError):
                raise
            raise ClientError(f"{what}: {self.role} {self.server}: {reason(e)}") from e

    def _send(self, data: bytes, what: str) -> None:
        try:
            self.sock.sendall(data)
        except OSError as e:
            raise ClientError(f"{what}: {self.role} {self.server}: {reason(e)}") from e

    def request(self, request: bytes, opcode: int, what: str):
        """Send one request and return its response frame (any status)."""
        self._send(request, what)
        for frame in self._frames(what):
            if frame.magic != 0x81 or frame.opcode != opcode:
                raise ClientError(f"{what}: {self.role} {self.server} sent an unexpected frame "
                                  f"(magic 0x{frame.magic:02x}, opcode 0x{frame.opcode:02x})")
            return frame

    def round_trip(self, requests: bytes, fence_opaque: int = 0xFFFFFFFF, what: str = "pipelined requests") -> list:
        """Send ``requests`` + a NOOP fence; return every response before the fence."""
        self._send(requests + codec.encode_noop(fence_opaque), what)
        responses = []
        for frame in self._frames(what):
            if frame.opcode == codec.OP_NOOP and frame.opaque == fence_opaque:
                return responses
            responses.append(frame)

    def version(self) -> str:
        frame = self.request(codec.encode_version(), codec.OP_VERSION, "asking VERSION")
        if frame.status != 0:
            raise ClientError(f"asking VERSION: {self.role} {self.server} answered status 0x{frame.status:04x}")
        return bytes(frame.value).decode("ascii", "replace")

    def stats(self) -> dict[str, str]:
        """The general statistics, over binary STAT (opcode 0x10): one frame per statistic,
        ended by one with an empty key."""
        what = "asking STAT"
        self._send(codec.encode_request(OP_STAT, vbucket=0), what)
        result: dict[str, str] = {}
        for frame in self._frames(what):
            if frame.magic != 0x81 or frame.opcode != OP_STAT:
                raise ClientError(f"{what}: {self.role} {self.server} sent an unexpected frame "
                                  f"(opcode 0x{frame.opcode:02x})")
            if frame.status != 0:
                raise ClientError(f"{what}: {self.role} {self.server} answered status 0x{frame.status:04x}")
            if not frame.key:
                return result
            result[bytes(frame.key).decode("ascii", "replace")] = bytes(frame.value).decode("ascii", "replace")


def text(value) -> str:
    """A server's message bytes as printable text, cut short."""
    return bytes(value).decode("utf-8", "replace")[:200]
