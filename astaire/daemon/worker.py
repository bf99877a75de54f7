"""Worker processes: each takes whole streams (one source server and its vbuckets).

The supervisor forks a worker with ``spawn()`` and talks to it over a socketpair in
msgpack messages (maps with a ``"t"`` type):

    supervisor -> worker   {"t": "job", "id": n, "job": {StreamJob keywords}}
                           {"t": "quit"}
    worker -> supervisor   {"t": "ready", "pid": pid}                     once, after boot
                           {"t": "progress", "id": n, "d": {vb: [entries, bytes]}}  deltas
                           {"t": "hb", "id": n}                           liveness, while streaming
                           {"t": "result", "id": n, "ok": bool, "error": str|None, "kind": str,
                            "counts": {vb: [entries, bytes]}, "seconds": s, "stats": {...},
                            "target_failed": bool, "drained": bytes}

A worker runs one stream at a time and always to its end (a TAP stream closed early can
crash the Clearwater fork). While it streams it sends a message at least every
``HEARTBEAT`` seconds; the supervisor kills a worker silent for much longer. SIGTERM while
idle ends it at once; while streaming it stops writing and reads a TAP stream to the
server's close (discarding it), reports, then exits. It exits 0 when the supervisor says
quit or goes away, and with ``EXIT_BOOT_ERROR`` when it cannot set itself up, so the
supervisor can tell a crash loop from a one-off (as gunicorn's workers do).
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import time
import traceback

import msgpack

from astaire.daemon import logs

log = logging.getLogger("astaire.worker")

EXIT_OK = 0
EXIT_CRASH = 1          # an unexpected exception in the worker loop
EXIT_BOOT_ERROR = 3     # could not import or set up the stream machinery: retrying will not help soon
EXIT_CHANNEL_ERROR = 4  # the supervisor's messages made no sense

BOOT_FAILURE_CODES = frozenset({EXIT_BOOT_ERROR})

HEARTBEAT = 1.0  # seconds: the longest a streaming worker stays silent

# Signals the supervisor handles; a worker must not act on them (a SIGHUP or SIGINT sent to
# the process group is the supervisor's business). SIGTERM has its own handler (Worker).
_IGNORED_IN_WORKER = (signal.SIGHUP, signal.SIGUSR1, signal.SIGINT, signal.SIGQUIT)
_DEFAULT_IN_WORKER = (signal.SIGCHLD, signal.SIGUSR2)
_STOP_SIGNALS = {signal.SIGTERM, *_IGNORED_IN_WORKER, *_DEFAULT_IN_WORKER}  # blocked across a fork


class _Stop(Exception):
    """SIGTERM while idle: leave the loop and exit 0."""


def pack(message: dict) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def unpacker() -> msgpack.Unpacker:
    # vbucket numbers are map keys; bound the buffer so a corrupt peer cannot grow it without limit.
    return msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=64 * 1024 * 1024)


def _plain(value):
    """Something msgpack can carry (stream stats may hold tuples, floats, enums...)."""
    if isinstance(value, dict):
        return {(k if isinstance(k, (int, str)) else str(k)): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return value
    return str(value)


def _load_stream():
    """The stream machinery, imported after fork so an import failure is a boot failure."""
    from astaire.resync.stream import StreamJob, run_stream

    return StreamJob, run_stream


def preload() -> None:
    """In the supervisor, before it forks: import the stream machinery (once: later calls find
    it in sys.modules), so that every worker inherits it instead of importing it again (0.03 s
    of CPU each, paid again by each replacement). A failure here is ignored: the worker's own
    ``_load_stream`` reports it as a boot failure.

    ``encodings.idna`` too: ``socket.getaddrinfo`` imports it to encode a host given as text,
    the first time a process connects (6 ms of CPU in each worker otherwise)."""
    try:
        import encodings.idna  # noqa: F401
        import astaire.resync.stream  # noqa: F401
    except Exception:
        pass


class Worker:
    """The worker side of the channel; ``run()`` returns the process exit code."""

    def __init__(self, sock: socket.socket, progress_interval: float = 0.25):
        self.sock = sock
        self.progress_interval = progress_interval
        self.busy = False
        self.terminating = False
        self.last_sent = 0.0

    def send(self, message: dict) -> None:
        self.sock.sendall(pack(message))
        self.last_sent = time.monotonic()

    def _on_term(self, sig, frame) -> None:
        self.terminating = True
        if not self.busy:
            raise _Stop()

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_term)
        try:
            return self._run()
        except _Stop:
            return EXIT_OK

    def _run(self) -> int:
        try:
            stream_job, run_stream = _load_stream()
        except Exception:
            log.error("worker %d cannot load the stream machinery:\n%s", os.getpid(), traceback.format_exc())
            return EXIT_BOOT_ERROR
        self.send({"t": "ready", "pid": os.getpid()})
        messages = unpacker()
        while True:
            if self.terminating:
                return EXIT_OK
            try:
                data = self.sock.recv(65536)
            except ConnectionError:
                return EXIT_OK
            if not data:
                return EXIT_OK  # the supervisor went away
            messages.feed(data)
            for msg in messages:
                kind = msg.get("t") if isinstance(msg, dict) else None
                if kind == "quit":
                    return EXIT_OK
                if kind != "job":
                    log.error("worker %d: unexpected message from the supervisor: %r", os.getpid(), msg)
                    return EXIT_CHANNEL_ERROR
                self.busy = True
                try:
                    self.run_job(msg["id"], msg["job"], stream_job, run_stream)
                finally:
                    self.busy = False

    def run_job(self, job_id: int, spec: dict, stream_job, run_stream) -> None:
        def progress(delta) -> None:
            if delta:
                self.send({"t": "progress", "id": job_id,
                           "d": {int(vb): [int(e), int(b)] for vb, (e, b) in delta.items()}})
            elif time.monotonic() - self.last_sent >= HEARTBEAT:
                self.send({"t": "hb", "id": job_id})

        try:
            job = stream_job(**spec)
            result = run_stream(job, progress=progress, progress_interval=self.progress_interval,
                                should_stop=lambda: self.terminating)
            if self.terminating:
                log.info("worker %d stopping on SIGTERM: stream from %s ended (%s); %d TAP bytes drained and "
                         "discarded", os.getpid(), spec.get("source"), "complete" if result.ok else result.error,
                         int(getattr(result, "drained_bytes", 0) or 0))
            reply = {
                "t": "result", "id": job_id, "ok": bool(result.ok), "error": result.error,
                "kind": str(result.kind or ""),
                "counts": {int(vb): [int(e), int(b)] for vb, (e, b) in (result.vbucket_counts or {}).items()},
                "seconds": float(result.seconds or 0.0), "stats": _plain(result.stats or {}),
                "target_failed": bool(getattr(result, "target_failed", False)),
                "drained": int(getattr(result, "drained_bytes", 0) or 0),
            }
        except (BrokenPipeError, ConnectionResetError):
            raise  # the supervisor is gone: nothing to report to
        except Exception as exc:  # a bug, not a network problem (run_stream reports those)
            log.error("worker %d: stream from %s failed unexpectedly:\n%s", os.getpid(), spec.get("source"),
                      traceback.format_exc())
            reply = {"t": "result", "id": job_id, "ok": False, "error": f"internal error: {exc!r}",
                     "kind": "", "counts": {}, "seconds": 0.0, "stats": {}}
        self.send(reply)


def _reset_signals() -> None:
    """In a new worker: none of the supervisor's handlers survive. SIGTERM ends the worker by
    default until Worker.run takes it."""
    signal.set_wakeup_fd(-1)
    for sig in _IGNORED_IN_WORKER:
        signal.signal(sig, signal.SIG_IGN)
    for sig in (signal.SIGTERM, *_DEFAULT_IN_WORKER):
        signal.signal(sig, signal.SIG_DFL)


def spawn(close_fds=(), progress_interval: float = 0.25) -> tuple[int, socket.socket]:
    """Fork a worker; returns (pid, the supervisor's end of the channel).

    ``close_fds`` are the supervisor's descriptors the child must not keep (its wake-up
    pipe, the other workers' channels: a sibling holding a channel open would hide the
    supervisor's death from that worker).
    """
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    # The child starts with the supervisor's signal handlers: a stop signal delivered before it
    # has its own would run the supervisor's handler there and be lost (the worker then waits
    # for jobs until the supervisor's stop timeout kills it). Blocked across the fork, such a
    # signal waits until the child has reset its handlers (SIGTERM: the default, ending it,
    # until Worker.run takes it).
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        pid = os.fork()
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        raise
    if pid:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        theirs.close()
        return pid, ours
    code = EXIT_CRASH
    try:
        _reset_signals()
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        ours.close()
        for fd in close_fds:
            try:
                os.close(fd)
            except OSError:
                pass
        logs.reopen_for_worker()
        code = Worker(theirs, progress_interval).run()
    except (BrokenPipeError, ConnectionResetError):
        code = EXIT_OK
    except BaseException:
        try:
            log.error("worker %d crashed:\n%s", os.getpid(), traceback.format_exc())
        except BaseException:
            pass
    finally:
        try:
            logging.shutdown()
        except BaseException:
            pass
        os._exit(code)
