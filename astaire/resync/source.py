"""The source side: an old replica streamed over TAP (Clearwater fork) or the LRU crawler (stock).

Everything here runs before the bulk transfer starts, on blocking sockets with timeouts,
and hands ``astaire.resync.stream`` connected sockets plus any bytes already read from them.

TAP: one connection, one ``TAP_CONNECT`` (DUMP, LIST_VBUCKETS), then the server sends its
whole dump and closes. The fork ignores the vbucket list; the Writer filters.

Telling TAP from stock memcached (docs/compatibility.md, "Telling the two apart"): the
crawler's fetch connection opens with ``version`` and ``mn`` (the meta no-op) pipelined. Stock
memcached answers ``MN``: it is streamed with the crawler, and nothing else is asked. The
Clearwater fork has no meta commands and answers ``ERROR``, which leaves that text connection
healthy; it is closed, and the fork is streamed over TAP. So the common case costs no extra
round trip, and no binary frame ever reaches stock memcached on that path. (Checking the meta
commands first matters: the crawler path sends the text ``stats``, which crashes the fork.)

A TAP_CONNECT goes only to a server that has no meta commands, or that was seen speaking TAP
earlier, on a fresh connection that becomes the real stream. Stock memcached answers an
unknown opcode only after discarding ``extras + key`` bytes *more* than the frame had, so it
says nothing at first. If nothing arrives within ``probe_wait`` the probe sends that many
zero bytes; stock memcached then answers ``0x81 0x40 status 0x0081`` and the connection,
desynchronised, is closed. A fork that was only slow to start receives a few stray bytes
that never form a frame. The probe never sends anything else, so a TAP stream is never
disturbed.

Crawler: a text connection (version checked, later used by the Writer for pipelined meta
gets, ``mg <key> v f t q``: value, flags and remaining TTL from one read) and a text connection carrying ``lru_crawler metadump hash`` alone (the hash-table
walk; ``all`` only where ``hash`` is refused, see METADUMP_HASH). A crawl already running
(the ``lru_crawler_running`` stat, or a ``BUSY`` answer) is waited for with back-off a
bounded number of times.
"""
from __future__ import annotations

import logging
import re
import socket
import threading
import time
from dataclasses import dataclass, field

from astaire import codec
from astaire.client import connect, reason

log = logging.getLogger("astaire.stream")

TAP = "tap"
CRAWLER = "crawler"
AUTO = "auto"
KINDS = (TAP, CRAWLER, AUTO)

MAGIC_REQUEST = 0x80
MAGIC_RESPONSE = 0x81
OP_TAP_CONNECT = 0x40
TAP_FLAG_DUMP = 0x02

MIN_CRAWLER_VERSION = (1, 6, 18)
# The hash-table walk lists every item once even while clients read and write: the LRU
# walk ("all") misses items that traffic moves between LRU segments during the crawl
# (measured on 1.6.18: ~1-14% of keys under concurrent gets, a few under concurrent sets).
METADUMP_HASH = b"lru_crawler metadump hash\r\n"
METADUMP_ALL = b"lru_crawler metadump all\r\n"
# First lines of an answer to the metadump command: a server that cannot walk its hash table
# (then asked for "all"), and a metadump refused outright.
HASH_WALK_REFUSED = (b"BADCLASS", b"ERROR", b"CLIENT_ERROR")
METADUMP_REFUSED = (b"ERROR", b"CLIENT_ERROR", b"SERVER_ERROR", b"BADCLASS")
# What the first line of an answer to a metadump command says (metadump_answer).
ANSWER_FALL_BACK = "fall back"   # "hash" refused: ask for "all"
ANSWER_REFUSED = "refused"
ANSWER_BUSY = "busy"             # another crawl runs: ask again later
ANSWER_LISTING = "listing"
WALK_HASH = "hash"   # CrawlerSource.walk: which listing the server gives
WALK_ALL = "all"

_kinds: dict[str, str] = {}  # server -> "tap" | "crawler", as this process found it
_kinds_lock = threading.Lock()


class SourceError(Exception):
    """The source cannot be streamed: unreachable, no TAP, crawler unusable or busy."""


class NoTap(SourceError):
    """The server answered TAP_CONNECT with a response: it has no TAP."""


class NoMetaCommands(SourceError):
    """The server answered ``mn`` with ERROR: no meta commands, so no crawler stream."""


@dataclass
class TapSource:
    server: str
    sock: socket.socket
    initial: bytes = b""      # stream bytes already read by the probe
    eof: bool = False         # the probe already saw the server close (empty dump)
    kind: str = field(default=TAP, init=False)

    def close(self) -> None:
        self.sock.close()


@dataclass
class CrawlerSource:
    server: str
    dump_sock: socket.socket   # text: lru_crawler metadump hash
    fetch_sock: socket.socket  # text: the Writer's meta gets (mg ... q) + mn
    initial: bytes = b""       # metadump bytes already read while checking for BUSY
    version: str = ""
    walk: str = WALK_HASH      # WALK_HASH, or WALK_ALL where the server refused the hash walk
    kind: str = field(default=CRAWLER, init=False)

    def close(self) -> None:
        self.dump_sock.close()
        self.fetch_sock.close()


def cached_kind(server: str) -> str | None:
    with _kinds_lock:
        return _kinds.get(server)


def forget_kind(server: str) -> None:
    """Drop the cached decision for ``server`` (call after any failure with it)."""
    with _kinds_lock:
        _kinds.pop(server, None)


def _remember(server: str, kind: str) -> None:
    with _kinds_lock:
        _kinds[server] = kind


def open_source(server: str, vbuckets, kind: str = AUTO, *, connect_timeout: float = 5.0,
                idle_timeout: float = 60.0, probe_wait: float = 0.5, busy_retries: int = 10,
                busy_backoff: float = 0.1) -> TapSource | CrawlerSource:
    """Open ``server`` as a source of ``kind`` ("tap", "crawler" or "auto"); SourceError if it cannot be."""
    if kind not in KINDS:
        raise ValueError(f"source kind {kind!r} is not one of {', '.join(KINDS)}")
    crawler_args = dict(connect_timeout=connect_timeout, idle_timeout=idle_timeout,
                        busy_retries=busy_retries, busy_backoff=busy_backoff)
    if kind == CRAWLER:
        return open_crawler(server, **crawler_args)
    if kind == TAP:
        return open_tap(server, vbuckets, connect_timeout=connect_timeout, probe_wait=probe_wait)

    # Stock memcached answers the crawler's opening ``mn``; a server that does not (the
    # Clearwater fork) is asked for TAP. A server seen speaking TAP is asked for TAP first.
    known = cached_kind(server)
    asked_meta = False
    if known != TAP:
        try:
            src = open_crawler(server, **crawler_args)
        except NoMetaCommands:
            asked_meta = True
        else:
            if known is None:
                log.info("source %s answers meta commands (memcached %s): streaming it with the LRU crawler",
                         server, src.version)
            _remember(server, CRAWLER)
            return src
    try:
        src = open_tap(server, vbuckets, connect_timeout=connect_timeout, probe_wait=probe_wait)
    except NoTap as e:
        if asked_meta:
            raise SourceError(f"source {server} has neither meta commands (it answered mn with ERROR) "
                              "nor TAP (it answered TAP_CONNECT with a response): it cannot be streamed") from e
        forget_kind(server)
        log.info("source %s no longer speaks TAP: using the LRU crawler", server)
        src = open_crawler(server, **crawler_args)
        _remember(server, CRAWLER)
        return src
    if known is None:
        log.info("source %s speaks TAP (no meta commands): streaming its dump", server)
    elif known == CRAWLER:
        log.info("source %s no longer answers meta commands: streaming its dump over TAP", server)
    _remember(server, TAP)
    return src


def _connect(server: str, timeout: float) -> socket.socket:
    """A connection to the source ``server``; SourceError, saying why, if there is none."""
    try:
        return connect(server, timeout)
    except (OSError, ValueError) as e:
        raise SourceError(f"cannot connect to source {server}: {reason(e)}") from e


def open_tap(server: str, vbuckets, *, connect_timeout: float = 5.0, probe_wait: float = 0.5) -> TapSource:
    """Send TAP_CONNECT (DUMP, LIST_VBUCKETS) and wait until the server shows it speaks TAP.

    Returns the stream with whatever was read so far; raises NoTap if the server answered
    with a response (it has no TAP), SourceError for anything else.
    """
    sock = _connect(server, connect_timeout)
    ok = False
    try:
        request = codec.encode_tap_connect(codec.TAP_FLAG_DUMP, vbuckets=list(vbuckets))
        sock.sendall(request)
        pad = request[4] + int.from_bytes(request[2:4], "big")  # extras + key lengths
        got, eof = _first_bytes(sock, probe_wait)
        if not got and not eof:
            # Silence: stock memcached is waiting for the bytes it will wrongly discard.
            sock.sendall(b"\0" * pad)
            got, eof = _first_bytes(sock, connect_timeout)
            if not got and not eof:
                raise SourceError(f"source {server} did not answer TAP_CONNECT within "
                                  f"{probe_wait + connect_timeout:g} s")
        if got and got[0] == MAGIC_RESPONSE:
            got, eof = _at_least(sock, got, eof, 2, connect_timeout)
            if len(got) >= 2 and got[1] == OP_TAP_CONNECT:
                raise NoTap(f"source {server} has no TAP: it answered TAP_CONNECT with a response")
            raise SourceError(f"source {server} answered TAP_CONNECT with an unexpected response "
                              f"(opcode 0x{got[1]:02x})" if len(got) >= 2 else
                              f"source {server} closed after one byte of its answer to TAP_CONNECT")
        if got and got[0] != MAGIC_REQUEST:
            raise SourceError(f"source {server} answered TAP_CONNECT with a bad magic byte 0x{got[0]:02x}")
        ok = True
        return TapSource(server, sock, bytes(got), eof)
    except OSError as e:
        raise SourceError(f"source {server} failed while opening TAP: {reason(e)}") from e
    finally:
        if not ok:
            sock.close()


def _first_bytes(sock: socket.socket, wait: float) -> tuple[bytes, bool]:
    """(data, eof) from the first recv within ``wait``; (b"", False) on silence."""
    sock.settimeout(wait)
    try:
        data = sock.recv(256 * 1024)
    except socket.timeout:
        return b"", False
    return data, not data


def _at_least(sock: socket.socket, got: bytes, eof: bool, n: int, timeout: float) -> tuple[bytes, bool]:
    sock.settimeout(timeout)
    while len(got) < n and not eof:
        more = sock.recv(256 * 1024)
        got, eof = got + more, not more
    return got, eof


def open_crawler(server: str, *, connect_timeout: float = 5.0, idle_timeout: float = 60.0,
                 busy_retries: int = 10, busy_backoff: float = 0.1) -> CrawlerSource:
    """Check the server is a memcached with a usable LRU crawler and start its metadump.

    A running crawl (BUSY) is retried ``busy_retries`` times, waiting ``busy_backoff`` s
    and doubling up to 2 s; after that, SourceError.
    """
    socks: list[socket.socket] = []
    try:
        fetch = _connect(server, connect_timeout)
        socks.append(fetch)
        # Before anything else is sent: the metadump connection's first command, text
        # ``stats``, crashes the Clearwater fork, which has no meta commands.
        version = _hello(server, fetch, connect_timeout)
        parsed = _version_tuple(version)
        if parsed is not None and parsed < MIN_CRAWLER_VERSION:
            log.warning("source %s runs memcached %s, older than %s: trying its LRU crawler anyway",
                        server, version, ".".join(map(str, MIN_CRAWLER_VERSION)))
        dump = _connect(server, connect_timeout)
        socks.append(dump)
        first, walk = _start_metadump(server, dump, connect_timeout, idle_timeout, busy_retries, busy_backoff)
        src = CrawlerSource(server, dump, fetch, first, version, walk)
        socks.clear()
        return src
    except OSError as e:
        raise SourceError(f"source {server} failed while starting the crawler: {reason(e)}") from e
    finally:
        for s in socks:
            s.close()


def _hello(server: str, sock: socket.socket, timeout: float) -> str:
    """The server's version, over the text protocol, once it has shown it answers meta
    commands: ``version`` and ``mn`` go together, and the answers must be ``VERSION <v>``
    then ``MN``; an ``ERROR`` for ``mn`` raises NoMetaCommands. (The fetch connection speaks
    meta commands, and memcached fixes a connection's protocol at its first byte.)"""
    sock.settimeout(timeout)
    sock.sendall(b"version\r\nmn\r\n")
    buf = b""
    try:
        while buf.count(b"\n") < 2:
            data = sock.recv(4096)
            if not data:
                raise SourceError(f"source {server} closed the connection instead of answering version and mn")
            buf += data
            if len(buf) > 4096:
                break
    except socket.timeout as e:
        raise SourceError(f"source {server} did not answer version and mn within {timeout:g} s") from e
    lines = buf.split(b"\n")
    line = lines[0].rstrip(b"\r")
    if not line.startswith(b"VERSION ") or len(lines) != 3 or lines[2]:
        raise SourceError(f"source {server} gave an unusable answer to version: "
                          f"{line[:80].decode('ascii', 'replace')!r}")
    version = line[8:].decode("ascii", "replace")
    meta = lines[1].rstrip(b"\r")
    if meta == b"ERROR":
        raise NoMetaCommands(f"source {server} (memcached {version}) has no meta commands (it answered mn "
                             "with ERROR): the LRU crawler path cannot fetch its records")
    if meta != b"MN":
        raise SourceError(f"source {server} gave an unusable answer to mn: "
                          f"{meta[:80].decode('ascii', 'replace')!r}")
    return version


def _version_tuple(version: str) -> tuple[int, ...] | None:
    m = re.match(r"(\d+)\.(\d+)\.(\d+)", version)
    return tuple(int(x) for x in m.groups()) if m else None


def metadump_answer(command: bytes, first: bytes) -> str:
    """What ``first``, the first line (without its line end) of the answer to ``command``
    (METADUMP_HASH or METADUMP_ALL), says: one of the ANSWER_* values."""
    if command == METADUMP_HASH and first.startswith(HASH_WALK_REFUSED):
        return ANSWER_FALL_BACK
    if first.startswith(METADUMP_REFUSED):
        return ANSWER_REFUSED
    if first.startswith(b"BUSY"):
        return ANSWER_BUSY
    return ANSWER_LISTING


def _start_metadump(server: str, sock: socket.socket, connect_timeout: float, idle_timeout: float, retries: int,
                    backoff: float) -> tuple[bytes, str]:
    """Start ``lru_crawler metadump hash`` (``all`` where ``hash`` is refused) once no other
    crawl runs; return the bytes read so far and the walk (WALK_HASH or WALK_ALL).

    memcached 1.6.18 answers BUSY only when the running crawl is moving: while another
    client's crawl is stalled (its reader not reading), a second crawl request blocks the
    worker thread, and every connection on that thread, until that crawl ends. So the
    ``lru_crawler_running`` stat is checked first, and a running crawl counts as BUSY.
    """
    delay = backoff
    command = METADUMP_HASH
    attempt = 0
    while True:
        try:
            step = "stats"
            sock.settimeout(connect_timeout)
            busy = _crawler_running(server, sock)
            if not busy:
                step = "lru_crawler metadump"
                sock.settimeout(idle_timeout)
                sock.sendall(command)
                buf = b""
                while b"\n" not in buf:
                    if len(buf) > codec.MAX_METADUMP_LINE:
                        raise SourceError(f"source {server} sent a metadump line too long ({len(buf)} bytes "
                                          f"without a line end; the limit is {codec.MAX_METADUMP_LINE})")
                    more = sock.recv(codec.MAX_METADUMP_LINE + 1 - len(buf))
                    if not more:
                        raise SourceError(f"source {server} closed the connection after lru_crawler metadump")
                    buf += more
                first = buf.split(b"\n", 1)[0].rstrip(b"\r")
                answer = metadump_answer(command, first)
                if answer == ANSWER_FALL_BACK:
                    log.warning("source %s cannot walk its hash table (%s): falling back to "
                                "lru_crawler metadump all, which can miss records moved by live traffic",
                                server, first.decode("ascii", "replace"))
                    command = METADUMP_ALL
                    continue
                if answer == ANSWER_REFUSED:
                    raise SourceError(f"source {server} cannot run lru_crawler metadump: "
                                      f"{first.decode('ascii', 'replace')}")
                if answer == ANSWER_LISTING:
                    return buf, WALK_HASH if command == METADUMP_HASH else WALK_ALL
                busy = first.decode("ascii", "replace")
        except socket.timeout as e:
            raise SourceError(f"source {server} did not answer {step} within {sock.gettimeout():g} s") from e
        except OSError as e:
            raise SourceError(f"source {server} failed while starting lru_crawler metadump: {reason(e)}") from e
        if attempt == retries:
            break
        attempt += 1
        log.info("source %s: LRU crawler busy (%s), retrying in %.1f s", server, busy, delay)
        time.sleep(delay)
        delay = min(delay * 2, 2.0)
    raise SourceError(f"source {server}: LRU crawler still busy after {retries + 1} attempts "
                      "(another crawl is running)")


def _crawler_running(server: str, sock: socket.socket) -> str | None:
    """"lru_crawler_running 1" if the ``stats`` say a crawl is running, else None."""
    sock.sendall(b"stats\r\n")
    buf = b""
    while not (buf.endswith(b"END\r\n") or buf.endswith(b"ERROR\r\n")):
        more = sock.recv(65536)
        if not more:
            raise SourceError(f"source {server} closed the connection after stats")
        buf += more
        if len(buf) > 1 << 20:
            raise SourceError(f"source {server}: stats answer too long")
    for line in buf.split(b"\r\n"):
        if line.startswith(b"STAT lru_crawler_running ") and line.split()[-1] != b"0":
            return "lru_crawler_running 1"
    return None
