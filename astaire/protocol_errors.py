"""Protocol errors shared by both codec implementations.

Defined once, in a pure module, so that ``except BadMagic`` works whichever codec
(``astaire._tap`` or ``astaire._tap_py``) is loaded.
"""
from __future__ import annotations


class ProtocolError(ValueError):
    """A stream broke the protocol. ``offset`` is the absolute stream offset of the
    offending frame's (or metadump line's) first byte."""

    def __init__(self, problem: str, offset: int):
        self.problem = problem
        self.offset = offset
        super().__init__(f"{problem} at offset {offset}")

    def __reduce__(self):  # keep the two-argument signature through pickling (workers report errors)
        return (type(self), (self.problem, self.offset))


class BadMagic(ProtocolError):
    """The first byte of a frame is neither 0x80 (request) nor 0x81 (response)."""


class BadLengths(ProtocolError):
    """Extras + key (+ TAP engine bytes) are longer than the body."""


class FrameTooLarge(ProtocolError):
    """The header announces a body over the limit (raised before anything is allocated)."""


class TapNotSupported(ProtocolError):
    """The server answered TAP_CONNECT with a response: it has no TAP."""


class UnexpectedFrame(ProtocolError):
    """A frame that has no business on this stream."""


class MalformedFrame(ProtocolError):
    """A frame whose layout is wrong for its opcode (e.g. TAP_MUTATION extras not 16 bytes)."""


class CrawlerBusy(ProtocolError):
    """``lru_crawler metadump`` answered BUSY: another crawl is running; try later."""


class CrawlerError(ProtocolError):
    """``lru_crawler metadump`` answered ERROR / CLIENT_ERROR / SERVER_ERROR, or a line
    that does not parse."""


__all__ = [
    "ProtocolError",
    "BadMagic",
    "BadLengths",
    "FrameTooLarge",
    "TapNotSupported",
    "UnexpectedFrame",
    "MalformedFrame",
    "CrawlerBusy",
    "CrawlerError",
]
