"""Alarm 5501 (ASTAIRE_RESYNC_IN_PROGRESS) as RFC 3877 INFORMs to every ``snmp_ip`` address.

MINOR (raised) while a resync runs, CLEARED after. Each destination has its own sender:
an INFORM is repeated, with a growing pause, until that destination acknowledges it; a
newer state replaces an unacknowledged older one (the manager only needs the latest).
"""
from __future__ import annotations

import asyncio
import logging

log = logging.getLogger("astaire.snmp.alarm")

ALARM_INDEX = 5501
SEVERITY_CLEARED, SEVERITY_MINOR = 1, 4
ALARM_ACTIVE_STATE = "1.3.6.1.2.1.118.0.2"
ALARM_CLEAR_STATE = "1.3.6.1.2.1.118.0.3"
ALARM_ACTIVE_MODEL_POINTER = "1.3.6.1.2.1.118.1.2.2.1.13.0"
ALARM_ACTIVE_RESOURCE_ID = "1.3.6.1.2.1.118.1.2.2.1.10.0"
ALARM_MODEL = "1.3.6.1.2.1.118.1.1.2.1.3.0.%d" % ALARM_INDEX
DEFAULT_INFORM_PORT = 162


def destinations(snmp_ip: str, port: int = DEFAULT_INFORM_PORT) -> list[tuple[str, int]]:
    """``snmp_ip`` (one address or a comma-separated list) as (host, port) pairs."""
    return [(h.strip().strip("[]"), port) for h in snmp_ip.replace(" ", ",").split(",") if h.strip()]


def inform_varbinds(raised: bool):
    """(snmpTrapOID value, [(oid, value)]) for the raise or the clear."""
    from pysnmp.proto import rfc1902

    severity = SEVERITY_MINOR if raised else SEVERITY_CLEARED
    return (ALARM_ACTIVE_STATE if raised else ALARM_CLEAR_STATE, [
        (ALARM_ACTIVE_MODEL_POINTER, rfc1902.ObjectName(f"{ALARM_MODEL}.{severity}")),
        (ALARM_ACTIVE_RESOURCE_ID, rfc1902.ObjectName("0.0")),
    ])


class _Destination:
    def __init__(self, notifier: "AlarmNotifier", host: str, port: int):
        self.notifier, self.host, self.port = notifier, host, port
        self.wanted: bool | None = None  # the state to deliver; None: nothing pending
        self.event = asyncio.Event()
        self.task = asyncio.ensure_future(self.run())

    def post(self, raised: bool) -> None:
        self.wanted = raised
        self.event.set()

    async def run(self) -> None:
        while True:
            await self.event.wait()
            self.event.clear()
            attempt = 0
            while self.wanted is not None:
                raised = self.wanted
                ok, why = await self.notifier.send(self.host, self.port, raised)
                if ok:
                    log.info("alarm %d %s acknowledged by %s:%d", ALARM_INDEX, "raise" if raised else "clear",
                             self.host, self.port)
                    if self.wanted == raised:
                        self.wanted = None
                    attempt = 0
                    continue
                attempt += 1
                pause = min(self.notifier.retry_max, self.notifier.retry_base * 2 ** (attempt - 1))
                log.warning("alarm %d %s to %s:%d not acknowledged (%s), attempt %d; retrying in %.1f s",
                            ALARM_INDEX, "raise" if raised else "clear", self.host, self.port, why, attempt, pause)
                try:
                    await asyncio.wait_for(self.event.wait(), pause)  # a newer state cuts the pause short
                    self.event.clear()
                except asyncio.TimeoutError:
                    pass


class AlarmNotifier:
    """Tracks whether a resync runs and sends the alarm's INFORMs on each change."""

    def __init__(self, targets: list[tuple[str, int]], community: str = "clearwater", *, timeout: float = 1.0,
                 retry_base: float = 0.5, retry_max: float = 30.0):
        self.targets = targets
        self.community = community
        self.timeout, self.retry_base, self.retry_max = timeout, retry_base, retry_max
        self.raised: bool | None = None  # None: unknown yet (nothing sent)
        self._engine = None
        self._dest: list[_Destination] = []

    def start(self) -> None:
        from pysnmp.hlapi.v3arch.asyncio import SnmpEngine

        if self.targets:
            self._engine = SnmpEngine()
        self._dest = [_Destination(self, h, p) for h, p in self.targets]

    def update(self, resyncing: bool) -> None:
        """Called with the daemon's state; a change (or a first resync seen) sends INFORMs."""
        if self.raised is None and not resyncing:
            self.raised = False  # started while idle: nothing to clear
            return
        if resyncing == self.raised:
            return
        self.raised = resyncing
        log.warning("alarm %d (ASTAIRE_RESYNC_IN_PROGRESS) %s", ALARM_INDEX,
                    "raised (MINOR): a resync is running" if resyncing else "cleared: the resync has ended")
        for d in self._dest:
            d.post(resyncing)

    async def send(self, host: str, port: int, raised: bool) -> tuple[bool, str | None]:
        from pysnmp.hlapi.v3arch.asyncio import (CommunityData, ContextData, NotificationType, ObjectIdentity,
                                                 UdpTransportTarget, send_notification)

        trap_oid, varbinds = inform_varbinds(raised)
        try:
            target = await UdpTransportTarget.create((host, port), timeout=self.timeout, retries=0)
            notification = NotificationType(ObjectIdentity(trap_oid)).add_varbinds(*varbinds)
            err, status, _index, _vbs = await send_notification(
                self._engine, CommunityData(self.community, mpModel=1), target, ContextData(), "inform",
                notification)
        except Exception as e:  # resolution failures, socket errors: retried like a timeout
            return False, f"{type(e).__name__}: {e}"
        if err:
            return False, str(err)
        if status:
            return False, f"error status {status.prettyPrint()}"
        return True, None

    def close(self) -> None:
        for d in self._dest:
            d.task.cancel()
        if self._engine is not None:
            self._engine.close_dispatcher()
