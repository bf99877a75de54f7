"""The standalone agent on UDP, built on pysnmp's engine (v1, v2c and optionally v3 USM).

pysnmp does the message processing, community and USM checks and GETBULK; the MIB
instrumentation is ours: every request is answered from ``StatsSource.tree()``.
"""
from __future__ import annotations

import ipaddress
import logging
import socket

from pysnmp.carrier.asyncio.dgram import udp, udp6
from pysnmp.entity import config, engine
from pysnmp.entity.rfc3413 import cmdrsp, context
from pysnmp.proto import rfc1902, rfc1905
from pysnmp.smi import error as smi_error
from pysnmp.smi.instrum import AbstractMibInstrumController

from astaire.snmp.mib import ASTAIRE, SCALAR_OIDS, UNSIGNED32
from astaire.snmp.source import StatsSource

log = logging.getLogger("astaire.snmp")


def to_value(row):
    return (rfc1902.Unsigned32 if row.kind == UNSIGNED32 else rfc1902.Gauge32)(row.value)


class Instrumentation(AbstractMibInstrumController):
    """Answers GET / GETNEXT from the statistics; refuses every SET (read-only agent)."""

    def __init__(self, source: StatsSource):
        self.source = source

    def read_variables(self, *varBinds, **context):
        tree = self.source.tree()
        out = []
        for name, _ in varBinds:
            oid = tuple(name)
            row = tree.get(oid)
            if row is not None:
                out.append((name, to_value(row)))
            elif oid in SCALAR_OIDS or tree.is_known_object(oid):
                out.append((name, rfc1905.noSuchInstance))
            else:
                out.append((name, rfc1905.noSuchObject))
        return out

    def read_next_variables(self, *varBinds, **context):
        tree = self.source.tree()
        out = []
        for name, _ in varBinds:
            row = tree.next(tuple(name))
            if row is None:
                out.append((name, rfc1905.endOfMibView))
            else:
                out.append((rfc1902.ObjectName(row.oid), to_value(row)))
        return out

    def write_variables(self, *varBinds, **context):
        raise smi_error.NotWritableError(idx=0, name=varBinds[0][0] if varBinds else None)


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"{text!r} is not ADDR:PORT")
    host = host.strip("[]")
    ipaddress.ip_address(host)
    if not 0 <= int(port) < 65536:
        raise ValueError(f"{text!r}: port out of range")
    return host, int(port)


class StandaloneAgent:
    """``start()`` inside a running asyncio loop; ``port`` is then the bound UDP port."""

    def __init__(self, source: StatsSource, listen: tuple[str, int], community: str = "clearwater",
                 v3_user: str | None = None, v3_auth_key: str | None = None, v3_priv_key: str | None = None):
        self.source = source
        self.listen = listen
        self.community = community
        self.v3 = (v3_user, v3_auth_key, v3_priv_key) if v3_user else None
        self.engine = None
        self.port: int | None = None

    def start(self) -> None:
        host, port = self.listen
        v6 = ipaddress.ip_address(host).version == 6
        sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((host, port))  # bind here, so a busy port fails at once and port 0 can be used
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        snmp = self.engine = engine.SnmpEngine()
        if v6:
            config.add_transport(snmp, udp6.DOMAIN_NAME, udp6.Udp6Transport().open_server_mode(sock=sock))
        else:
            config.add_transport(snmp, udp.DOMAIN_NAME, udp.UdpTransport().open_server_mode(sock=sock))
        config.add_v1_system(snmp, "astaire-area", self.community)
        for model in (1, 2):  # v1 and v2c, read-only on the astaire subtree
            config.add_vacm_user(snmp, model, "astaire-area", "noAuthNoPriv", readSubTree=ASTAIRE)
        if self.v3:
            user, auth, priv = self.v3
            config.add_v3_user(snmp, user, config.USM_AUTH_HMAC96_SHA, auth, config.USM_PRIV_CFB128_AES, priv)
            config.add_vacm_user(snmp, 3, user, "authPriv", readSubTree=ASTAIRE)
        ctx = context.SnmpContext(snmp)
        ctx.unregister_context_name(b"")
        ctx.register_context_name(b"", Instrumentation(self.source))
        cmdrsp.GetCommandResponder(snmp, ctx)
        cmdrsp.NextCommandResponder(snmp, ctx)
        cmdrsp.BulkCommandResponder(snmp, ctx)
        cmdrsp.SetCommandResponder(snmp, ctx)
        log.info("SNMP agent listening on %s:%d (UDP), community %r%s", host, self.port, self.community,
                 f", SNMPv3 user {self.v3[0]!r}" if self.v3 else "")

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close_dispatcher()
            self.engine = None
