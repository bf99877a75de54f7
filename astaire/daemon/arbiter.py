"""The arbiter: signals, the worker processes, and the loop.

Modelled on gunicorn's arbiter. Signal handlers only queue the signal (and the wake-up
fd set with ``signal.set_wakeup_fd`` ends the main loop's wait); the main loop reaps
dead workers with ``waitpid(-1, WNOHANG)``, handles one queued signal per turn, keeps the
worker count right, kills workers that went silent, lets the conductor move the resync on
(``astaire.daemon.conductor``: the view, the resync, the local memcached) and publishes
the statistics.

    SIGHUP          re-read cluster_settings; resync if the view changed
    SIGUSR1         full resync
    SIGTERM/INT/QUIT stop the workers (open TAP streams are read to the server's close) and exit 0

Nothing here waits on the network: the local memcached is asked on a thread of its own
(``astaire.daemon.local``), so signals are handled whatever memcached does.

Workers that stream send a message at least every second; one silent for
``worker_timeout`` seconds of the arbiter's own waking time (a pause of the whole tree by
astaire-throttle does not count) is killed and its stream redone.

Starting the daemon (pidfile, detaching) is in ``astaire.daemon.main``.
"""
from __future__ import annotations

import logging
import os
import selectors
import signal
import sys
import time
from dataclasses import dataclass

from astaire import stats
from astaire.cluster.settings import ConfigError, read_cluster_settings, settings_digest
from astaire.cluster.view import ClusterView
from astaire.daemon import logs, worker
from astaire.daemon.bookkeeping import Stream
from astaire.daemon.conductor import Conductor
from astaire.daemon.local import LocalMonitor, LocalNode
from astaire.daemon.pidfile import Pidfile

log = logging.getLogger("astaire.supervisor")

EXIT_OK = 0
EXIT_ALREADY_RUNNING = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3

AWAKE_STEP_MAX = 2.0      # seconds of one loop turn counted as awake (longer: the arbiter was stopped)
BOOT_BACKOFF_MAX = 30.0
HEARTBEAT = 1.0


@dataclass
class Options:
    local_name: str
    cluster_settings_file: str
    log_dir: str
    log_level: int
    pidfile: str
    stats_file: str
    workers: int
    source: str = "auto"
    tag_interval: float = 10.0
    daemon: bool = False
    vbuckets: int = 128
    replicas: int = 2
    connect_timeout: float = 5.0
    idle_timeout: float = 60.0
    worker_timeout: float = 30.0  # a streaming worker silent this long (arbiter-awake time) is killed
    stall_timeout: float = 120.0  # a source giving no complete record this long is abandoned
    stop_timeout: float = 60.0    # on SIGTERM, time workers get to drain TAP streams before SIGKILL


# -- workers as the supervisor sees them -----------------------------------------------------------

@dataclass
class WorkerHandle:
    pid: int
    sock: object
    messages: object
    ready: bool = False
    stream: Stream | None = None
    last_heard: float = 0.0   # the arbiter's awake clock when it last heard from the worker
    spoke: bool = False       # it has reported on its current stream (the source is open)
    killed: bool = False


# -- the arbiter ----------------------------------------------------------------------------------

class Supervisor:
    SIGNALS = (signal.SIGHUP, signal.SIGUSR1, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD)
    SIG_NAMES = {s: s.name for s in SIGNALS}

    def __init__(self, options: Options, view: ClusterView, digest: str, pidfile: Pidfile | None = None):
        self.options = options
        self.local = options.local_name
        self.view = view
        self.view_digest = digest
        self.pidfile = pidfile
        self.workers: dict[int, WorkerHandle] = {}
        self.sig_queue: list[int] = []
        self.conductor: Conductor | None = None
        self.stopping = False
        self.exit_code = EXIT_OK
        self.boot_failures = 0
        self.spawn_not_before = 0.0
        self.next_heartbeat = 0.0
        self.stats: stats.StatsWriter | None = None
        self.selector: selectors.BaseSelector | None = None
        self._wake_r = self._wake_w = -1
        self.monitor: LocalMonitor | None = None
        self.judge_after = 0.0            # no worker is judged silent before this awake time
        self.awake = 0.0                  # seconds the arbiter itself was running (see tick)
        self._last_tick = time.monotonic()

    node_factory = LocalNode  # injectable for tests; the real one talks to the local memcached

    # -- life cycle ----------------------------------------------------------------------------

    def run(self) -> int:
        try:
            self._setup()
            while not self.stopping:
                self.tick()
                self.reap_workers()
                sig = self.sig_queue.pop(0) if self.sig_queue else None
                if sig is not None:
                    self.handle_signal(sig)
                    if self.stopping:
                        break
                self.manage_workers()
                self.murder_workers()
                c = self.conductor
                c.local_answers()
                c.check_local()
                c.advance(self.idle_workers(), self.hand_out, self.stopping)
                self.heartbeat()
                if sig is None:
                    self.wait()
        except Exception as e:  # a bug or an unusable environment: say so, stop cleanly
            log.exception("supervisor stopping on an unexpected error")
            print(f"astaire: stopping on an unexpected error: {e!r} (see the log)", file=sys.stderr)
            self.exit_code = 1
        finally:
            self._teardown()
        return self.exit_code

    def _setup(self) -> None:
        o = self.options
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self._wake_r, selectors.EVENT_READ, None)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for sig in self.SIGNALS:
            signal.signal(sig, self._on_signal)
        self.stats = stats.StatsWriter(o.stats_file, vbucket_count=o.vbuckets,
                                       max_connections=max(16, o.workers))
        self.stats.local_name = self.local
        self.stats.settings_file = o.cluster_settings_file
        self.stats.workers = o.workers
        self.stats.settings_digest = ""  # set when the first resync starts from this view
        self.stats.publish()
        log.log(logs.STATUS, "astaire %d started: local node %s, %d workers, source %s, cluster %s",
                os.getpid(), self.local, o.workers, o.source, Conductor._describe_view(self.view))
        logs.STARTED.log()
        self.monitor = LocalMonitor(self.node_factory(self.local), self._wake_w)
        self.conductor = Conductor(o, self.view, self.view_digest, self.stats, self.monitor)

    def _teardown(self) -> None:
        self.stop_workers()
        if self.monitor is not None:
            self.monitor.stop()
        signal.set_wakeup_fd(-1)
        for sig in self.SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        if self.selector is not None:
            self.selector.close()
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        if self.stats is not None:
            self.stats.close()
        if self.pidfile is not None:
            self.pidfile.release()
        logs.ENDED.log()

    def _on_signal(self, sig, frame) -> None:
        # Only queue it: the main loop does the work (the wake-up fd ends its wait). A signal
        # already waiting is not queued twice, so the queue stays short and never drops a TERM.
        if sig != signal.SIGCHLD and sig not in self.sig_queue:
            self.sig_queue.append(sig)

    def handle_signal(self, sig: int) -> None:
        name = self.SIG_NAMES.get(sig, str(sig))
        log.info("handling %s", name)
        if sig == signal.SIGHUP:
            self.handle_hup()
        elif sig == signal.SIGUSR1:
            self.handle_usr1()
        elif sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            self.handle_term(sig)

    def handle_hup(self) -> None:
        path = self.options.cluster_settings_file
        digest = settings_digest(path)  # before reading: an edit in between only makes wait-sync wait
        try:
            settings = read_cluster_settings(path)
        except ConfigError as e:
            log.error("SIGHUP: invalid cluster settings, keeping the current view (%s): %s",
                      Conductor._describe_view(self.conductor.view), e)
            return
        view = ClusterView.from_settings(settings, self.options.vbuckets, self.options.replicas)
        self.conductor.view_changed(view, digest)

    def handle_usr1(self) -> None:
        log.log(logs.STATUS, "SIGUSR1: full resync requested")
        self.conductor.request_resync(full=True, why="a full resync was requested")

    def handle_term(self, sig: int) -> None:
        log.log(logs.STATUS, "%s: stopping", self.SIG_NAMES.get(sig, sig))
        logs.TERMINATED.log(int(sig))
        self.stopping = True

    def wait(self) -> None:
        now = time.monotonic()
        timeout = min(HEARTBEAT, max(0.0, self.next_heartbeat - now), self.conductor.next_wake(now))
        if len(self.workers) < self.options.workers:
            timeout = min(timeout, max(0.0, self.spawn_not_before - now))
        for key, _ in self.selector.select(timeout):
            if key.fileobj == self._wake_r:
                try:
                    while os.read(self._wake_r, 4096):
                        pass
                except BlockingIOError:
                    pass
            else:
                self.read_worker(key.data)

    def tick(self) -> None:
        """Advance the awake clock: time the arbiter itself ran. A turn that took longer than
        AWAKE_STEP_MAX means the arbiter was stopped (astaire-throttle's SIGSTOP fallback
        pauses the whole tree), and that pause must not count against the workers."""
        now = time.monotonic()
        step = max(0.0, now - self._last_tick)
        self.awake += min(step, AWAKE_STEP_MAX)
        self._last_tick = now
        if step > AWAKE_STEP_MAX:  # the whole tree was paused: let the workers speak before judging them
            self.judge_after = self.awake + 2 * worker.HEARTBEAT + AWAKE_STEP_MAX

    def heartbeat(self) -> None:
        now = time.monotonic()
        if now >= self.next_heartbeat:
            self.stats.publish()  # heartbeat time and a decaying bandwidth
            self.next_heartbeat = now + HEARTBEAT

    # -- workers --------------------------------------------------------------------------

    def manage_workers(self) -> None:
        now = time.monotonic()
        while not self.stopping and len(self.workers) < self.options.workers and now >= self.spawn_not_before:
            self.spawn_worker()

    def spawn_worker(self) -> None:
        worker.preload()
        close_fds = [self._wake_r, self._wake_w, self.selector.fileno()]
        close_fds += [w.sock.fileno() for w in self.workers.values()]
        if self.pidfile is not None and self.pidfile.fd is not None:
            close_fds.append(self.pidfile.fd)
        pid, sock = worker.spawn(close_fds)
        sock.setblocking(False)
        self.workers[pid] = WorkerHandle(pid, sock, worker.unpacker(), last_heard=self.awake)
        self.selector.register(sock, selectors.EVENT_READ, pid)
        log.info("worker %d spawned", pid)

    def read_worker(self, pid: int) -> None:
        w = self.workers.get(pid)
        if w is None or w.sock is None:
            return
        while True:
            try:
                data = w.sock.recv(262144)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:  # the worker is exiting; reap_workers deals with it
                self.selector.unregister(w.sock)
                w.sock.close()
                w.sock = None
                return
            w.messages.feed(data)
            for msg in w.messages:
                self.on_message(w, msg)

    def on_message(self, w: WorkerHandle, msg: dict) -> None:
        w.last_heard = self.awake
        kind = msg.get("t")
        if kind == "ready":
            w.ready = True
            self.boot_failures = 0
            return
        s = w.stream
        if s is None or msg.get("id") != s.id:
            log.warning("worker %d sent %s for stream %s it is not running", w.pid, kind, msg.get("id"))
            return
        w.spoke = True
        if kind == "hb":
            return
        if kind == "progress":
            self.conductor.on_progress(s, msg["d"])
        elif kind == "result":
            w.stream = None
            self.conductor.on_result(s, msg)

    def reap_workers(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            w = self.workers.get(pid)
            if w is None:
                continue
            self.read_worker(pid)  # a result it sent just before dying still counts
            self.workers.pop(pid)
            if w.sock is not None:
                self.selector.unregister(w.sock)
                w.sock.close()
            self.worker_exited(w, status)

    def worker_exited(self, w: WorkerHandle, status: int) -> None:
        code = os.waitstatus_to_exitcode(status)
        how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        if self.stopping:
            return
        if code in worker.BOOT_FAILURE_CODES or not w.ready:
            self.boot_failures += 1
            delay = min(BOOT_BACKOFF_MAX, 0.5 * 2 ** (self.boot_failures - 1))
            self.spawn_not_before = time.monotonic() + delay
            level = logging.ERROR if self.boot_failures >= 3 else logging.WARNING
            log.log(level, "worker %d failed to boot (%s), %d in a row; next spawn in %.1f s",
                    w.pid, how, self.boot_failures, delay)
        elif w.stream is None:
            log.warning("worker %d exited (%s) while idle; replacing it", w.pid, how)
        if w.stream is not None:
            self.conductor.worker_lost(w.pid, w.stream, how)

    def idle_workers(self) -> list[WorkerHandle]:
        return [w for w in self.workers.values() if w.ready and w.stream is None and w.sock is not None]

    def hand_out(self, w: WorkerHandle, s: Stream, job: dict) -> bool:
        """Send ``job`` (stream ``s``) to the worker; False if its channel is broken."""
        try:
            w.sock.setblocking(True)
            w.sock.sendall(worker.pack({"t": "job", "id": s.id, "job": job}))
        except OSError as e:
            log.warning("cannot hand a stream to worker %d (%s); it will be replaced", w.pid, e)
            return False
        finally:
            if w.sock is not None:
                w.sock.setblocking(False)
        w.stream = s
        w.last_heard = self.awake
        w.spoke = False
        return True

    def murder_workers(self) -> None:
        """Kill a streaming worker silent for longer than worker_timeout (awake time): hung,
        or stopped. Its stream is redone (for TAP, that is an early close: logged)."""
        o = self.options
        # Until it first reports, the worker may be opening the source: blocking calls of up
        # to a few connect timeouts with no heartbeat.
        opening = max(o.worker_timeout, 3 * o.connect_timeout + 5)
        if self.awake < self.judge_after:
            return
        for w in self.workers.values():
            if w.stream is None or w.killed:
                continue
            if self.awake - w.last_heard <= (o.worker_timeout if w.spoke else opening):
                continue
            log.error("worker %d has been silent for %.0f s streaming from %s (hung or stopped); killing it: "
                      "its stream is redone, and a TAP stream it held is closed early",
                      w.pid, self.awake - w.last_heard, w.stream.server)
            w.killed = True
            try:
                os.kill(w.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stop_workers(self) -> None:
        """SIGTERM every worker and wait: a streaming worker stops writing and reads its TAP
        stream to the server's close (the fork can crash on an early close) before it exits."""
        streaming = [w for w in self.workers.values() if w.stream is not None]
        for pid in list(self.workers):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        if streaming:
            log.log(logs.STATUS, "waiting up to %.0f s for %d streaming worker(s) to read their streams to the end",
                    self.options.stop_timeout, len(streaming))
        deadline = time.monotonic() + self.options.stop_timeout
        while self.workers and time.monotonic() < deadline:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid:
                self._forget_worker(pid)
            else:
                self._discard_worker_output()
                time.sleep(0.02)
        for pid in list(self.workers):
            log.warning("worker %d did not stop within %.0f s; killing it", pid, self.options.stop_timeout)
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            self._forget_worker(pid)

    def _discard_worker_output(self) -> None:
        """While stopping: keep the channels empty so no worker blocks on a full socket."""
        for w in self.workers.values():
            if w.sock is None:
                continue
            try:
                while w.sock.recv(65536):
                    pass
            except (BlockingIOError, OSError):
                pass

    def _forget_worker(self, pid: int) -> None:
        w = self.workers.pop(pid, None)
        if w is not None and w.sock is not None:
            try:
                self.selector.unregister(w.sock)
            except (KeyError, ValueError):
                pass
            w.sock.close()
