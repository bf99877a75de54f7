"""One stream: the records of some vbuckets, from one old replica into the local memcached.

``run_stream`` opens the target, then the source (TAP or the LRU crawler, see
``astaire.resync.source``), and moves bytes between non-blocking sockets and the codec's
``Writer``, which does all per-record work. The codec's ``Pump`` runs the hot part of the
loop (in C in the compiled build): it reads the target, the crawler's fetch connection, a
TAP source and the crawler's listing while nothing of it is spooled, and sends what the
Writer wants sent, until this module has something to do (read the listing into the spool
or feed it from there, report progress, time out, stop, end). So:

- reads of up to 512 KiB land in a buffer allocated once per connection and go straight
  into the Writer, which copies what it keeps;
- whatever the Writer wants sent is sent at once from the Writer's own buffers, and what
  the socket did not take waits there;
- the source is not read while the Writer holds ``window`` unsettled records or
  ``window_bytes`` bytes of them, or the target's send queue is over ``MAX_PENDING_OUT``
  bytes, so memory stays flat however long the stream is and whatever the value sizes;
- except the crawler's metadump text, which is always read at once and spooled (a ring in
  memory, then a temporary file) while the fetches are behind: a stalled ``metadump hash`` holds
  an item lock in memcached, and GETs of keys under that lock (ours included) then hang;
- a peer that makes no progress for ``idle_timeout`` seconds fails the stream;
- a TAP stream with a pace slot does not read its source while it is far ahead of the other
  streams of its resync (``astaire.resync.pace``), so that the settled table still holds the
  notes its copies need.

A TAP stream is always read to the server's close (the Clearwater fork can crash when a
client closes first), even after a failure elsewhere or a stop request: the rest is then
read and discarded. Only a TAP stream that is itself broken is closed early.

``run_stream`` never raises for network or protocol problems; it returns ``ok=False`` with
a readable reason, and logs it on ``astaire.stream``.
"""
from __future__ import annotations

import logging
import mmap
import selectors
import socket
import tempfile
import time
from dataclasses import dataclass, field
from collections.abc import Callable

from astaire import codec
from astaire.resync import pace, settled, source
from astaire.protocol_errors import ProtocolError
from astaire.client import connect, reason

log = logging.getLogger("astaire.stream")

CHUNK = 512 * 1024  # one recv_into a peer's preallocated buffer: few syscalls, no bytes object per read
MAX_PENDING_OUT = 1024 * 1024  # bytes waiting for the target before the source is no longer read
SPOOL_IN_MEMORY = 4 * 1024 * 1024  # metadump text kept in memory (a ring) before it spills to a temporary file
SPOOL_RING_START = 512 * 1024      # the ring's first size: it doubles as the backlog needs
SPOOL_MIN_ROOM = 64 * 1024         # the least free space in one piece worth reading into directly


@dataclass
class StreamJob:
    source: str            # "host:port" of an old replica
    vbuckets: list[int]    # vbuckets to take from it
    target: str            # "host:port" of the local memcached
    source_kind: str = "auto"   # "tap" | "crawler" | "auto"
    vbucket_count: int = 128
    connect_timeout: float = 5.0
    idle_timeout: float = 60.0  # no progress from a peer for this long: fail the stream
    window: int = 4096
    window_bytes: int = 1024 * 1024  # key + value bytes the Writer may hold unsettled
    crawler_busy_retries: int = 10  # BUSY answers to metadump retried with back-off (0.1 s doubling to 2 s)
    write_mode: str = "auto"    # the Writer's first request per record: "addq", "read" or "auto" (codec.Writer)
    stall_timeout: float = 120.0  # no complete record from a source that still trickles bytes: abandon it
    settled_generation: int = 0   # the resync's generation in the daemon's settled table (0: none)
    hold: list = field(default_factory=list)  # [vbucket, bit] pairs: TAP copies held back, crawler fetches deferred (codec.Writer)
    pace_slot: int = -1   # this stream's slot among the settled table's pace slots (-1: it does not pace)


@dataclass
class StreamResult:
    ok: bool
    error: str | None     # why it failed, readable
    kind: str | None      # "tap" or "crawler", what was used
    stats: dict           # Writer.stats()
    vbucket_counts: dict  # {vb: (entries, bytes)}
    seconds: float
    drained_bytes: int = field(default=0)  # TAP bytes read and discarded after a failure or stop
    target_failed: bool = False  # the failure was the target's (the local memcached): never blame the source


class _Failure(Exception):
    """Ends the stream. ``source_done``: the source itself broke or went silent, so a TAP
    stream is not drained (there is nothing sane left to read)."""

    def __init__(self, message: str, source_done: bool = False, target: bool = False):
        super().__init__(message)
        self.message = message
        self.source_done = source_done
        self.target = target


def _unmap(view: memoryview, buf: mmap.mmap) -> None:
    """Release ``view`` and close ``buf``, its anonymous memory; a view of it still held
    elsewhere (the last read or take) keeps it until that view goes."""
    view.release()
    try:
        buf.close()
    except BufferError:
        pass


class _Spool:
    """FIFO of the metadump text read but not yet given to the Writer: a ring in anonymous
    memory, of up to ``capacity`` bytes, then a temporary file for what does not fit.

    Most of a listing passes through here, since it arrives faster than the fetches it asks
    for go out, but little of it is here at once: in 1M x 100 B resyncs, 2-87 MB per stream
    passed through a backlog that peaked at 0.4-7.7 MB. So the ring, reused in place, takes
    it for one copy in, and the Writer reads it where it lies. (A file for everything past
    1 MiB, as before, cost a copy into the page cache and one back, about a tenth of a
    worker's CPU.) The ring starts at ``SPOOL_RING_START`` bytes and doubles only when the
    backlog needs it, so its resident pages follow the largest backlog, not the capacity.
    Order is kept: the ring holds the oldest bytes, the file newer ones, and while the file
    holds any, new bytes go after them."""

    def __init__(self, capacity: int | None = None):
        self.capacity = capacity or SPOOL_IN_MEMORY
        self._ring: mmap.mmap | None = None   # made at first use: its pages become resident as used
        self._view: memoryview | None = None
        self._size = min(SPOOL_RING_START, self.capacity)   # the part of the ring in use
        self._head = 0      # the ring's oldest byte
        self._held = 0      # bytes in the ring
        self.file = None    # what did not fit in the ring, newer than all of the ring
        self._read_pos = 0
        self._write_pos = 0
        self.spilled = 0    # bytes that went through the file
        self.passed = 0     # bytes that went through the spool, ring or file
        self.peak = 0       # the largest backlog held at once

    def __len__(self) -> int:
        return self._held + self._write_pos - self._read_pos

    def append(self, data) -> None:
        n = len(data)
        self._count(n)
        if self._write_pos == self._read_pos and self._held + n <= self.capacity:
            self._ring_put(memoryview(data))
            return
        if self.file is None:
            self.file = tempfile.TemporaryFile(prefix="astaire-metadump-")
        self.file.seek(self._write_pos)
        self.file.write(data)
        self._write_pos += n
        self.spilled += n

    def _ring_for(self, need: int) -> memoryview:
        """The ring, its part in use grown (doubling) to hold at least ``need`` bytes."""
        if self._view is None:
            self._ring = mmap.mmap(-1, self.capacity)
            self._view = memoryview(self._ring)
        if need > self._size:
            size = self._size
            while size < need:
                size *= 2
            size = min(size, self.capacity)
            wrapped = self._head + self._held - self._size
            if wrapped > 0:  # the newest bytes sit at the start: move them past the old end
                self._view[self._size:self._size + wrapped] = self._view[:wrapped]
            self._size = size
        return self._view

    def _ring_put(self, data: memoryview) -> None:
        n = len(data)
        ring = self._ring_for(self._held + n)
        tail = (self._head + self._held) % self._size
        first = min(n, self._size - tail)
        ring[tail:tail + first] = data[:first]
        if first < n:
            ring[:n - first] = data[first:]
        self._held += n

    def room(self) -> memoryview | None:
        """The free space at the ring's tail, for a read straight into the spool (then
        ``commit``): at least SPOOL_MIN_ROOM bytes, or None when there is not that much in
        one piece or the file is in use (then read elsewhere and ``append``)."""
        if self._write_pos != self._read_pos or self._held + SPOOL_MIN_ROOM > self.capacity:
            return None
        ring = self._ring_for(self._held + SPOOL_MIN_ROOM)
        tail = (self._head + self._held) % self._size
        end = self._head if tail < self._head or (tail == self._head and self._held) else self._size
        if end - tail < SPOOL_MIN_ROOM:
            return None
        return ring[tail:end]

    def commit(self, n: int) -> None:
        """``n`` bytes were written at the start of the last ``room``."""
        self._count(n)
        self._held += n

    def _count(self, n: int) -> None:
        """``n`` more bytes are coming in: the log's spool figures."""
        self.passed += n
        self.peak = max(self.peak, len(self) + n)

    def take(self, n: int) -> memoryview:
        """Up to ``n`` of the oldest bytes, at least one if any are held (a view, valid until
        the next ``append``)."""
        if not self._held:
            self._refill()
        k = min(n, self._held, self._size - self._head)
        out = self._view[self._head:self._head + k]
        self._held -= k
        self._head = 0 if not self._held else (self._head + k) % self._size
        return out

    def _refill(self) -> None:
        """The ring is empty: move the file's oldest bytes into it."""
        want = min(self.capacity, self._write_pos - self._read_pos)
        self.file.seek(self._read_pos)
        got = self.file.readinto(self._ring_for(want)[:want])
        if not got:
            raise OSError(f"the metadump spool file ended {want} bytes early")
        self._head, self._held = 0, got
        self._read_pos += got
        if self._read_pos == self._write_pos:
            self.file.seek(0)
            self.file.truncate()
            self._read_pos = self._write_pos = 0

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self._ring is not None:
            _unmap(self._view, self._ring)
            self._ring = self._view = None


class _Peer:
    """A non-blocking socket (the Pump sends and reads the target's and the fetch
    connection's; this module reads the metadump and drains TAP with ``recv``)."""

    def __init__(self, sock: socket.socket, what: str):
        sock.setblocking(False)
        self.sock = sock
        self.what = what  # "source 1.2.3.4:11211", for messages
        self.closed = False
        self._inbuf: mmap.mmap | None = None
        self._inview: memoryview | None = None
        self.reads = 0          # recv calls that returned data, and their bytes (the log's
        self.bytes_read = 0     # "reads" figures: many small reads mean many wake-ups)

    def recv_into(self, buffer) -> int | None:
        """Read into ``buffer``: the bytes read, 0 at EOF, None if nothing is ready."""
        try:
            n = self.sock.recv_into(buffer)
        except (BlockingIOError, InterruptedError):
            return None
        self.reads += 1
        self.bytes_read += n
        return n

    def recv(self) -> memoryview | None:
        """Data (a view of this peer's read buffer, valid until the next recv), an empty
        view at EOF, None if nothing is ready."""
        if self._inbuf is None:
            # Anonymous memory, not a bytearray: its pages become resident only as reads
            # reach them (a bytearray is zeroed, all of it, at once).
            self._inbuf = mmap.mmap(-1, CHUNK)
            self._inview = memoryview(self._inbuf)
        n = self.recv_into(self._inbuf)
        return None if n is None else self._inview[:n]

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.sock.close()
        if self._inview is not None:
            _unmap(self._inview, self._inbuf)
            self._inview = self._inbuf = None


def run_stream(job: StreamJob, progress: Callable[[dict], None] | None = None, progress_interval: float = 0.25,
               should_stop: Callable[[], bool] | None = None) -> StreamResult:
    """Stream ``job.vbuckets`` from ``job.source`` into ``job.target``; see the module docstring."""
    return _Stream(job, progress, progress_interval, should_stop).run()


class _Stream:
    def __init__(self, job, progress, progress_interval, should_stop):
        self.job = job
        self.progress = progress
        self.progress_interval = progress_interval
        self.should_stop = should_stop
        self.writer = None
        self.kind: str | None = None
        self.pump = None
        self.peers: list[_Peer] = []
        self.target: _Peer | None = None
        self.src: _Peer | None = None      # TAP stream, or the metadump text connection
        self.fetch: _Peer | None = None    # crawler: meta-get (text) connection
        self.source_ended = False
        self.spool = _Spool()      # crawler: metadump text read but not yet given to the Writer
        self.dump_eof = False      # crawler: the metadump connection closed
        self.error: str | None = None
        self.drained = 0
        self.last_progress = time.monotonic()
        self.reported: dict = {}
        self.next_report = 0.0
        self.progress_failed: str | None = None
        self.target_failed = False
        self.records_seen = 0                    # frames or listings taken from the source so far
        self.last_record = time.monotonic()      # when that number last grew (the stall deadline)
        self.table: settled.SettledTable | None = None  # the daemon's settled table, if the job uses it
        self.pacer: pace.Pacer | None = None     # a TAP stream's place among the resync's streams

    # -- the whole stream ------------------------------------------------------------

    def run(self) -> StreamResult:
        job = self.job
        t0 = time.monotonic()
        try:
            try:
                table = self.table = settled.shared() if job.settled_generation else None
                self.writer = codec.Writer(job.vbuckets, vbuckets=job.vbucket_count, window=job.window,
                                           mode=job.write_mode,
                                           settled=table.buffer if table is not None else None,
                                           generation=job.settled_generation if table is not None else 0,
                                           hold=job.hold)  # the Writer holds only with a table
            except (ValueError, TypeError, OverflowError) as e:
                raise _Failure(f"bad stream job: {e}") from e
            self._open()
            self._pump()
        except _Failure as e:
            self.error = e.message
            self.target_failed = e.target
            if self.kind == source.TAP and not self.source_ended and not e.source_done:
                self._drain()
        except Exception:
            # A bug: it propagates, but a TAP stream is still read to its end first.
            if self.kind == source.TAP and not self.source_ended:
                log.exception("stream from %s failed unexpectedly; reading its TAP stream to the end", job.source)
                try:
                    self._drain()
                except Exception:
                    log.exception("draining the TAP stream of %s failed", job.source)
            raise
        finally:
            if self.pacer is not None:
                self.pacer.close()
            for p in self.peers:
                p.close()
            self.spool.close()
        seconds = time.monotonic() - t0
        stats = self.writer.stats() if self.writer is not None else {}
        counts = self.writer.vbucket_counts() if self.writer is not None else {}
        if self.error is None:
            if stats.get("failed"):
                self.error = (f"{stats['failed']} record(s) from {job.source} were not written to "
                              f"target {job.target}: {stats['last_error']}")
                self.target_failed = True
        self._report(force=True)
        ok = self.error is None
        if ok:
            log.info("stream %s -> %s (%s, %d vbuckets) done: %d entries, %d bytes, %d added, %d replaced, "
                     "%d kept (%d of them known settled, %d of those on their listed flags unfetched; %d held back, "
                     "%d refetched; %d read before any write, in read-first mode) in %.2f s; reads: %s%s%s",
                     job.source, job.target, self.kind, len(job.vbuckets), stats["entries"], stats["bytes"],
                     stats["added"], stats["replaced"], stats["kept"], stats["deduplicated"], stats["kept_as_listed"],
                     stats["held"], stats["refetched"], stats["read_first"], seconds,
                     self._reads(), self._spooled(), self._paced())
        else:
            source.forget_kind(job.source)
            log.warning("stream %s -> %s (%s) failed after %.2f s: %s", job.source, job.target,
                        self.kind or "kind unknown", seconds, self.error)
        return StreamResult(ok, self.error, self.kind, stats, counts, seconds, self.drained, self.target_failed)

    def _open(self) -> None:
        job = self.job
        try:
            tsock = connect(job.target, job.connect_timeout)
        except (OSError, ValueError) as e:
            raise _Failure(f"cannot connect to target {job.target}: {reason(e)}", target=True) from e
        self.target = self._add(tsock, f"target {job.target}")
        try:
            src = source.open_source(job.source, job.vbuckets, job.source_kind,
                                     connect_timeout=job.connect_timeout, idle_timeout=job.idle_timeout,
                                     busy_retries=job.crawler_busy_retries)
        except source.SourceError as e:
            raise _Failure(str(e)) from e
        except ValueError as e:
            raise _Failure(f"bad source {job.source!r}: {e}") from e
        self.kind = src.kind
        if isinstance(src, source.TapSource):
            self.src = self._add(src.sock, f"source {job.source}")
            if self.table is not None and 0 <= job.pace_slot < pace.SLOTS:
                self.pacer = pace.Pacer(self.table.pace_words, job.pace_slot, job.settled_generation)
            if src.initial:
                self._feed_source(src.initial)
            if src.eof:
                self._source_eof()
        else:
            self.src = self._add(src.dump_sock, f"source {job.source} (metadump)")
            self.fetch = self._add(src.fetch_sock, f"source {job.source} (fetch)")
            # The hash walk visits each key's bucket once, so it lists a key once: checking every
            # listed key against the queued fetches is for the LRU walk (Writer.check_duplicates).
            self.writer.check_duplicates = src.walk != source.WALK_HASH
            if src.initial:
                self._take_metadump(src.initial)
        try:
            self.pump = codec.Pump(self.writer, self.target.sock.fileno(),
                                   self.fetch.sock.fileno() if self.fetch is not None else -1,
                                   window_bytes=job.window_bytes, max_pending_out=MAX_PENDING_OUT)
        except (ValueError, TypeError, OverflowError) as e:
            raise _Failure(f"bad stream job: {e}") from e

    def _add(self, sock: socket.socket, what: str) -> _Peer:
        peer = _Peer(sock, what)
        self.peers.append(peer)
        return peer

    # -- the loop --------------------------------------------------------------------

    def _pump(self) -> None:
        job = self.job
        pump = self.pump
        while True:
            if self.progress_failed:
                self._stop(f"stopped: the progress callback failed: {self.progress_failed}")
                return
            if self.should_stop is not None and self.should_stop():
                self._stop("stopped on request")
                return
            if self.fetch is None:
                mode = codec.PUMP_SRC_TAP if not self.source_ended else codec.PUMP_SRC_NONE
            else:
                self._feed_spool()
                mode = codec.PUMP_SRC_LISTING if not (self.source_ended or self.dump_eof) else codec.PUMP_SRC_NONE
            now = time.monotonic()
            timeout = min(self.progress_interval, max(0.0, self.last_progress + job.idle_timeout - now))
            waiting = False
            if mode == codec.PUMP_SRC_TAP and self.pacer is not None:
                if self.pacer.allowance(self.writer.entries) > 0:
                    timeout = min(timeout, pace.STEP)
                else:  # far ahead of another stream: serve the target only, for a moment
                    waiting, mode, timeout = True, codec.PUMP_SRC_NONE, pace.NAP
            try:
                r = pump.run(max(timeout, 0.001), self.src.sock.fileno() if mode else -1, mode, self.source_ended,
                             bool(self.spool) and not self.source_ended)
            except ProtocolError as e:
                raise self._broken(e) from e
            except OSError as e:
                raise self._socket_failed(e) from e
            finally:
                self.last_progress = max(self.last_progress, pump.last_progress)
            if waiting:
                # Waiting on purpose is not the source's silence: neither the idle timeout
                # nor the stall deadline counts it.
                after = time.monotonic()
                self.pacer.paced_seconds += after - now
                self.last_progress = max(self.last_progress, after)
                self.last_record = max(self.last_record, after)
            if r == codec.PUMP_DONE:
                return
            if r == codec.PUMP_SOURCE:
                self._read_metadump()
            elif r == codec.PUMP_SOURCE_END:
                self._listing_ended()
            elif r == codec.PUMP_SOURCE_EOF:
                self._source_eof()
            elif r == codec.PUMP_TARGET_EOF:
                raise _Failure(f"target {job.target} closed the connection{self._so_far()}", target=True)
            elif r == codec.PUMP_FETCH_EOF:
                raise _Failure(f"{self.fetch.what} closed the connection{self._so_far()}", True)
            now = time.monotonic()
            if now - self.last_progress > job.idle_timeout:
                who, source_done = self._idle_culprit()
                raise _Failure(f"no progress from {who} for {job.idle_timeout:g} s{self._so_far()}", source_done,
                               target=not source_done)
            if now >= self.next_report:
                self._report()
                self._check_stall(now)

    def _broken(self, e: ProtocolError) -> _Failure:
        """The failure for a protocol error the Pump met feeding a peer's bytes to the Writer."""
        who = self.pump.peer
        if who == "target":
            return _Failure(f"target {self.job.target} broke the protocol: {e}", target=True)
        if who == "fetch":
            return _Failure(f"{self.fetch.what} broke the protocol: {e}", True)
        return self._source_broke(e)

    def _source_broke(self, e: ProtocolError) -> _Failure:
        return _Failure(f"source {self.job.source} broke the protocol: {e}{self._so_far()}", True)

    def _socket_failed(self, e: OSError) -> _Failure:
        """The failure for a socket error the Pump met (its peer and whether it was sending)."""
        peer = {"target": self.target, "fetch": self.fetch, "source": self.src}.get(self.pump.peer)
        if peer is None:  # not a peer's error (poll itself failed): a bug, not the network
            raise e
        if self.pump.op == "send":
            return _Failure(f"{peer.what}: sending failed: {reason(e)}{self._so_far()}", target=peer is self.target)
        return _Failure(f"{peer.what}: {reason(e)}{self._so_far()}", peer is not self.target,
                        target=peer is self.target)

    def _read_metadump(self) -> None:
        peer = self.src
        # Text that will wait in the spool anyway is read straight into the spool's ring.
        room = self.spool.room() if self._spooling() else None
        try:
            if room is None:
                data = peer.recv()
                n = None if data is None else len(data)
            else:
                with room:
                    n = peer.recv_into(room)
        except OSError as e:
            raise _Failure(f"{peer.what}: {reason(e)}{self._so_far()}", True) from e
        if n is None:
            return
        self.last_progress = time.monotonic()
        if n == 0:
            self._source_eof()
        elif room is not None:
            self.spool.commit(n)
        else:
            self._take_metadump(data)

    def _feed_source(self, data: bytes) -> None:
        w = self.writer
        try:
            if self.fetch is None:
                w.feed_tap(data)
            elif w.feed_metadump(data):
                self._listing_ended()
        except ProtocolError as e:
            raise self._source_broke(e) from e

    def _listing_ended(self) -> None:
        """The crawler's END was read: the text connection has nothing more to say."""
        self.source_ended = True
        try:
            self.writer.finish()
        except ProtocolError as e:
            raise self._source_broke(e) from e
        self.src.close()

    def _spooling(self) -> bool:
        """Metadump text read now must wait in the spool: text waits there already, or the
        Writer holds a window of fetches."""
        return bool(self.spool) or self.writer.fetch_backlog >= self.job.window

    def _take_metadump(self, data: bytes) -> None:
        if not self._spooling():
            self._feed_source(data)
        else:
            try:
                self.spool.append(data)
            except OSError as e:
                raise self._spool_failed(e) from e

    def _feed_spool(self) -> None:
        w = self.writer
        while self.spool and not self.source_ended and w.fetch_backlog < self.job.window:
            try:
                data = self.spool.take(CHUNK)
            except OSError as e:
                raise self._spool_failed(e) from e
            self._feed_source(data)
        if self.dump_eof and not self.spool and not self.source_ended:
            raise _Failure(f"source {self.job.source} closed the metadump before END{self._so_far()}", True)

    def _spool_failed(self, e: OSError) -> _Failure:
        """The spool's file (a backlog past SPOOL_IN_MEMORY) failed: a local problem, such as
        a full or missing temporary directory; neither the source nor the target is at fault."""
        return _Failure(f"cannot hold the metadump backlog of source {self.job.source} in a temporary file "
                        f"({tempfile.gettempdir()}): {reason(e)}{self._so_far()}")

    def _source_eof(self) -> None:
        """The source closed its connection. A crawler's listing is then over: what the spool
        holds is fed, and the stream fails if END never came. A TAP stream ends, unless a
        frame was cut short."""
        if self.fetch is not None:
            self.dump_eof = True
            self._feed_spool()
            return
        try:
            self.writer.finish()
        except ProtocolError as e:
            raise _Failure(f"source {self.job.source} closed the TAP stream mid-frame: {e}{self._so_far()}",
                           True) from e
        self.source_ended = True
        if self.pacer is not None:
            self.pacer.close()   # nothing more to take: nobody waits for this stream

    # -- ending early ----------------------------------------------------------------

    def _stop(self, why: str) -> None:
        self.error = why
        if self.kind == source.TAP and not self.source_ended:
            t0 = time.monotonic()
            self._drain()
            log.info("%s: read the TAP stream of %s to the server's close, discarding %d bytes in %.2f s",
                     why, self.job.source, self.drained, time.monotonic() - t0)

    def _drain(self) -> None:
        """Read a TAP stream to the server's close and discard it (never close it first)."""
        for p in (self.target, self.fetch):
            if p is not None:
                p.close()
        src = self.src
        last = time.monotonic()
        with selectors.DefaultSelector() as sel:
            sel.register(src.sock, selectors.EVENT_READ)
            while True:
                if time.monotonic() - last > self.job.idle_timeout:
                    log.warning("gave up draining the TAP stream of %s after %g s of silence", self.job.source,
                                self.job.idle_timeout)
                    return
                for _key, _mask in sel.select(min(1.0, self.job.idle_timeout)):
                    try:
                        data = src.recv()
                    except OSError:
                        return
                    if data is None:
                        continue
                    if not data:
                        return
                    self.drained += len(data)
                    last = time.monotonic()

    def _spooled(self) -> str:
        """The log's spool figures (crawler streams): how much of the listing waited for the
        fetches, the most at once, and how much of it went through the temporary file."""
        sp = self.spool
        if not sp.passed:
            return ""
        return f"; spooled {sp.passed} bytes (at most {sp.peak} at once, {sp.spilled} through the file)"

    def _paced(self) -> str:
        """The log's pacing figure (TAP streams with a pace slot): how long the source was
        left unread while this stream waited for another."""
        p = self.pacer
        return f"; paced {p.paced_seconds:.2f} s" if p is not None else ""

    def _reads(self) -> str:
        """The log's "reads" figures, per connection: many small reads mean many wake-ups."""
        pump = self.pump
        parts = []
        for p in self.peers:
            reads, nbytes = p.reads, p.bytes_read
            if pump is not None:
                if p is self.target:
                    reads, nbytes = pump.target_reads, pump.target_bytes_read
                elif p is self.fetch:
                    reads, nbytes = pump.fetch_reads, pump.fetch_bytes_read
                else:
                    reads, nbytes = reads + pump.source_reads, nbytes + pump.source_bytes_read
            parts.append(f"{p.what.split(' ', 1)[0]}{' fetch' if p is self.fetch else ''} {reads} "
                         f"({nbytes // max(reads, 1)} B each)")
        return ", ".join(parts)

    def _check_stall(self, now: float) -> None:
        """The stall deadline: bytes that keep arriving just under the idle timeout but never
        complete a record. A stalled source is abandoned (for TAP, an early close: logged)."""
        st = self.writer.stats()
        seen = st["entries"] + st["skipped_unwanted"] + st["skipped_own"] + st["other_tap"]
        if seen != self.records_seen:
            self.records_seen, self.last_record = seen, now
            return
        if now - self.last_record <= self.job.stall_timeout:
            return
        who, source_done = self._idle_culprit()
        if not source_done:
            raise _Failure(f"{who} took no record for {self.job.stall_timeout:g} s{self._so_far()}", target=True)
        log.warning("abandoning source %s as stalled: no complete record for %g s%s; closing its %s stream early",
                    self.job.source, self.job.stall_timeout, self._so_far(), self.kind)
        raise _Failure(f"source {self.job.source} stalled: no complete record for {self.job.stall_timeout:g} s"
                       f"{self._so_far()}", True)

    def _idle_culprit(self) -> tuple[str, bool]:
        w = self.writer
        if self.pump.target_pending or w.backlog:
            return f"target {self.job.target}", False
        if self.fetch is not None and (self.pump.fetch_pending or w.fetch_backlog):
            return self.fetch.what, True
        return f"source {self.job.source}", True

    def _so_far(self) -> str:
        w = self.writer
        return f" (after {w.stats()['entries']} entries)" if w is not None else ""

    # -- progress ----------------------------------------------------------------------

    def _report(self, force: bool = False) -> None:
        self.next_report = time.monotonic() + self.progress_interval
        if self.progress is None or self.writer is None or self.progress_failed:
            return
        counts = self.writer.vbucket_counts()
        delta = {}
        for vb, (entries, nbytes) in counts.items():
            e0, b0 = self.reported.get(vb, (0, 0))
            if entries != e0 or nbytes != b0:
                delta[vb] = (entries - e0, nbytes - b0)
        if delta or force:
            self.reported = counts
        try:  # called even with nothing new: it is also the worker's heartbeat
            self.progress(delta)
        except Exception as e:  # whoever follows us is gone: end early (a TAP stream is still drained)
            log.exception("progress callback failed; ending the stream")
            self.progress_failed = repr(e)
