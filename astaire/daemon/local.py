"""The local memcached as the arbiter sees it, checked off the arbiter's thread.

The arbiter must handle signals whatever memcached does, so every network round trip to
the local memcached (the tag, its identity, the CAS probe) runs on this module's thread:
the arbiter asks (``request``), goes on with its loop, and collects the answer
(``answers``) when the thread writes to its wake-up fd.

What a check learns:
- identity: memcached's ``pid`` and start time (``time - uptime``), over binary STAT (the
  text ``stats`` command crashes the Clearwater fork). A new identity means the local
  memcached restarted and lost its data, whenever that happened.
- the tag (``astaire\\\\tag``): missing means a restart since the last resync set it.
- with ``cas=True``: whether the server gives CAS values. A SET's response carries the
  item's CAS; memcached started with ``-C`` answers 0, and a "CAS replace" would then be
  a blind overwrite, so resyncs are refused.

Finishing a resync: the identity is read, the tag set, and the identity read again; the
resync is complete only if both readings equal the identity taken when it started.
"""
from __future__ import annotations

import logging
import os
import queue
import struct
import threading
from dataclasses import dataclass

from astaire import codec
from astaire.client import BinaryClient, ClientError
from astaire.resync import target

log = logging.getLogger("astaire.supervisor")

CAS_PROBE_KEY = b"astaire\\\\cas-probe"  # Astaire's own: never copied
CAS_PROBE_TTL = 60


@dataclass
class Answer:
    kind: str                        # "check" or "finish"
    ok: bool                         # the local memcached answered
    error: str | None = None
    identity: tuple | None = None    # (pid, started)
    tag: bool | None = None
    cas_enabled: bool | None = None
    restarted: bool = False          # finish: the identity moved during the resync
    token: object = None


class LocalNode:
    """The real local memcached; tests replace these methods with fakes."""

    def __init__(self, name: str, timeout: float = 5.0):
        self.name, self.timeout = name, timeout

    def identity(self) -> tuple:
        with BinaryClient(self.name, self.timeout, role="local memcached") as c:
            st = c.stats()
        try:
            return int(st["pid"]), int(st["time"]) - int(st["uptime"])
        except (KeyError, ValueError):
            raise ClientError(f"local memcached {self.name} gave no pid/time/uptime in STAT") from None

    def tag_present(self) -> bool:
        return target.tag_present(self.name, self.timeout)

    def set_tag(self) -> None:
        target.set_tag(self.name, self.timeout)

    def cas_enabled(self) -> bool:
        request = codec.encode_request(codec.OP_SET, key=CAS_PROBE_KEY, value=b"1",
                                       extras=struct.pack(">II", 0, CAS_PROBE_TTL), vbucket=0)
        with BinaryClient(self.name, self.timeout, role="local memcached") as c:
            frame = c.request(request, codec.OP_SET, "probing CAS")
        if frame.status != 0:
            raise ClientError(f"probing CAS: local memcached {self.name} answered status 0x{frame.status:04x}")
        return frame.cas != 0


class LocalMonitor:
    """One thread doing the arbiter's round trips to the local memcached, one at a time."""

    def __init__(self, node: LocalNode, wake_fd: int):
        self.node = node
        self.wake_fd = wake_fd
        self._requests: queue.Queue = queue.Queue()
        self._answers: queue.Queue = queue.Queue()
        self.busy = False
        self._thread = threading.Thread(target=self._run, name="local-memcached", daemon=True)
        self._thread.start()

    def request(self, kind: str, **kwargs) -> None:
        self.busy = True
        self._requests.put((kind, kwargs))

    def answers(self) -> list[Answer]:
        out = []
        while True:
            try:
                out.append(self._answers.get_nowait())
            except queue.Empty:
                break
        if out:
            self.busy = False
        return out

    def stop(self) -> None:
        self._requests.put(None)

    def _run(self) -> None:
        while True:
            item = self._requests.get()
            if item is None:
                return
            kind, kwargs = item
            try:
                answer = self._check(**kwargs) if kind == "check" else self._finish(**kwargs)
            except Exception as e:  # unreachable, timed out, or nonsense: the arbiter waits and retries
                answer = Answer(kind, False, error=str(e) or type(e).__name__, token=kwargs.get("token"))
            self._answers.put(answer)
            try:
                os.write(self.wake_fd, b"\0")
            except OSError:
                pass

    def _check(self, cas: bool = False, token=None) -> Answer:
        n = self.node
        identity = n.identity()
        tag = n.tag_present()
        cas_enabled = n.cas_enabled() if cas else None
        return Answer("check", True, identity=identity, tag=tag, cas_enabled=cas_enabled, token=token)

    def _finish(self, expected: tuple, token=None) -> Answer:
        n = self.node
        before = n.identity()
        if before != expected:
            return Answer("finish", True, identity=before, restarted=True, token=token)
        n.set_tag()
        after = n.identity()
        return Answer("finish", True, identity=after, tag=True, restarted=after != expected, token=token)
