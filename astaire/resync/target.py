"""The target side: the resync tag in the local memcached.

``astaire\\\\tag`` = ``{}`` (flags 0, no expiry) is set after every resync and read every
10 s: a missing tag means the local memcached restarted and lost its data. Both operations
use the binary protocol with vbucket 0 in the header (the Clearwater fork answers
NOT_MY_VBUCKET otherwise) and fail with a ``TargetError`` that names the server.
"""
from __future__ import annotations

import struct

from astaire import codec
from astaire.client import BinaryClient, ClientError, text

TAG_KEY = b"astaire\\\\tag"
TAG_VALUE = b"{}"

STATUS_KEY_ENOENT = 0x0001

TargetError = ClientError  # the target could not be reached, timed out, or answered something unusable


def _tag_request(target: str, request: bytes, opcode: int, timeout: float, what: str):
    try:
        client = BinaryClient(target, timeout, role="target")
    except ClientError as e:
        raise TargetError(f"{what}: {e}") from e
    with client:
        return client.request(request, opcode, what)


def set_tag(target: str, timeout: float = 5.0) -> None:
    """Store ``astaire\\\\tag`` = ``{}`` (flags 0, no expiry) in the target."""
    request = codec.encode_request(codec.OP_SET, key=TAG_KEY, value=TAG_VALUE,
                                   extras=struct.pack(">II", 0, 0), vbucket=0)
    frame = _tag_request(target, request, codec.OP_SET, timeout, "setting the tag")
    if frame.status != 0:
        raise TargetError(f"setting the tag: target {target} answered status 0x{frame.status:04x}"
                          f" ({text(frame.value)})")


def tag_present(target: str, timeout: float = 5.0) -> bool:
    """Whether the target holds the tag (False means the local memcached lost its data)."""
    request = codec.encode_request(codec.OP_GET, key=TAG_KEY, vbucket=0)
    frame = _tag_request(target, request, codec.OP_GET, timeout, "reading the tag")
    if frame.status == 0:
        return True
    if frame.status == STATUS_KEY_ENOENT:
        return False
    raise TargetError(f"reading the tag: target {target} answered status 0x{frame.status:04x}"
                      f" ({text(frame.value)})")
