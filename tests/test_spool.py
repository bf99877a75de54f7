"""The crawler stream's metadump spool (``astaire.resync.stream._Spool``): a FIFO of bytes in
a ring of anonymous memory that grows as its backlog needs, then a temporary file. Whatever
the mix of appends, reads straight into the ring and takes, bytes come out once each, in the
order they went in."""
from __future__ import annotations

import random

import pytest

from astaire.resync import stream
from astaire.resync.stream import _Spool


def drive(spool: _Spool, rng: random.Random, steps: int, max_append: int, max_take: int) -> tuple[bytes, bytes]:
    """Random appends (bytes and views), reads straight into the ring (``room`` then
    ``commit``, as a socket's ``recv_into`` does) and takes; then everything taken. Returns
    (in, out)."""
    sent, got = bytearray(), bytearray()
    for _ in range(steps):
        if rng.random() < 0.3 and (room := spool.room()) is not None:
            assert len(room) >= stream.SPOOL_MIN_ROOM
            data = rng.randbytes(rng.randint(0, min(len(room), max_append)))
            room[:len(data)] = data
            room.release()
            spool.commit(len(data))
            sent += data
        elif rng.random() < 0.6:
            data = rng.randbytes(rng.randint(1, max_append))
            spool.append(data if rng.random() < 0.5 else memoryview(data))
            sent += data
        elif len(spool):
            before = len(spool)
            out = spool.take(rng.randint(1, max_take))
            assert 0 < len(out) and len(spool) == before - len(out)
            got += out
    while len(spool):
        got += spool.take(max_take)
    return bytes(sent), bytes(got)


@pytest.mark.parametrize("start", [4, 16, 64])
@pytest.mark.parametrize("capacity", [7, 64, 1000])
def test_bytes_come_out_in_order_through_ring_growth_wrap_and_file(monkeypatch, start, capacity):
    monkeypatch.setattr(stream, "SPOOL_RING_START", start)
    monkeypatch.setattr(stream, "SPOOL_MIN_ROOM", 3)
    rng = random.Random(start * 1000 + capacity)
    spool = _Spool(capacity)
    try:
        sent, got = drive(spool, rng, 5000, 150, 200)
        assert got == sent
        assert spool.spilled > 0  # appends of up to 150 bytes against at most 1000 held in memory
    finally:
        spool.close()


def test_a_backlog_within_the_capacity_stays_in_memory_and_the_ring_follows_it(monkeypatch):
    monkeypatch.setattr(stream, "SPOOL_RING_START", 1024)
    monkeypatch.setattr(stream, "SPOOL_MIN_ROOM", 64)
    spool = _Spool(1 << 20)
    try:
        rng = random.Random(5)
        sent, got = bytearray(), bytearray()
        direct = 0
        for _ in range(200):  # a backlog of at most 3000 bytes, wrapping round the ring
            while len(spool) < 3000:
                data = rng.randbytes(rng.randint(1, 400))
                room = spool.room() if rng.random() < 0.5 else None
                if room is not None:  # read straight into the ring
                    room[:len(data)] = data[:len(room)]
                    data = data[:len(room)]
                    room.release()
                    spool.commit(len(data))
                    direct += 1
                else:
                    spool.append(data)
                sent += data
            while len(spool) > 1500:
                got += spool.take(700)
        while len(spool):
            got += spool.take(700)
        assert got == sent
        assert spool.spilled == 0 and spool.file is None
        assert direct > 500
        assert spool._size == 4096  # 1024 doubled to hold ~3400 bytes, not the 1 MiB allowed
    finally:
        spool.close()


def test_the_file_is_emptied_and_reused_once_drained():
    spool = _Spool(10)
    try:
        for round_ in range(3):
            data = bytes(range(round_, round_ + 25))
            spool.append(data[:8])
            spool.append(data[8:])       # past the ring's 10 bytes: to the file
            assert len(spool) == 25
            out = bytearray()
            while len(spool):
                out += spool.take(100)
            assert out == data
            assert spool.file.seek(0, 2) == 0  # truncated: the file does not grow round after round
        assert spool.spilled == 3 * 17
    finally:
        spool.close()
