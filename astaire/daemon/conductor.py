"""The conduct of resyncs: what the arbiter decides about the data, apart from signals and
processes.

It owns the view, the resync in progress (``astaire.daemon.bookkeeping``), the statistics it
publishes, and what is known of the local memcached (asked on a thread of its own,
``astaire.daemon.local``: nothing here waits on the network). The arbiter feeds it events
(a signal's request, a worker's progress or result, a worker lost) and lends it idle
workers to hand streams to.

The rules it keeps:
- A resync starts only after a fresh answer from the local memcached, and records its
  identity (pid, start time). It is complete only when every stream has ended and the
  identity, read again around setting the tag, has not moved; a restart found at any
  moment supersedes it with a full resync.
- A failure of the target requeues the stream: the source is not blamed. Nothing is
  handed out until the local memcached answers (``waiting_for_local``), then after a
  growing delay.
- A local memcached without CAS refuses the resync (event 7008); a local node in neither
  server list is reported (event 7009).
"""
from __future__ import annotations

import itertools
import logging
import time

from astaire import stats
from astaire.cluster.settings import parse_server
from astaire.cluster.view import ClusterView
from astaire.cluster.worklist import Worklist
from astaire.daemon import logs
from astaire.daemon.bookkeeping import Resync, Stream, ranges
from astaire.daemon.local import LocalMonitor
from astaire.resync import pace, settled

log = logging.getLogger("astaire.supervisor")

LOCAL_RETRY_MAX = 10.0    # seconds between checks of a local memcached that does not answer
TARGET_BACKOFF_MAX = 30.0 # seconds before streams are handed out again after the target failed


class Conductor:
    def __init__(self, options, view: ClusterView, digest: str, st: stats.StatsWriter, monitor: LocalMonitor):
        self.options = options
        self.local = options.local_name
        self.view = view
        self.view_digest = digest
        self.stats = st
        self.monitor = monitor
        self.resync: Resync | None = None
        self.requested: bool | None = None  # None, or "full?" of the resync to start next
        self.next_tag_check = 0.0
        self.tag_seen: bool | None = None  # the last tag check's answer (None: no answer)
        self.stream_ids = itertools.count(1)  # unique over the daemon's life
        self.initial = True               # the first answer from the local memcached decides the first resync
        self.need_check = True            # a resync starts only after a fresh answer from the local memcached
        self.local_identity: tuple | None = None
        self.cas_enabled: bool | None = None
        self.waiting_for_local = False
        self.local_failures = 0
        self.next_local_retry = 0.0
        self.target_failures = 0
        self.dispatch_not_before = 0.0
        self.settled = settled.create()   # before any worker is forked: they inherit it
        self.check_membership()

    def check_membership(self) -> None:
        """Say at once (not after the local memcached answers) when the local node is in
        neither server list: a typo in local_ip must not look like a finished resync."""
        in_cluster = self.local in self.view.servers or self.local in self.view.new_servers
        self.stats.local_in_cluster = in_cluster
        self.stats.publish()
        if not in_cluster:
            log.warning("the local node %s is in neither server list (%s): nothing to pull; check local_ip "
                        "or --local-name", self.local, self._describe_view(self.view))
            logs.LOCAL_NOT_IN_CLUSTER.log(self.local)

    def next_wake(self, now: float) -> float:
        """Seconds until this needs the loop again (a check due, a backoff over)."""
        timeout = float("inf")
        if not self.monitor.busy:
            due = self.next_local_retry if self.waiting_for_local else self.next_tag_check
            timeout = max(0.0, due - now)
        if self.resync is not None and self.dispatch_not_before > now:
            timeout = min(timeout, self.dispatch_not_before - now)
        r = self.resync
        if r is not None and r.finishing and not r.superseded and not r.finish_asked and not self.monitor.busy:
            # Every stream ended (advance saw it after check_local ran): ask for the final
            # check now, not a heartbeat later.
            timeout = min(timeout, max(0.0, self.next_local_retry - now))
        return timeout

    def view_changed(self, view: ClusterView, digest: str) -> None:
        """The settings file was re-read (SIGHUP): resync if the view changed."""
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
        self.check_membership()
        self.request_resync(full=False, why="the cluster view changed")

    def worker_lost(self, pid: int, s: Stream, how: str) -> None:
        """The worker running ``s`` died or was killed: redo the stream, or after
        MAX_STREAM_ATTEMPTS treat its source as failed."""
        if self.resync is None or s.id not in self.resync.running:
            return
        self.stats.connections.pop(s.id, None)
        entries, nbytes = s.totals()
        if self.resync.worker_lost(s):
            log.warning("worker %d died (%s) streaming %d vbuckets from %s; redoing the stream "
                        "(%d entries, %d bytes it had reported are not counted)",
                        pid, how, len(s.vbuckets), s.server, entries, nbytes)
        else:
            log.error("worker %d died (%s) streaming from %s, the %d time for this stream; "
                      "treating %s as failed", pid, how, s.server, s.attempts, s.server)
        self._publish_counters()

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


    def advance(self, idle_workers, hand_out, stopping: bool = False) -> None:
        """Move the resync on: start a requested one, queue its pass, finish, and hand
        streams to ``idle_workers`` through ``hand_out(worker, stream, job) -> bool``."""
        r = self.resync
        if r is not None and r.superseded:
            if r.running:
                return
            log.log(logs.STATUS, "superseded resync stopped (%d entries)", r.entries)
            self.resync = r = None
        if r is None:
            if self.requested is None or stopping:
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
        self.dispatch(idle_workers, hand_out)


    def start_resync(self) -> Resync | None:
        full = bool(self.requested)
        self.requested = None
        wl = Worklist(self.view, self.local, full=full)
        st = self.stats
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
        r.settled_generation = self.settled.next_generation()
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


    def dispatch(self, idle_workers, hand_out) -> None:
        r = self.resync
        o = self.options
        if self.waiting_for_local or time.monotonic() < self.dispatch_not_before:
            return
        for w in idle_workers:
            s = r.take(w.pid)
            if s is None:
                return
            job = {"source": s.server, "vbuckets": s.vbuckets, "target": self.local, "source_kind": o.source,
                   "vbucket_count": o.vbuckets, "connect_timeout": o.connect_timeout,
                   "idle_timeout": o.idle_timeout, "stall_timeout": o.stall_timeout,
                   "settled_generation": r.settled_generation,
                   "hold": r.worklist.hold(s.server, s.vbuckets),
                   "pace_slot": s.id % pace.SLOTS}
            if not hand_out(w, s, job):
                r.running.pop(s.id, None)
                s.worker = None
                r.pending.appendleft(s)
                continue
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
