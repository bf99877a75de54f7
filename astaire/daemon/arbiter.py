"""The arbiter: signals, the view, the worklist, the workers and the statistics.

Modelled on gunicorn's arbiter. Signal handlers only queue the signal (and the wake-up
fd set with ``signal.set_wakeup_fd`` ends the main loop's wait); the main loop reaps
dead workers with ``waitpid(-1, WNOHANG)``, handles one queued signal per turn, keeps the
worker count right, checks the resync tag, hands streams to idle workers and publishes
the statistics.

    SIGHUP          re-read cluster_settings; resync if the view changed
    SIGUSR1         full resync
    SIGTERM/INT/QUIT stop the workers (open TAP streams are read to the server's close) and exit 0

Every ``tag_interval`` seconds it checks the local memcached (on a thread of its own,
``astaire.daemon.local``: the loop never waits on the network): a new identity (pid, start
time) or a missing tag means it restarted and lost its data: full resync. A resync ends
only after the identity is checked again, so a restart at any moment is never reported as
a completed resync. When the local memcached does not answer, or a stream fails because
of it, the work waits (``waiting_for_local``) and is retried; the sources are not blamed.

Workers that stream send a message at least every second; one silent for
``worker_timeout`` seconds of the arbiter's own waking time (a pause of the whole tree by
astaire-throttle does not count) is killed and its stream redone.

A resync makes one pass per source: every old replica is streamed once, for all the wanted
vbuckets it holds, each stream on an idle worker, all sources at once. A request that
arrives during a resync (SIGHUP with a changed view, SIGUSR1, missing tag) never aborts a
running stream (TAP streams are read to their end); the old worklist is no longer
dispatched and the new resync starts once the running streams have ended.

The resync's own bookkeeping (streams waiting and running, counters) is in
``astaire.daemon.bookkeeping``; starting the daemon (pidfile, detaching) in
``astaire.daemon.main``.
"""
from __future__ import annotations

import itertools
import logging
import os
import selectors
import signal
import sys
import time
from dataclasses import dataclass

from astaire import stats
from astaire.cluster.settings import ConfigError, parse_server, read_cluster_settings, settings_digest
from astaire.cluster.view import ClusterView
from astaire.cluster.worklist import Worklist
from astaire.daemon import logs, worker
from astaire.daemon.bookkeeping import Resync, Stream, ranges
from astaire.daemon.local import LocalMonitor, LocalNode
from astaire.daemon.pidfile import Pidfile

log = logging.getLogger("astaire.supervisor")

EXIT_OK = 0
EXIT_ALREADY_RUNNING = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3

AWAKE_STEP_MAX = 2.0      # seconds of one loop turn counted as awake (longer: the arbiter was stopped)
LOCAL_RETRY_MAX = 10.0    # seconds between checks of a local memcached that does not answer
TARGET_BACKOFF_MAX = 30.0 # seconds before streams are handed out again after the target failed
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
        self.resync: Resync | None = None
        self.requested: bool | None = None  # None, or "full?" of the resync to start next
        self.stopping = False
        self.exit_code = EXIT_OK
        self.boot_failures = 0
        self.spawn_not_before = 0.0
        self.next_tag_check = 0.0
        self.tag_seen: bool | None = None  # the last tag check's answer (None: no answer)
        self.next_heartbeat = 0.0
        self.stream_ids = itertools.count(1)  # unique over the daemon's life
        self.stats: stats.StatsWriter | None = None
        self.selector: selectors.BaseSelector | None = None
        self._wake_r = self._wake_w = -1
        self.monitor: LocalMonitor | None = None
        self.initial = True               # the first answer from the local memcached decides the first resync
        self.need_check = True            # a resync starts only after a fresh answer from the local memcached
        self.local_identity: tuple | None = None
        self.cas_enabled: bool | None = None
        self.waiting_for_local = False
        self.local_failures = 0
        self.next_local_retry = 0.0
        self.target_failures = 0
        self.dispatch_not_before = 0.0
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
                self.local_answers()
                self.check_local()
                self.advance()
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
                os.getpid(), self.local, o.workers, o.source, self._describe_view(self.view))
        logs.STARTED.log()
        self.monitor = LocalMonitor(self.node_factory(self.local), self._wake_w)

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
                      self._describe_view(self.view), e)
            return
        view = ClusterView.from_settings(settings, self.options.vbuckets, self.options.replicas)
        if view == self.view:
            log.log(logs.STATUS, "SIGHUP: cluster settings re-read, view unchanged (%s)", self._describe_view(view))
            self.view_digest = digest
            if self.resync is None and self.requested is None:
                self.stats.settings_digest = digest
                self.stats.publish()
            return
        log.log(logs.STATUS, "SIGHUP: cluster view changed from %s to %s",
                self._describe_view(self.view), self._describe_view(view))
        self.view, self.view_digest = view, digest
        self.request_resync(full=False, why="the cluster view changed")

    def handle_usr1(self) -> None:
        log.log(logs.STATUS, "SIGUSR1: full resync requested")
        self.request_resync(full=True, why="a full resync was requested")

    def handle_term(self, sig: int) -> None:
        log.log(logs.STATUS, "%s: stopping", self.SIG_NAMES.get(sig, sig))
        logs.TERMINATED.log(int(sig))
        self.stopping = True

    def wait(self) -> None:
        now = time.monotonic()
        timeout = min(HEARTBEAT, max(0.0, self.next_heartbeat - now))
        if not self.monitor.busy:
            due = self.next_local_retry if self.waiting_for_local else self.next_tag_check
            timeout = min(timeout, max(0.0, due - now))
        if self.resync is not None and self.dispatch_not_before > now:
            timeout = min(timeout, self.dispatch_not_before - now)
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
        self.awake += min(max(0.0, now - self._last_tick), AWAKE_STEP_MAX)
        self._last_tick = now

    def heartbeat(self) -> None:
        now = time.monotonic()
        if now >= self.next_heartbeat:
            self.stats.waiting_for_local = self.waiting_for_local
            self.stats.publish()  # heartbeat time and a decaying bandwidth
            self.next_heartbeat = now + HEARTBEAT

    # -- workers --------------------------------------------------------------------------

    def manage_workers(self) -> None:
        now = time.monotonic()
        while not self.stopping and len(self.workers) < self.options.workers and now >= self.spawn_not_before:
            self.spawn_worker()

    def spawn_worker(self) -> None:
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
        if kind == "hb":
            return
        if kind == "progress":
            self.on_progress(s, msg["d"])
        elif kind == "result":
            w.stream = None
            self.on_result(s, msg)

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
        s = w.stream
        if s is not None and self.resync is not None and s.id in self.resync.running:
            self.stats.connections.pop(s.id, None)
            entries, nbytes = s.totals()
            if self.resync.worker_lost(s):
                log.warning("worker %d died (%s) streaming %d vbuckets from %s; redoing the stream "
                            "(%d entries, %d bytes it had reported are not counted)",
                            w.pid, how, len(s.vbuckets), s.server, entries, nbytes)
            else:
                log.error("worker %d died (%s) streaming from %s, the %d time for this stream; "
                          "treating %s as failed", w.pid, how, s.server, s.attempts, s.server)
            self._publish_counters()

    def murder_workers(self) -> None:
        """Kill a streaming worker silent for longer than worker_timeout (awake time): hung,
        or stopped. Its stream is redone (for TAP, that is an early close: logged)."""
        o = self.options
        # Opening a source blocks for up to a few connect timeouts without a heartbeat.
        bound = max(o.worker_timeout, 3 * o.connect_timeout + 5)
        for w in self.workers.values():
            if w.stream is None or w.killed or self.awake - w.last_heard <= bound:
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

    # -- resync ---------------------------------------------------------------------------

    # -- the local memcached --------------------------------------------------------------

    def check_local(self) -> None:
        """Ask the monitor thread what it needs to know next (one question at a time)."""
        if self.monitor.busy:
            return
        now = time.monotonic()
        r = self.resync
        if r is not None and r.finishing and not r.superseded and not r.finish_asked:
            if now >= self.next_local_retry:
                r.finish_asked = True
                self.monitor.request("finish", expected=r.identity)
            return
        if self.waiting_for_local:
            due = now >= self.next_local_retry
        else:
            due = now >= self.next_tag_check or (self.need_check and self.requested is not None)
        if due or self.initial and now >= self.next_local_retry:
            self.monitor.request("check", cas=True)

    def local_answers(self) -> None:
        for a in self.monitor.answers():
            if a.ok:
                self._local_answered(a)
            else:
                self._local_silent(a)

    def _local_silent(self, a) -> None:
        now = time.monotonic()
        self.local_failures += 1
        delay = min(LOCAL_RETRY_MAX, 0.5 * 2 ** (self.local_failures - 1))
        self.next_local_retry = now + delay
        level = logging.WARNING if self.local_failures in (1, 10) or self.local_failures % 60 == 0 else logging.INFO
        log.log(level, "the local memcached %s does not answer (%s); %s; retrying in %.1f s",
                self.local, a.error, "the resync waits for it" if self.resync or self.requested is not None
                else "waiting for it", delay)
        if a.kind == "finish" and self.resync is not None:
            self.resync.finish_asked = False
        self._set_waiting(True)

    def _set_waiting(self, waiting: bool) -> None:
        if waiting != self.waiting_for_local:
            self.waiting_for_local = waiting
            self.stats.waiting_for_local = waiting
            self.stats.publish()

    def _local_answered(self, a) -> None:
        now = time.monotonic()
        if self.waiting_for_local:
            log.log(logs.STATUS, "the local memcached %s answers again (after %d tries)", self.local,
                    self.local_failures)
        self.local_failures = 0
        self._set_waiting(False)
        self.next_tag_check = now + self.options.tag_interval
        previous, self.local_identity = self.local_identity, a.identity
        if a.kind == "finish":
            self._finish_answered(a, previous)
            return
        self.cas_enabled = a.cas_enabled
        self.tag_seen = a.tag
        if self.initial:
            self.initial = False
            if a.tag is False:
                log.log(logs.STATUS, "no resync tag in the local memcached %s: full resync", self.local)
            self.request_resync(full=a.tag is False, why="astaire started")
        elif previous is not None and a.identity != previous:
            log.log(logs.STATUS, "the local memcached %s restarted (pid %s started at %s, was pid %s started at %s) "
                    "and lost its data: full resync", self.local, a.identity[0], a.identity[1], previous[0],
                    previous[1])
            self.request_resync(full=True, why="the local memcached restarted")
        elif a.tag is False and self._tag_checks_active():
            log.log(logs.STATUS, "the resync tag is gone from the local memcached %s (it restarted): "
                    "full resync", self.local)
            self.request_resync(full=True, why="the local memcached restarted")
        self.need_check = False  # this answer is fresh enough to start a resync on

    def _finish_answered(self, a, previous) -> None:
        r = self.resync
        if r is None or not r.finishing or r.superseded:
            return
        if a.restarted:
            log.log(logs.STATUS, "the local memcached %s restarted during the resync (pid %s started at %s, was "
                    "pid %s started at %s): the resync is not complete; a full resync follows", self.local,
                    a.identity[0], a.identity[1], r.identity[0], r.identity[1])
            self.request_resync(full=True, why="the local memcached restarted")
            self.need_check = True
            return
        self.tag_seen = True
        self.finish_resync()

    def _tag_checks_active(self) -> bool:
        """A missing tag means a restart when idle, or during a resync that started with the
        tag in place. A resync that started without the tag sets it only at its end (its
        restarts are caught by the identity check)."""
        if self.requested is not None:
            return False
        r = self.resync
        return r is None or (r.watch_tag and not r.superseded)

    def request_resync(self, full: bool, why: str) -> None:
        self.requested = bool(full or self.requested)
        self.need_check = True
        if self.resync is not None and not self.resync.superseded:
            self.resync.superseded = True
            log.log(logs.STATUS, "%s during a resync: %d running streams finish, then a new %sresync starts",
                    why, len(self.resync.running), "full " if self.requested else "")

    def advance(self) -> None:
        """Move the resync on: start a requested one, queue its pass, finish, dispatch."""
        r = self.resync
        if r is not None and r.superseded:
            if r.running:
                return
            log.log(logs.STATUS, "superseded resync stopped (%d entries)", r.entries)
            self.resync = r = None
        if r is None:
            if self.requested is None or self.stopping:
                return
            if self.need_check or self.waiting_for_local or self.monitor.busy or self.local_identity is None:
                return  # a fresh answer from the local memcached first
            r = self.start_resync()
            if r is None:
                return
        if r.finishing:
            return
        if not r.pending and not r.running:
            if not r.start():
                r.finishing = True  # done once the local memcached is checked (check_local)
                return
            log.info("one pass per source: %s", ", ".join(f"{s.server} ({len(s.vbuckets)} vbuckets)" for s in r.pending))
        self.dispatch()

    def start_resync(self) -> Resync | None:
        full = bool(self.requested)
        self.requested = None
        wl = Worklist(self.view, self.local, full=full)
        st = self.stats
        in_cluster = self.local in self.view.servers or self.local in self.view.new_servers
        st.local_in_cluster = in_cluster
        if not in_cluster:
            log.warning("the local node %s is in neither server list (%s): nothing to pull; check local_ip "
                        "or --local-name", self.local, self._describe_view(self.view))
            logs.LOCAL_NOT_IN_CLUSTER.log(self.local)
        st.target_cas_disabled = self.cas_enabled is False
        if self.cas_enabled is False:
            log.error("resync refused: the local memcached %s runs without CAS (-C), so records could not be "
                      "replaced without risking newer data; restart it without -C", self.local)
            logs.RESYNC_REFUSED.log(self.local)
            st.last_resync = {"result": "refused", "failed_vbuckets": wl.vbuckets, "full": full,
                              "finished_at": time.time(), "seconds": 0.0, "entries": 0, "bytes": 0}
            st.settings_digest = self.view_digest
            st.reset_counters()
            st.publish()
            return None
        r = self.resync = Resync(wl, full, ids=self.stream_ids)
        r.watch_tag = self.tag_seen is True
        r.identity = self.local_identity
        self.target_failures = 0
        self.dispatch_not_before = 0.0
        st.reset_counters()
        st.state = stats.STATE_RESYNCING
        st.resync_started_at = r.started_at
        st.resync_full = full
        st.buckets_needing = wl.needing
        st.settings_digest = self.view_digest
        st.publish()
        servers = sorted({s for srcs in wl.sources.values() for s in srcs})
        log.log(logs.STATUS, "%s resync started: %d vbuckets to pull, %d (vbucket, source) pairs, from %s",
                "full" if full else "view", len(wl.sources), wl.needing, ", ".join(servers) or "nobody")
        logs.RESYNC_STARTED.log("full " if full else "")
        return r

    def dispatch(self) -> None:
        r = self.resync
        o = self.options
        if self.waiting_for_local or time.monotonic() < self.dispatch_not_before:
            return
        for w in self.workers.values():
            if not (w.ready and w.stream is None and w.sock is not None):
                continue
            s = r.take(w.pid)
            if s is None:
                return
            job = {"source": s.server, "vbuckets": s.vbuckets, "target": self.local, "source_kind": o.source,
                   "vbucket_count": o.vbuckets, "connect_timeout": o.connect_timeout,
                   "idle_timeout": o.idle_timeout, "stall_timeout": o.stall_timeout}
            try:
                w.sock.setblocking(True)
                w.sock.sendall(worker.pack({"t": "job", "id": s.id, "job": job}))
            except OSError as e:
                log.warning("cannot hand a stream to worker %d (%s); it will be replaced", w.pid, e)
                r.running.pop(s.id, None)
                s.worker = None
                r.pending.appendleft(s)
                continue
            finally:
                if w.sock is not None:
                    w.sock.setblocking(False)
            w.stream = s
            w.last_heard = self.awake
            host, port = parse_server(s.server)
            self.stats.connections[s.id] = stats.Connection(host, port, list(s.vbuckets))
            log.info("stream %d: %d vbuckets from %s to worker %d", s.id, len(s.vbuckets), s.server, w.pid)
        self._publish_counters()

    def on_progress(self, s: Stream, delta: dict) -> None:
        r = self.resync
        if r is None or s.id not in r.running:
            return
        _, nbytes = r.progress(s, delta)
        self.stats.bandwidth.add(nbytes)
        conn = self.stats.connections.get(s.id)
        if conn is not None:
            for vb, (e, b) in delta.items():
                conn.entries[vb] = conn.entries.get(vb, 0) + e
                conn.bytes[vb] = conn.bytes.get(vb, 0) + b
        self._publish_counters()

    def on_result(self, s: Stream, msg: dict) -> None:
        r = self.resync
        if r is None or s.id not in r.running:
            return
        ok = bool(msg.get("ok"))
        if not ok and msg.get("target_failed"):
            self.on_target_failed(s, msg)
            return
        _, nbytes = r.finished(s, ok, msg.get("counts") or {})
        self.stats.bandwidth.add(max(0, nbytes))
        self.stats.connections.pop(s.id, None)
        entries, total_bytes = s.totals()
        if ok:
            log.info("stream %d from %s (%s) done: %d vbuckets, %d entries, %d bytes in %.2f s",
                     s.id, s.server, msg.get("kind"), len(s.vbuckets), entries, total_bytes, msg.get("seconds", 0))
        else:
            log.warning("stream %d from %s failed (%s): %s; it is dropped as a source for this resync",
                        s.id, s.server, msg.get("kind") or "?", msg.get("error"))
        self._publish_counters()

    def on_target_failed(self, s: Stream, msg: dict) -> None:
        """The local memcached failed the stream: the source is not blamed. The stream is
        queued again and nothing is handed out until the local memcached answers, then
        after a growing delay; a restart found meanwhile turns this into a full resync."""
        r = self.resync
        self.stats.connections.pop(s.id, None)
        r.requeue(s)
        self.target_failures += 1
        delay = min(TARGET_BACKOFF_MAX, 0.5 * 2 ** (self.target_failures - 1))
        self.dispatch_not_before = time.monotonic() + delay
        log.warning("stream %d from %s stopped because the local memcached %s failed (%s); %s is not blamed: "
                    "the stream is redone once the local memcached answers (in %.1f s at the earliest)",
                    s.id, s.server, self.local, msg.get("error"), s.server, delay)
        self.next_local_retry = time.monotonic()
        self._set_waiting(True)
        self._publish_counters()

    def finish_resync(self) -> None:
        r = self.resync
        wl = r.worklist
        failed = wl.failed_vbuckets
        seconds = time.monotonic() - r.started
        st = self.stats
        st.last_resync = {"result": "failed" if failed else "ok", "failed_vbuckets": failed, "full": r.full,
                          "finished_at": time.time(), "seconds": seconds, "entries": r.entries, "bytes": r.bytes}
        st.resyncs_completed += 1
        st.settings_digest = self.view_digest  # a same-view edit taken in during the resync
        st.reset_counters()
        st.publish()
        self.resync = None
        self.next_tag_check = time.monotonic() + self.options.tag_interval
        if failed:
            log.error("resync finished in %.2f s with %d vbuckets no source could serve: %s "
                      "(failed sources: %s); %d entries, %d bytes", seconds, len(failed),
                      ranges(failed), ", ".join(wl.failed_servers) or "none", r.entries, r.bytes)
            logs.RESYNC_FAILED.log(ranges(failed))
        else:
            log.log(logs.STATUS, "resync completed in %.2f s: %d vbuckets, %d entries, %d bytes, %d streams",
                    seconds, len(wl.sources), r.entries, r.bytes, r.streams)
            logs.RESYNC_COMPLETED.log()

    def _publish_counters(self) -> None:
        r = self.resync
        if r is None:
            return
        st = self.stats
        st.buckets_needing = r.needing
        st.buckets_resynchronized = r.resynchronized
        st.entries = max(0, r.entries)
        st.bytes = max(0, r.bytes)
        st.publish()

    @staticmethod
    def _describe_view(view: ClusterView) -> str:
        if view.resizing:
            return f"servers={','.join(view.servers)} new_servers={','.join(view.new_servers)}"
        return f"servers={','.join(view.servers or view.new_servers)}"
