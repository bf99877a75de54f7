#!/usr/bin/env python3
"""What a crawler source (stock memcached) spends serving one stream, by request form.

Loads N MemcachedStore-shaped keys (100-byte values) into a fresh memcached, then measures
the memcached process's CPU seconds (user + system) for:
  * ``lru_crawler metadump hash`` of everything (what every stream costs its source);
  * pipelined ``mg <key> v f t q O<n>`` for the keys a 2->3 resize moves (656 per 1000), in
    batches closed by ``mn``: the Writer's fetches today;
  * the same keys as multi-key ``gets k1 k2 ...``, one request per batch.
memcached serves at most ``-R`` (default 20) requests per event before it yields and flushes,
so a pipeline of single-key requests pays that per 20 keys; ``--extra-args "-R 10000"``
shows the difference vanish. Reported as JSON. (In isolation the gets form costs the source
less; inside a real stream it did not, and the Writer keeps meta gets: docs/compatibility.md,
"Values, flags and TTL".)

    python bench/source_fetch_bench.py [--records 1000000] [--batch 256] [--extra-args "-R 10000"]
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import sys
import threading
import time

import psutil

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from astaire.demo.localcluster import MemcachedServer  # noqa: E402
from astaire.resync import source  # noqa: E402
from astaire.resync.source import METADUMP_HASH  # noqa: E402

SENTINEL = b"mg astaire-bench-no-such-key v\r\n"  # answered "EN": everything before it is answered


BUSY = b"BUSY"  # "BUSY currently processing crawler request": the crawler is in use (its own background crawl)


def _pipe(server: MemcachedServer, chunks: list[bytes], until: bytes, timeout: float = 120.0) -> bytes:
    """Send ``chunks`` on one connection while a thread reads until the answer ends ``until``
    (or is a one-line ``BUSY`` answer to a crawler request). Returns the answer's first bytes.
    A silent or closed server raises instead of leaving the bench waiting."""
    failure: list[BaseException] = []
    head = bytearray()
    with socket.create_connection((server.host, server.port), timeout=timeout) as s:
        def read():
            tail = b""
            try:
                while not tail.endswith(until):
                    data = s.recv(1 << 20)
                    if not data:
                        raise RuntimeError("memcached closed the connection")
                    if len(head) < 64:
                        head.extend(data[:64 - len(head)])
                    tail = (tail + data)[-16:]
                    if head.startswith(BUSY) and b"\r\n" in head:
                        return
            except BaseException as e:  # noqa: BLE001 (re-raised by the caller)
                failure.append(e)
        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        for chunk in chunks:
            s.sendall(chunk)
        reader.join()
    if failure:
        raise RuntimeError(f"memcached {server.host}:{server.port}: {failure[0]!r}") from failure[0]
    return bytes(head)


def _crawler_running(server: MemcachedServer) -> bool:
    """memcached's ``lru_crawler_running`` stat (its own background crawl counts), read as a
    stream reads it before it lists (``astaire.resync.source``)."""
    with socket.create_connection((server.host, server.port), timeout=10) as s:
        return source._crawler_running(server.name, s) is not None


def _listing(server: MemcachedServer, tries: int = 12) -> None:
    """One whole ``lru_crawler metadump hash``, asked once no crawl runs (a request made
    during another crawl can wait in memcached until that crawl ends, or be answered BUSY),
    and asked again (0.1 s, doubling to 2 s) while the crawler is busy, as a stream does."""
    delay = 0.1
    for _ in range(tries):
        if not _crawler_running(server):
            if not _pipe(server, [METADUMP_HASH], b"END\r\n").startswith(BUSY):
                return
        time.sleep(delay)
        delay = min(2 * delay, 2.0)
    raise RuntimeError(f"memcached {server.host}:{server.port}: the LRU crawler stayed busy")


def _process_cpu(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def meta_gets(keys: list[bytes], batch: int) -> list[bytes]:
    """The Writer's fetches of ``keys``: ``mg <key> v f t q O<n>``, ``batch`` to a chunk closed
    by ``mn``, then the sentinel that ends the pipe."""
    mg = [b"mg %s v f t q O%d\r\n" % (k, i) for i, k in enumerate(keys)]
    return [b"".join(mg[i:i + batch]) + b"mn\r\n" for i in range(0, len(mg), batch)] + [SENTINEL]


def stream_baseline(server: MemcachedServer, keys: list[bytes], batch: int = 1024) -> dict:
    """The requests one stream of the crawler path cannot do without, asked of its source by a
    plain client, one after the other: one listing of everything (``lru_crawler metadump
    hash``, as a stream asks), then one meta get per wanted key (``mg <key> v f t q O<n>`` in
    ``mn``-closed batches of ``batch``: the Writer's form, and its batch at the default
    window). Returns the source process's CPU seconds for each part and their sum."""
    pid = server.proc.pid
    c0 = _process_cpu(pid)
    _listing(server)
    c1 = _process_cpu(pid)
    _pipe(server, meta_gets(keys, batch), b"EN\r\n")
    c2 = _process_cpu(pid)
    return {"listing": c1 - c0, "fetches": c2 - c1, "total": c2 - c0}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=1_000_000)
    p.add_argument("--batch", type=int, default=256, help="keys per mn-closed batch / per gets request")
    p.add_argument("--extra-args", default="", help="more memcached arguments, e.g. \"-R 10000\"")
    args = p.parse_args(argv)
    server = MemcachedServer(memory_mb=max(256, args.records * 300 >> 20), extra_args=tuple(shlex.split(args.extra_args)))
    server.start()
    try:
        keys = [b"bench\\\\key%09d" % i for i in range(args.records)]
        value = b"x" * 100
        sets = [b"set %s 1234 0 100 noreply\r\n%s\r\n" % (k, value) for k in keys]
        _pipe(server, [b"".join(sets[i:i + 2000]) for i in range(0, len(sets), 2000)] + [b"mn\r\n"], b"MN\r\n")
        moved = keys[:len(keys) * 656 // 1000]
        report = {"records": args.records, "fetched": len(moved), "batch": args.batch,
                  "memcached_args": args.extra_args, "cpu_seconds": {}, "seconds": {}}

        def measure(name: str, chunks: list[bytes], until: bytes) -> None:
            c0, t0 = _process_cpu(server.proc.pid), time.monotonic()
            _pipe(server, chunks, until)
            report["cpu_seconds"][name] = round(_process_cpu(server.proc.pid) - c0, 3)
            report["seconds"][name] = round(time.monotonic() - t0, 3)

        measure("metadump_hash", [METADUMP_HASH], b"END\r\n")
        b = args.batch
        measure("mg", meta_gets(moved, b), b"EN\r\n")
        measure("gets", [b"gets " + b" ".join(moved[i:i + b]) + b"\r\n" for i in range(0, len(moved), b)]
                + [SENTINEL], b"EN\r\n")
    finally:
        server.stop()
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
