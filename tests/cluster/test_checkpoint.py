"""Replica snapshots for joiners: round trip of everything a joiner needs, refusals, size."""

from __future__ import annotations

import os
import time
import zlib

import pytest
from bitarray import bitarray

from ulogd.cluster import checkpoint as ck
from ulogd.protocol import ctr
from ulogd.state.regionlog import RegionLog, new_bitmaps


def make(text: str) -> RegionLog:
    config = ctr.parse(text.encode())
    clean, sync = new_bitmaps(config)
    return RegionLog(config, clean, sync, local_node=1, device_id="7:0")


def busy_log(text: str = "100000 clustered-disk 7:0 64") -> RegionLog:
    rl = make(text)
    n = rl.region_count
    for r in range(0, n, 7):
        rl.set_region_sync(1, r, True)
    rl.clear(1, range(0, n, 14))
    rl.mark(1, [5, 70, 700])
    rl.mark(2, [70, 71])
    rl.mark(3, [1000])
    rl.get_resync_work(2)
    rl.members = {1, 2, 3}
    rl.is_remote_recovering(1, 3)
    rl.is_remote_recovering(1, 9)
    rl.disk_failed = True
    rl.in_sync_override = False
    return rl


def state(rl: RegionLog) -> tuple[object, ...]:
    n = rl.region_count
    return (
        rl.clean[:n], rl.sync[:n], rl.sync_count, rl.holders, rl.priority, rl.dirty_chunks,
        rl.sync_search, rl.recovering, rl.recoverer, rl.disk_failed, rl.full_write,
        rl.in_sync_override,
    )  # fmt: skip


BOOK = ck.GroupBook(42, ((1, 100), (2, 200)), ((3, 300, 40), (4, 400, 41)))


def test_round_trip_of_everything_a_joiner_needs() -> None:
    rl = busy_log()
    assert rl.holders[70] == {1, 2} and rl.priority and rl.recovering >= 0 and rl.dirty_chunks
    blob = ck.snapshot(rl, BOOK)
    other = make("100000 clustered-disk 7:0 64")
    book = ck.restore(other, blob)
    assert book == BOOK
    assert state(other) == state(rl)
    assert other.recoverer == 2


@pytest.mark.parametrize("flags", [(False, False, False), (True, True, True)])
def test_flags_round_trip(flags: tuple[bool, bool, bool]) -> None:
    rl = make("1000 clustered-disk 7:0 8")
    rl.disk_failed, rl.full_write, rl.in_sync_override = flags
    other = make("1000 clustered-disk 7:0 8")
    other.disk_failed, other.full_write, other.in_sync_override = (not f for f in flags)
    ck.restore(other, ck.snapshot(rl, ck.GroupBook(0, (), ())))
    assert (other.disk_failed, other.full_write, other.in_sync_override) == flags


def test_no_recovery_round_trips_as_minus_one() -> None:
    rl = make("1000 clustered-core 8")
    other = make("1000 clustered-core 8")
    other.recovering, other.recoverer = 3, 9
    ck.restore(other, ck.snapshot(rl, ck.GroupBook(0, (), ())))
    assert (other.recovering, other.recoverer) == (-1, -1)


@pytest.mark.parametrize("text", ["1000 clustered-core 16", "2000 clustered-core 8"])
def test_geometry_mismatch_is_refused_untouched(text: str) -> None:
    rl = busy_log("1000 clustered-core 8")
    other = make(text)
    before = state(other)
    with pytest.raises(ck.CheckpointError, match="the mirror differs"):
        ck.restore(other, ck.snapshot(rl, BOOK))
    assert state(other) == before


def test_corruption_is_refused_untouched() -> None:
    rl = busy_log("10000 clustered-core 8")
    blob = ck.snapshot(rl, BOOK)
    raw = bytearray(zlib.decompress(blob))
    target = make("10000 clustered-core 8")
    before = state(target)
    cases = {
        "not compressed": b"garbage",
        "cut": blob[: len(blob) // 2],
        "body bit": zlib.compress(bytes(raw[:-3]) + bytes([raw[-3] ^ 4]) + bytes(raw[-2:])),
        "magic": zlib.compress(b"XXXX" + bytes(raw[4:])),
        "short": zlib.compress(bytes(raw[:20])),
        "body cut": zlib.compress(bytes(raw[:-5])),
    }
    for name, bad in cases.items():
        with pytest.raises(ck.CheckpointError):
            ck.restore(target, bad)
        assert state(target) == before, name


def test_split_and_join_chunks() -> None:
    blob = os.urandom(1000)
    parts = ck.split(blob, 64)
    assert len(parts) == 16 and all(len(p) <= 64 for p in parts)
    assert b"".join(parts) == blob
    assert ck.split(b"", 64) == [b""]


def test_snapshot_of_2_to_the_24_regions(capsys: pytest.CaptureFixture[str]) -> None:
    """A 16 M-region log (cmirrord's single message capped mirrors at ~2 M regions)."""
    n = 1 << 24
    rl = make(f"{n * 8} clustered-core 8")
    assert rl.region_count == n
    for r in range(0, n, 4099):  # a scattered dirty pattern, the worst realistic case
        rl.set_region_sync(1, r, True)
    rl.mark(1, list(range(0, n, 1 << 16)))
    start = time.perf_counter()
    blob = ck.snapshot(rl, BOOK)
    took = time.perf_counter() - start
    parts = ck.split(blob, 256 * 1024)
    other = make(f"{n * 8} clustered-core 8")
    start = time.perf_counter()
    ck.restore(other, b"".join(parts))
    took_restore = time.perf_counter() - start
    with capsys.disabled():
        print(
            f"\n[checkpoint 2^24 regions] {len(blob)} bytes in {len(parts)} chunk(s) of 256 KiB; "
            f"snapshot {took:.2f} s, restore {took_restore:.2f} s"
        )
    assert other.sync_count == rl.sync_count and other.holders == rl.holders
    assert len(blob) < 4 * 1024 * 1024  # 2 x 2 MiB of bitmaps compress, loosely
    assert took < 30 and took_restore < 30


def _available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def test_chunking_arithmetic_for_2_to_the_32_regions() -> None:
    """Without allocating: two 512 MiB bitmaps cut into 256 KiB chunks stay far below the
    atomic message size; any blob length splits into ceil(len/chunk) parts below the limit."""
    n = 1 << 32
    bitmap = (n + 7) // 8
    assert bitmap == 512 * 1024 * 1024
    worst = 2 * bitmap + 1024  # incompressible worst case
    chunk = 256 * 1024
    parts = -(-worst // chunk)
    assert parts == 4097 and parts < 2**32  # the part counter (u32) is never the limit
    blob = bytes(10 * chunk + 5)
    assert len(ck.split(blob, chunk)) == 11


@pytest.mark.slow
def test_snapshot_of_2_to_the_32_regions(capsys: pytest.CaptureFixture[str]) -> None:
    if _available_bytes() < 6 * 1024**3:
        pytest.skip("needs ~6 GiB free: 2 x 512 MiB bitmaps on each of two replicas + copies")
    n = 1 << 32
    rl = make(f"{n * 8} clustered-core 8 nosync")
    start = time.perf_counter()
    blob = ck.snapshot(rl, BOOK)
    took = time.perf_counter() - start
    with capsys.disabled():
        print(f"\n[checkpoint 2^32 regions] {len(blob)} bytes, snapshot {took:.1f} s")
    del rl
    other = make(f"{n * 8} clustered-core 8")
    ck.restore(other, blob)
    assert other.sync_count == n
    del other
    _ = bitarray  # bitmaps above are bitarrays
