"""The target side: connections to the local memcached, and the resync tag.

Streams write records through ``astaire.stream``; this module opens the connection they
use and owns the tag: ``astaire\\\\tag`` = ``{}`` (flags 0, no expiry), set after every
resync and read every 10 s to notice a local memcached that restarted (and lost its data).
Both tag operations use the binary protocol with vbucket 0 in the header (the Clearwater
fork answers NOT_MY_VBUCKET otherwise) and fail with a ``SinkError`` that names the server.
"""
from __future__ import annotations

import socket
import struct

from astaire import codec
from astaire.config import parse_server
from astaire.protocol_errors import ProtocolError

TAG_KEY = b"astaire\\\\tag"
TAG_VALUE = b"{}"

STATUS_KEY_ENOENT = 0x0001


class SinkError(OSError):
    """The target could not be reached, timed out, or answered something unusable."""


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


def _round_trip(target: str, request: bytes, opcode: int, timeout: float, what: str):
    """Send one binary request, return its response frame; SinkError on any failure."""
    try:
        sock = connect(target, timeout)
    except (OSError, ValueError) as e:
        raise SinkError(f"{what}: cannot connect to target {target}: {_reason(e)}") from e
    parser = codec.FrameParser(1 << 20)
    try:
        with sock:
            sock.sendall(request)
            while True:
                data = sock.recv(65536)
                if not data:
                    raise SinkError(f"{what}: target {target} closed the connection without answering")
                parser.feed(data)
                for frame in parser:
                    if frame.magic != 0x81 or frame.opcode != opcode:
                        raise SinkError(f"{what}: target {target} sent an unexpected frame "
                                        f"(magic 0x{frame.magic:02x}, opcode 0x{frame.opcode:02x})")
                    return frame
    except socket.timeout as e:
        raise SinkError(f"{what}: target {target} did not answer within {timeout:g} s") from e
    except ProtocolError as e:
        raise SinkError(f"{what}: target {target} broke the binary protocol: {e}") from e
    except OSError as e:
        if isinstance(e, SinkError):
            raise
        raise SinkError(f"{what}: target {target}: {_reason(e)}") from e


def set_tag(target: str, timeout: float = 5.0) -> None:
    """Store ``astaire\\\\tag`` = ``{}`` (flags 0, no expiry) in the target."""
    request = codec.encode_request(codec.OP_SET, key=TAG_KEY, value=TAG_VALUE,
                                   extras=struct.pack(">II", 0, 0), vbucket=0)
    frame = _round_trip(target, request, codec.OP_SET, timeout, "setting the tag")
    if frame.status != 0:
        raise SinkError(f"setting the tag: target {target} answered status 0x{frame.status:04x}"
                        f" ({_text(frame.value)})")


def tag_present(target: str, timeout: float = 5.0) -> bool:
    """Whether the target holds the tag (False means the local memcached lost its data)."""
    request = codec.encode_request(codec.OP_GET, key=TAG_KEY, vbucket=0)
    frame = _round_trip(target, request, codec.OP_GET, timeout, "reading the tag")
    if frame.status == 0:
        return True
    if frame.status == STATUS_KEY_ENOENT:
        return False
    raise SinkError(f"reading the tag: target {target} answered status 0x{frame.status:04x}"
                    f" ({_text(frame.value)})")


def _reason(e: BaseException) -> str:
    if isinstance(e, socket.timeout):
        return "timed out"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


def _text(value) -> str:
    return bytes(value).decode("utf-8", "replace")[:200]
