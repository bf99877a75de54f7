"""A compact AgentX subagent (RFC 2741) for net-snmp's snmpd (``master agentx``).

It opens a session on the master's unix socket, registers the astaire subtree and answers
Get, GetNext and GetBulk from ``StatsSource.tree()``; every Set phase is refused
(notWritable). When snmpd goes away (restart, crash) the subagent reconnects, every
``reconnect`` seconds, and registers again.
"""
from __future__ import annotations

import asyncio
import logging
import struct
import time

from astaire.snmp.mib import ASTAIRE, SCALAR_OIDS

log = logging.getLogger("astaire.snmp.agentx")

VERSION = 1
# PDU types
OPEN, CLOSE, REGISTER, UNREGISTER, GET, GETNEXT, GETBULK = 1, 2, 3, 4, 5, 6, 7
TESTSET, COMMITSET, UNDOSET, CLEANUPSET, NOTIFY, PING = 8, 9, 10, 11, 12, 13
ADDAGENTCAPS, REMOVEAGENTCAPS, RESPONSE = 14, 15, 18
# header flags
INSTANCE_REGISTRATION, NEW_INDEX, ANY_INDEX, NON_DEFAULT_CONTEXT, NETWORK_BYTE_ORDER = 1, 2, 4, 8, 16
# varbind types
T_GAUGE32, T_NO_SUCH_OBJECT, T_NO_SUCH_INSTANCE, T_END_OF_MIB_VIEW = 66, 128, 129, 130
# errors
NO_AGENTX_ERROR, NOT_WRITABLE, PARSE_ERROR, PROCESSING_ERROR = 0, 17, 266, 268
CLOSE_SHUTDOWN = 5

HEADER = struct.Struct("!BBBBIIII")


class ProtocolError(Exception):
    pass


# -- encoding -------------------------------------------------------------------------------------

def encode_oid(oid: tuple[int, ...], include: int = 0) -> bytes:
    prefix = 0
    if len(oid) >= 5 and oid[:4] == (1, 3, 6, 1) and 0 < oid[4] < 256:
        prefix, oid = oid[4], oid[5:]
    return struct.pack("!BBBB", len(oid), prefix, include, 0) + struct.pack(f"!{len(oid)}I", *oid)


def encode_octets(data: bytes) -> bytes:
    return struct.pack("!I", len(data)) + data + b"\0" * (-len(data) % 4)


def encode_pdu(pdu_type: int, payload: bytes, session: int = 0, transaction: int = 0, packet: int = 0,
               flags: int = 0) -> bytes:
    return HEADER.pack(VERSION, pdu_type, flags | NETWORK_BYTE_ORDER, 0, session, transaction, packet,
                       len(payload)) + payload


def encode_varbind(oid: tuple[int, ...], vtype: int, value: int | None = None) -> bytes:
    out = struct.pack("!HH", vtype, 0) + encode_oid(oid)
    if value is not None:
        out += struct.pack("!I", value)
    return out


class Reader:
    """Decodes one PDU's payload in the byte order its header announced."""

    def __init__(self, data: bytes, big_endian: bool):
        self.data, self.pos, self.e = data, 0, "!" if big_endian else "<"

    def take(self, fmt: str):
        s = struct.Struct(self.e + fmt)
        if self.pos + s.size > len(self.data):
            raise ProtocolError("truncated PDU")
        v = s.unpack_from(self.data, self.pos)
        self.pos += s.size
        return v

    def oid(self) -> tuple[tuple[int, ...], int]:
        n, prefix, include, _ = self.take("BBBB")
        subids = self.take(f"{n}I") if n else ()
        oid = ((1, 3, 6, 1, prefix) if prefix else ()) + tuple(subids)
        return oid, include

    def octets(self) -> bytes:
        (n,) = self.take("I")
        data = self.data[self.pos:self.pos + n]
        if len(data) != n:
            raise ProtocolError("truncated octet string")
        self.pos += n + (-n % 4)
        return data

    def ranges(self):
        while self.pos < len(self.data):
            start, include = self.oid()
            end, _ = self.oid()
            yield start, include, end


# -- answering ------------------------------------------------------------------------------------

def answer_get(tree, ranges) -> bytes:
    out = b""
    for start, _include, _end in ranges:
        row = tree.get(start)
        if row is not None:
            out += encode_varbind(start, T_GAUGE32, row.value)  # Unsigned32 = Gauge32 on the wire
        elif start in SCALAR_OIDS or tree.is_known_object(start):
            out += encode_varbind(start, T_NO_SUCH_INSTANCE)
        else:
            out += encode_varbind(start, T_NO_SUCH_OBJECT)
    return out


def _next(tree, start, include, end):
    row = tree.get(start) if include else None
    if row is None:
        row = tree.next(start)
    if row is None or (end and row.oid >= end):
        return None
    return row


def answer_getnext(tree, ranges) -> bytes:
    out = b""
    for start, include, end in ranges:
        row = _next(tree, start, include, end)
        out += encode_varbind(start, T_END_OF_MIB_VIEW) if row is None else encode_varbind(row.oid, T_GAUGE32, row.value)
    return out


def answer_getbulk(tree, non_repeaters: int, max_repetitions: int, ranges, limit: int = 1000) -> bytes:
    out = []
    ranges = list(ranges)
    for start, include, end in ranges[:non_repeaters]:
        row = _next(tree, start, include, end)
        out.append(encode_varbind(start, T_END_OF_MIB_VIEW) if row is None else
                   encode_varbind(row.oid, T_GAUGE32, row.value))
    reps = [[start, include, end, False] for start, include, end in ranges[non_repeaters:]]
    for _ in range(max(0, max_repetitions)):
        if not reps or len(out) >= limit:
            break
        for r in reps:
            row = None if r[3] else _next(tree, r[0], r[1], r[2])
            if row is None:
                r[3] = True
                out.append(encode_varbind(r[0], T_END_OF_MIB_VIEW))
            else:
                out.append(encode_varbind(row.oid, T_GAUGE32, row.value))
                r[0], r[1] = row.oid, 0
        if all(r[3] for r in reps):
            break
    return b"".join(out)


# -- the session ----------------------------------------------------------------------------------

class AgentXSubagent:
    def __init__(self, source, socket_path: str, reconnect: float = 1.0, timeout: float = 5.0):
        self.source = source
        self.path = socket_path
        self.reconnect = reconnect
        self.timeout = timeout
        self.task: asyncio.Task | None = None
        self.sessions = 0  # how many sessions were opened (a restart of snmpd makes a new one)
        self._packet = 0
        self._writer = None
        self._started = time.monotonic()

    def start(self) -> None:
        self.task = asyncio.ensure_future(self._run())

    def close(self) -> None:
        if self._writer is not None:
            try:
                self._writer.write(encode_pdu(CLOSE, struct.pack("!B3x", CLOSE_SHUTDOWN), self._session))
            except Exception:
                pass
            self._writer.close()
        if self.task is not None:
            self.task.cancel()

    def _uptime(self) -> int:
        return int((time.monotonic() - self._started) * 100) & 0xFFFFFFFF

    async def _run(self) -> None:
        said = None
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(self.path)
            except OSError as e:
                why = f"cannot connect to the AgentX master at {self.path}: {e.strerror or e}"
                if why != said:
                    log.warning("%s; retrying every %g s", why, self.reconnect)
                    said = why
                await asyncio.sleep(self.reconnect)
                continue
            said = None
            try:
                await self._session_loop(reader, writer)
            except (OSError, asyncio.IncompleteReadError, ProtocolError) as e:
                log.warning("AgentX session with %s ended (%s); reconnecting", self.path,
                            type(e).__name__ if not str(e) else e)
            finally:
                self._writer = None
                writer.close()
            await asyncio.sleep(self.reconnect)

    async def _request(self, reader, writer, pdu_type: int, payload: bytes, session: int = 0) -> Reader:
        self._packet += 1
        packet = self._packet
        writer.write(encode_pdu(pdu_type, payload, session, 0, packet))
        await writer.drain()
        while True:
            hdr, body = await asyncio.wait_for(self._read_pdu(reader), self.timeout)
            if hdr[1] == RESPONSE and hdr[6] == packet:
                r = Reader(body, bool(hdr[2] & NETWORK_BYTE_ORDER))
                _uptime, error, _index = r.take("IHH")
                if error:
                    raise ProtocolError(f"the master refused PDU type {pdu_type} with error {error}")
                r.session = hdr[4]
                return r

    async def _read_pdu(self, reader):
        head = await reader.readexactly(HEADER.size)
        big = bool(head[2] & NETWORK_BYTE_ORDER)
        hdr = struct.unpack(("!" if big else "<") + "BBBBIIII", head)
        if hdr[0] != VERSION:
            raise ProtocolError(f"AgentX version {hdr[0]}")
        if hdr[7] > 1 << 20:
            raise ProtocolError(f"PDU of {hdr[7]} bytes")
        body = await reader.readexactly(hdr[7])
        return hdr, body

    async def _session_loop(self, reader, writer) -> None:
        r = await self._request(reader, writer, OPEN,
                                struct.pack("!B3x", 0) + encode_oid(()) + encode_octets(b"astaire-snmp"))
        self._session = session = r.session
        await self._request(reader, writer, REGISTER, struct.pack("!BBBB", 0, 127, 0, 0) + encode_oid(ASTAIRE),
                            session)
        self._writer = writer
        self.sessions += 1
        log.info("AgentX: registered %s with the master at %s (session %d)", ".".join(map(str, ASTAIRE)),
                 self.path, session)
        while True:
            hdr, body = await self._read_pdu(reader)
            _v, ptype, flags, _r, sid, tid, pid, _n = hdr
            r = Reader(body, bool(flags & NETWORK_BYTE_ORDER))
            if flags & NON_DEFAULT_CONTEXT and ptype in (GET, GETNEXT, GETBULK, TESTSET):
                r.octets()  # one context only: the default
            error, payload = NO_AGENTX_ERROR, b""
            if ptype == CLOSE:
                log.info("AgentX: the master closed the session")
                return
            if ptype == RESPONSE:
                continue
            try:
                if ptype == GET:
                    payload = answer_get(self.source.tree(), r.ranges())
                elif ptype == GETNEXT:
                    payload = answer_getnext(self.source.tree(), r.ranges())
                elif ptype == GETBULK:
                    nr, mr = r.take("HH")
                    payload = answer_getbulk(self.source.tree(), nr, mr, r.ranges())
                elif ptype == TESTSET:
                    error = NOT_WRITABLE
                elif ptype in (COMMITSET, UNDOSET, CLEANUPSET):
                    if ptype == CLEANUPSET:
                        continue  # no response to CleanupSet
                    error = NOT_WRITABLE
                else:
                    error = PROCESSING_ERROR
            except ProtocolError:
                error, payload = PARSE_ERROR, b""
            resp = struct.pack("!IHH", self._uptime(), error, 1 if error else 0) + payload
            writer.write(encode_pdu(RESPONSE, resp, sid, tid, pid))
            await writer.drain()
