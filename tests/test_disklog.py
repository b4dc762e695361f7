"""Tests for ulogd.state.disklog: the kernel `disk` log format, write planning and device I/O.

Reference images are built here from the format description with ``struct`` and hand-placed
bits, never with the code under test. Device tests run on a regular file always, on a loop
device when one can be attached (else they skip and say why), and check a real EIO from a
filesystem that has been shut down (FS_IOC_SHUTDOWN) when mounting is possible.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import itertools
import logging
import os
import shutil
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from bitarray import bitarray
from hypothesis import given, settings
from hypothesis import strategies as st

from ulogd.state import disklog
from ulogd.state.disklog import (
    BITMAP_OFFSET,
    CHUNK_REGIONS,
    MAGIC,
    VERSION,
    DiskFormatError,
    DiskImage,
    DiskIOError,
    DiskLogDevice,
    MemoryDiskLog,
    bitmap_len,
    check_device_size,
    endian_of,
    io_size,
    parse_image,
    plan_write,
    read_image,
    write_image,
)

# ---------------------------------------------------------------------------------------------
# Reference images, built from the spec


def kernel_image(
    region_count: int,
    clean: set[int] | list[int],
    size: int,
    *,
    magic: int = 0x4D695272,
    version: int = 2,
    nr_regions: int | None = None,
) -> bytearray:
    """An image as the kernel's `disk` log writes it: header, zeros, LSB-first clean bitmap."""
    buf = bytearray(size)
    struct.pack_into(
        "<IIQ", buf, 0, magic, version, region_count if nr_regions is None else nr_regions
    )
    for region in clean:
        buf[1024 + region // 8] |= 1 << (region % 8)
    return buf


def ref_io_size(region_count: int, block_size: int) -> int:
    words = (region_count + 31) // 32
    end = 1024 + 4 * words
    return (end + block_size - 1) // block_size * block_size


def bits_from(region_count: int, clean: set[int] | list[int]) -> bitarray:
    bits = bitarray(region_count, endian="little")
    bits.setall(0)
    for region in clean:
        bits[region] = 1
    return bits


def apply(buf: bytearray, extents: list[tuple[int, bytes]]) -> None:
    for offset, data in extents:
        buf[offset : offset + len(data)] = data


# ---------------------------------------------------------------------------------------------
# Geometry


def test_constants_and_header_bytes() -> None:
    assert MAGIC == 0x4D695272 and VERSION == 2
    assert BITMAP_OFFSET == 1024 and CHUNK_REGIONS == 4096
    image = plan_write(bits_from(8, []), 8, None, 512)[0][1]
    # magic as the kernel stores it on disk, little-endian
    assert image[:16] == bytes.fromhex("72 52 69 4d 02 00 00 00 08 00 00 00 00 00 00 00")


@pytest.mark.parametrize(
    ("regions", "blen"),
    [(0, 0), (1, 4), (31, 4), (32, 4), (33, 8), (100, 16), (8192, 1024), (2**20, 131072)],
)
def test_bitmap_len(regions: int, blen: int) -> None:
    assert bitmap_len(regions) == blen


@pytest.mark.parametrize(
    ("regions", "block_size", "size"),
    [
        (1, 512, 1536),
        (1, 4096, 4096),
        (8192, 512, 2048),  # bitmap ends exactly on a block boundary
        (8193, 512, 2560),
        (8192, 1024, 2048),
        (24577, 4096, 8192),
        (2**20, 512, 1024 + 131072),
        (2**20, 4096, 135168),
    ],
)
def test_io_size(regions: int, block_size: int, size: int) -> None:
    assert io_size(regions, block_size) == size == ref_io_size(regions, block_size)


@pytest.mark.parametrize("bad", [0, 256, 1000, 3000])
def test_io_size_rejects_bad_block_size(bad: int) -> None:
    with pytest.raises(ValueError):
        io_size(10, bad)


def test_check_device_size() -> None:
    check_device_size(1536, 100, 512)  # exactly the I/O unit
    check_device_size(10**9, 100, 4096)
    with pytest.raises(DiskFormatError, match="too small") as exc:
        check_device_size(1535, 100, 512)
    assert isinstance(exc.value, ValueError)
    assert "1536" in str(exc.value)
    with pytest.raises(DiskFormatError):
        check_device_size(1536, 100, 4096)  # 4 KiB blocks need 4096 bytes


# ---------------------------------------------------------------------------------------------
# Parsing and full writes against hand-built kernel images

EDGE = [0, 7, 8, 31, 32]


@pytest.mark.parametrize("block_size", [512, 4096])
@pytest.mark.parametrize("regions", [1000, 33, 4097, 40001])
def test_kernel_image_edges_parse_and_write_back_bit_exact(regions: int, block_size: int) -> None:
    assert regions % 32 != 0
    clean = {r for r in [*EDGE, regions - 1] if r < regions}
    size = ref_io_size(regions, block_size)
    image = kernel_image(regions, clean, size)

    parsed = parse_image(bytes(image), regions)
    assert parsed.valid and parsed.nr_regions == regions
    assert len(parsed.clean) == regions and endian_of(parsed.clean) == "little"
    assert set(parsed.clean.search(1)) == clean

    plan = plan_write(parsed.clean, regions, None, block_size)
    assert len(plan) == 1 and plan[0][0] == 0
    assert plan[0][1] == bytes(image)  # bit-exact, header and zero padding included


def test_tail_bits_ignored_on_read_and_zero_on_write() -> None:
    regions = 1000  # last word holds regions 992..1023; 1000..1023 are past the end
    image = kernel_image(regions, [999], 1536)
    image[1024 + 125] = 0xFF  # bits 1000..1007 set by some other writer
    image[1024 + 127] = 0x80  # bit 1023
    parsed = parse_image(bytes(image), regions)
    assert set(parsed.clean.search(1)) == {999}
    out = plan_write(parsed.clean, regions, None, 512)[0][1]
    assert out[1024 + 124] == 0x80 and out[1024 + 125 : 1024 + 128] == b"\0\0\0"


def test_all_clean_tail_bits_zero() -> None:
    clean = bitarray(33, endian="little")
    clean.setall(1)
    out = plan_write(clean, 33, None, 512)[0][1]
    assert out[1024:1032] == bytes.fromhex("ffffffff 01000000")
    assert out[1032:] == bytes(1536 - 1032)
    assert out[16:1024] == bytes(1008)


def test_big_endian_bitarray_is_rendered_by_region_number() -> None:
    regions = 100
    little = bits_from(regions, {0, 9, 63, 99})
    big = bitarray(little, endian="big")
    assert plan_write(big, regions, None, 512) == plan_write(little, regions, None, 512)
    assert plan_write(big, regions, None, 512)[0][1] == bytes(
        kernel_image(regions, {0, 9, 63, 99}, 1536)
    )


def test_plan_write_rejects_wrong_length_and_chunk() -> None:
    with pytest.raises(ValueError, match="bits"):
        plan_write(bits_from(10, []), 11, None, 512)
    with pytest.raises(ValueError, match="chunk"):
        plan_write(bits_from(5000, []), 5000, {2}, 512)  # 5000 regions = chunks 0 and 1
    with pytest.raises(ValueError, match="chunk"):
        plan_write(bits_from(5000, []), 5000, {-1}, 512)


def test_version_1_is_read_as_2() -> None:
    image = kernel_image(64, {5, 63}, 1536, version=1)
    parsed = parse_image(bytes(image), 64)
    assert parsed.valid and set(parsed.clean.search(1)) == {5, 63}
    # written back as version 2
    assert plan_write(parsed.clean, 64, None, 512)[0][1][4:8] == struct.pack("<I", 2)


@pytest.mark.parametrize("version", [0, 3, 0xFFFFFFFF])
def test_unknown_version_is_refused(version: int) -> None:
    image = kernel_image(64, {}, 1536, version=version)
    with pytest.raises(DiskFormatError, match=f"version {version}"):
        parse_image(bytes(image), 64)


def test_bad_magic_means_no_log() -> None:
    image = kernel_image(64, range(64), 1536, magic=0x12345678, version=99)
    parsed = parse_image(bytes(image), 64)
    assert parsed == DiskImage(valid=False, nr_regions=0, clean=bits_from(64, []))
    assert not parsed.clean.any() and len(parsed.clean) == 64
    # all zeros (a blank device) is also "no log"; 16 bytes are enough to say so
    assert not parse_image(bytes(16), 64).valid


def test_truncated_buffers() -> None:
    with pytest.raises(DiskFormatError, match="header"):
        parse_image(b"\x72\x52\x69\x4d\x02\x00", 64)
    image = kernel_image(1000, {999}, 1536)
    end = 1024 + bitmap_len(1000)
    assert parse_image(bytes(image[:end]), 1000).clean[999]
    with pytest.raises(DiskFormatError, match="truncated"):
        parse_image(bytes(image[: end - 1]), 1000)


@pytest.mark.parametrize("fill", [0xFF, 0x00])
def test_lvm_initialised_log_reports_huge_nr_regions(fill: int) -> None:
    # LVM fills a new log LV with 0xff (in sync) or 0x00 and writes nr_regions = 2^64-1.
    regions = 3000
    image = bytearray([fill]) * 8192
    struct.pack_into("<IIQ", image, 0, MAGIC, 2, 2**64 - 1)
    parsed = parse_image(bytes(image), regions)
    assert parsed.valid and parsed.nr_regions == 2**64 - 1
    assert parsed.clean.count() == (regions if fill else 0)


def test_nr_regions_differing_from_geometry_is_reported() -> None:
    image = kernel_image(100, {1, 2}, 2048, nr_regions=50)
    parsed = parse_image(bytes(image), 100)
    assert parsed.nr_regions == 50 and set(parsed.clean.search(1)) == {1, 2}


@settings(max_examples=100, deadline=None)
@given(
    regions=st.integers(min_value=1, max_value=12000),
    seed=st.randoms(use_true_random=False),
    block_size=st.sampled_from([512, 1024, 4096]),
)
def test_round_trip_random_bitmaps(regions: int, seed, block_size: int) -> None:
    clean = {r for r in range(regions) if seed.random() < 0.3}
    bits = bits_from(regions, clean)
    plan = plan_write(bits, regions, None, block_size)
    assert [(o, len(d)) for o, d in plan] == [(0, ref_io_size(regions, block_size))]
    assert plan[0][1] == bytes(kernel_image(regions, clean, ref_io_size(regions, block_size)))
    parsed = parse_image(plan[0][1], regions)
    assert parsed.valid and parsed.nr_regions == regions and parsed.clean == bits


# ---------------------------------------------------------------------------------------------
# Sparse plans


def extents_of(plan: list[tuple[int, bytes]]) -> list[tuple[int, int]]:
    return [(offset, len(data)) for offset, data in plan]


@pytest.mark.parametrize(
    ("chunks", "block_size", "expected"),
    [
        ({3}, 512, [(1024 + 3 * 512, 512)]),
        ({0}, 512, [(1024, 512)]),  # header block not covered with 512-byte blocks
        ({0, 1}, 512, [(1024, 1024)]),  # adjacent blocks merged
        ({0, 2}, 512, [(1024, 512), (2048, 512)]),
        ({2, 0, 1, 7}, 512, [(1024, 1536), (1024 + 7 * 512, 512)]),
        ({0}, 4096, [(0, 4096)]),  # the header shares chunk 0's block
        ({5}, 4096, [(0, 4096)]),  # chunk 5 = bytes 3584..4095
        ({5, 6, 7}, 4096, [(0, 8192)]),  # spans blocks 0 and 1, merged
        ({6}, 4096, [(4096, 4096)]),  # header block not written
        ({6, 255}, 4096, [(4096, 4096), (131072, 4096)]),
        ({255}, 512, [(1024 + 255 * 512, 512)]),
        ({0}, 1024, [(1024, 1024)]),
        ({1}, 1024, [(1024, 1024)]),  # two chunks per 1 KiB block
        (set(), 512, []),
    ],
)
def test_sparse_plan_extents(
    chunks: set[int], block_size: int, expected: list[tuple[int, int]]
) -> None:
    regions = 2**20
    plan = plan_write(bits_from(regions, []), regions, chunks, block_size)
    assert extents_of(plan) == expected
    for offset, data in plan:
        assert offset % block_size == 0 and len(data) % block_size == 0


def test_sparse_plan_of_partial_last_chunk() -> None:
    regions = 5000  # bitmap 628 bytes: chunk 0 = 512 bytes, chunk 1 = 116 bytes
    bits = bits_from(regions, {4999})
    plan = plan_write(bits, regions, {1}, 512)
    assert extents_of(plan) == [(1536, 512)]
    data = plan[0][1]
    assert data[(4999 // 8) - 512] == 1 << (4999 % 8)
    assert data[(4999 // 8) - 512 + 1 :] == bytes(512 - ((4999 // 8) - 512 + 1))


def test_sparse_data_matches_full_image() -> None:
    regions = 70000
    clean = {0, 4095, 4096, 8191, 40000, 69999}
    bits = bits_from(regions, clean)
    full = plan_write(bits, regions, None, 4096)[0][1]
    nchunks = -(-bitmap_len(regions) // 512)
    for offset, data in plan_write(bits, regions, set(range(nchunks)), 4096):
        assert data == full[offset : offset + len(data)]
    # all chunks = everything but nothing beyond the I/O unit
    assert sum(len(d) for _, d in plan_write(bits, regions, set(range(nchunks)), 512)) == (
        io_size(regions, 512) - 1024
    )


@settings(max_examples=120, deadline=None)
@given(
    regions=st.integers(min_value=1, max_value=60000),
    block_size=st.sampled_from([512, 1024, 2048, 4096]),
    data=st.data(),
)
def test_sparse_writes_after_full_write_equal_full_write(
    regions: int, block_size: int, data: st.DataObject
) -> None:
    """Old full image + sparse plan of the changed chunks == full image of the new state."""
    old = data.draw(st.sets(st.integers(0, regions - 1), max_size=50))
    flips = data.draw(st.sets(st.integers(0, regions - 1), min_size=1, max_size=20))
    before = bits_from(regions, old)
    after = before.copy()
    for region in flips:
        after[region] = not after[region]
    chunks = {region // CHUNK_REGIONS for region in flips}

    size = io_size(regions, block_size)
    device = bytearray(plan_write(before, regions, None, block_size)[0][1])
    plan = plan_write(after, regions, chunks, block_size)
    apply(device, plan)
    assert bytes(device) == plan_write(after, regions, None, block_size)[0][1]
    assert len(device) == size
    written = sum(len(d) for _, d in plan)
    assert written <= len(chunks) * max(block_size, 2 * 512) + block_size
    # extents sorted, disjoint and not adjacent (adjacent ones must have been merged)
    for (o1, d1), (o2, _) in itertools.pairwise(plan):
        assert o1 + len(d1) < o2
    # the header block is only in the plan when a changed chunk shares it
    header_covered = any(1024 + c * 512 < block_size for c in chunks)
    assert (plan[0][0] == 0) == header_covered


def test_sparse_flush_on_1m_regions_is_small() -> None:
    regions = 2**20
    bits = bits_from(regions, [])
    for region in (12345, 12346, 700000):
        bits[region] = 1
    chunks = {12345 >> 12, 700000 >> 12}
    written = sum(len(d) for _, d in plan_write(bits, regions, chunks, 512))
    assert written == 1024
    # one chunk changed (the common case for a FLUSH): 1/256 of the bitmap
    one = sum(len(d) for _, d in plan_write(bits, regions, {12345 >> 12}, 512))
    assert one * 100 <= bitmap_len(regions)


# ---------------------------------------------------------------------------------------------
# MemoryDiskLog


def test_memory_log_round_trip_and_write_log() -> None:
    regions = 10000
    store = MemoryDiskLog(io_size(regions, 512), block_size=512, rdev=(253, 3))
    assert not read_image(store, regions).valid  # blank device
    bits = bits_from(regions, {0, 9999})
    assert write_image(store, bits, regions) == io_size(regions, 512)
    bits[5000] = 1
    assert write_image(store, bits, regions, {5000 >> 12}) == 512
    assert store.writes == [[(0, io_size(regions, 512))], [(1536, 512)]]
    assert store.flushes == 2
    image = read_image(store, regions)
    assert image.valid and set(image.clean.search(1)) == {0, 5000, 9999}
    assert bytes(store.data) == bytes(kernel_image(regions, {0, 5000, 9999}, len(store.data)))


def test_memory_log_write_failure_injection() -> None:
    regions = 10000
    store = MemoryDiskLog(io_size(regions, 512))
    bits = bits_from(regions, {1})
    write_image(store, bits, regions)
    before = bytes(store.data)

    store.fail_writes(errno.EIO)
    bits[2] = 1
    with pytest.raises(DiskIOError) as exc:
        write_image(store, bits, regions)
    assert exc.value.errno == errno.EIO and "<memory>" in str(exc.value)
    assert bytes(store.data) == before and store.flushes == 1

    # a torn write: the first extent lands, the second fails, no flush
    store.fail_writes(errno.EIO, after_extents=1)
    bits[4096 * 2] = 1
    with pytest.raises(DiskIOError):
        write_image(store, bits, regions, {0, 2})
    assert store.writes[-1] == [(1024, 512), (2048, 512)]
    assert parse_image(bytes(store.data), regions).clean[2]  # first extent landed
    assert not parse_image(bytes(store.data), regions).clean[4096 * 2]
    assert store.flushes == 1

    store.fail_writes(None)  # healed
    write_image(store, bits, regions)
    assert read_image(store, regions).clean == bits


def test_memory_log_read_failure_and_checks() -> None:
    store = MemoryDiskLog(2048, block_size=512)
    store.fail_reads(errno.EIO)
    with pytest.raises(DiskIOError) as exc:
        store.read(1536)
    assert exc.value.errno == errno.EIO
    store.fail_reads(None)
    assert store.read(1000) == bytes(1000)
    with pytest.raises(DiskIOError) as exc:
        store.read(2049)  # past the end
    assert exc.value.errno == errno.EIO
    with pytest.raises(ValueError, match="aligned"):
        store.write_extents([(100, bytes(512))])
    with pytest.raises(ValueError, match="aligned"):
        store.write_extents([(0, bytes(100))])
    with pytest.raises(ValueError, match="outside"):
        store.write_extents([(1536, bytes(1024))])
    with pytest.raises(DiskFormatError):
        read_image(store, 20000)  # device too small for the geometry
    store.close()
    with pytest.raises(DiskIOError) as exc:
        store.read(512)
    assert exc.value.errno == errno.EBADF


# ---------------------------------------------------------------------------------------------
# DiskLogDevice on a regular file


def make_file(path: Path, size: int) -> str:
    with open(path, "wb") as f:
        f.truncate(size)
    return str(path)


class IOSpy:
    """Wraps os.preadv/os.pwritev to record (offset, length, buffer address), counts the
    writes and the ``fdatasync`` calls."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, short: int = 0) -> None:
        self.calls: list[tuple[str, int, int, int]] = []
        self.syncs = 0
        self.plain_writes = 0
        self.short = short
        real_preadv, real_pwritev, real_sync = os.preadv, os.pwritev, os.fdatasync

        def cut(view: memoryview) -> memoryview:
            # with short=n, the "kernel" transfers at most n bytes per call
            return view[: self.short] if self.short and len(view) > self.short else view

        def preadv(fd: int, buffers: list, offset: int) -> int:  # type: ignore[type-arg]
            view = cut(buffers[0])
            self.calls.append(("r", offset, len(view), _address(view)))
            return real_preadv(fd, [view], offset)

        def pwritev(fd: int, buffers: list, offset: int) -> int:  # type: ignore[type-arg]
            view = cut(buffers[0])
            self.calls.append(("w", offset, len(view), _address(view)))
            self.plain_writes += 1
            return real_pwritev(fd, [view], offset)

        def fdatasync(fd: int) -> None:
            self.syncs += 1
            real_sync(fd)

        monkeypatch.setattr(disklog.os, "preadv", preadv)
        monkeypatch.setattr(disklog.os, "pwritev", pwritev)
        monkeypatch.setattr(disklog.os, "fdatasync", fdatasync)

    def assert_aligned(self, block_size: int) -> None:
        assert self.calls
        for _kind, offset, length, address in self.calls:
            assert offset % block_size == 0, self.calls
            assert length % block_size == 0, self.calls
            assert address % block_size == 0, self.calls


def _address(view: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


@pytest.mark.parametrize("short", [False, True], ids=["whole", "short-transfers"])
def test_file_device_write_read_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, short: bool
) -> None:
    regions = 50000
    path = make_file(tmp_path / "log.img", 64 * 1024)
    spy = IOSpy(monkeypatch, short=os.stat(path).st_blksize if short else 0)
    with DiskLogDevice.open(path) as dev:
        assert dev.path == path and dev.rdev is None
        assert dev.size_bytes == 64 * 1024
        bs = dev.block_size
        assert bs >= 512 and bs & (bs - 1) == 0
        assert not read_image(dev, regions).valid
        bits = bits_from(regions, {0, 31, 32, 49999})
        write_image(dev, bits, regions)
        bits[40000] = 1
        bits[1] = 1
        write_image(dev, bits, regions, {0, 40000 >> 12})
        image = read_image(dev, regions)
        assert image.valid and image.clean == bits
        odd = dev.read(1000)  # not a block multiple: transfer rounded up, result exact
        assert len(odd) == 1000
    spy.assert_aligned(bs)
    assert spy.syncs == 2  # both writes durable
    if short:
        assert all(length == spy.short for _, _, length, _ in spy.calls)
        assert len(spy.calls) > 4
    on_disk = Path(path).read_bytes()
    expect = kernel_image(regions, {0, 1, 31, 32, 40000, 49999}, io_size(regions, bs))
    assert on_disk[: len(expect)] == bytes(expect)
    assert on_disk[len(expect) :] == bytes(len(on_disk) - len(expect))


def test_file_device_uses_o_direct_when_possible(tmp_path: Path) -> None:
    path = make_file(tmp_path / "log.img", 8192)
    with DiskLogDevice.open(path) as dev:
        flags = fcntl.fcntl(dev._fd, fcntl.F_GETFL)
        fd_flags = fcntl.fcntl(dev._fd, fcntl.F_GETFD)
        assert fd_flags & fcntl.FD_CLOEXEC
        assert bool(flags & os.O_DIRECT) == dev.direct
        assert flags & os.O_ACCMODE == os.O_RDWR


def test_file_device_falls_back_when_o_direct_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # No filesystem on this host refuses O_DIRECT (tmpfs accepts it since Linux 6.6), so the
    # refusal is simulated at os.open.
    path = make_file(tmp_path / "log.img", 8192)
    real_open = os.open

    def no_direct(p: str, flags: int, *args: int) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(p, flags, *args)

    monkeypatch.setattr(disklog.os, "open", no_direct)
    with caplog.at_level(logging.WARNING, logger="ulogd.state.disklog"):
        dev = DiskLogDevice.open(path)
    try:
        assert not dev.direct
        assert "O_DIRECT" in caplog.text and path in caplog.text
        bits = bits_from(100, {3})
        write_image(dev, bits, 100)
        assert read_image(dev, 100).clean == bits
    finally:
        dev.close()


def test_file_device_errors(tmp_path: Path) -> None:
    with pytest.raises(DiskIOError) as exc:
        DiskLogDevice.open(str(tmp_path / "missing"))
    assert exc.value.errno == errno.ENOENT and "missing" in str(exc.value)
    with pytest.raises(DiskIOError) as exc:
        DiskLogDevice.open(str(tmp_path))  # a directory
    assert exc.value.errno in (errno.EISDIR, errno.ENOTBLK)

    path = make_file(tmp_path / "small.img", 4096)
    dev = DiskLogDevice.open(path)
    with pytest.raises(DiskIOError) as exc:
        dev.read(8192)  # past the end of the file
    assert exc.value.errno == errno.EIO and "end of device" in str(exc.value)
    with pytest.raises(ValueError, match="outside"):
        dev.write_extents([(4096, bytes(dev.block_size))])
    with pytest.raises(ValueError, match="aligned"):
        dev.write_extents([(0, bytes(100))])
    with pytest.raises(DiskFormatError, match="too small"):
        read_image(dev, 100000)
    dev.close()
    dev.close()  # idempotent
    with pytest.raises(DiskIOError) as exc:
        dev.read(512)
    assert exc.value.errno == errno.EBADF


def test_char_device_is_refused() -> None:
    with pytest.raises(DiskIOError) as exc:
        DiskLogDevice.open("/dev/null")
    assert exc.value.errno in (errno.ENOTBLK, errno.EINVAL)


# ---------------------------------------------------------------------------------------------
# Real devices: loop devices and a filesystem that fails with EIO


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


@pytest.fixture
def loop_factory() -> Iterator:
    """Attach loop devices over files; skips (with the reason) when that is impossible."""
    attached: list[str] = []

    def attach(backing: str, sector_size: int = 512) -> str:
        if shutil.which("losetup") is None:
            pytest.skip("losetup is not installed")
        args = ["losetup", "-f", "--show"]
        if sector_size != 512:
            args += ["--sector-size", str(sector_size)]
        proc = _run(*args, backing)
        if proc.returncode != 0:
            pytest.skip(f"cannot attach a loop device here: {proc.stderr.strip()}")
        dev = proc.stdout.strip()
        attached.append(dev)
        return dev

    yield attach
    for dev in attached:
        _run("losetup", "-d", dev)


@pytest.mark.parametrize("sector_size", [512, 4096])
def test_loop_device_write_read_back(
    tmp_path: Path, loop_factory, monkeypatch: pytest.MonkeyPatch, sector_size: int
) -> None:
    backing = make_file(tmp_path / "backing.img", 1 << 20)
    node = loop_factory(backing, sector_size)
    st_rdev = os.stat(node).st_rdev
    regions = 70000
    spy = IOSpy(monkeypatch)
    with DiskLogDevice.open(node) as dev:
        assert dev.direct
        assert dev.block_size == sector_size  # from BLKSSZGET
        assert dev.size_bytes == 1 << 20  # from BLKGETSIZE64
        assert dev.rdev == (os.major(st_rdev), os.minor(st_rdev))
        bits = bits_from(regions, {0, 7, 8, 31, 32, 69999})
        write_image(dev, bits, regions)
        bits[4096 * 9] = 1
        plan = plan_write(bits, regions, {9}, dev.block_size)
        dev.write_extents(plan)
        assert read_image(dev, regions).clean == bits
    spy.assert_aligned(sector_size)
    assert [c[2] for c in spy.calls if c[0] == "w"] == [
        io_size(regions, sector_size),
        sector_size,
    ]
    expect = kernel_image(
        regions, {0, 7, 8, 31, 32, 4096 * 9, 69999}, io_size(regions, sector_size)
    )
    with open(backing, "rb") as f:  # what the loop device put in its backing file
        assert f.read(len(expect)) == bytes(expect)


def test_loop_device_too_small_for_geometry(tmp_path: Path, loop_factory) -> None:
    node = loop_factory(make_file(tmp_path / "b.img", 8192))
    with DiskLogDevice.open(node) as dev:
        with pytest.raises(DiskFormatError, match="too small"):
            check_device_size(dev.size_bytes, 60000, dev.block_size)
        check_device_size(dev.size_bytes, 50000, dev.block_size)


_FS_IOC_SHUTDOWN = 0x8004587D  # _IOR('X', 125, __u32)
_SHUTDOWN_NOLOGFLUSH = 2


@pytest.fixture
def shut_down_fs(tmp_path: Path) -> Iterator:
    """A small ext4 mounted from a loop device, and a function that shuts it down so that all
    further I/O to its files fails with EIO (the real error, from the filesystem)."""
    if os.geteuid() != 0 or shutil.which("mkfs.ext4") is None:
        pytest.skip("needs root and mkfs.ext4 to mount a scratch filesystem")
    image = make_file(tmp_path / "fs.img", 16 << 20)
    proc = _run("mkfs.ext4", "-q", "-F", image)
    if proc.returncode != 0:
        pytest.skip(f"mkfs.ext4 failed: {proc.stderr.strip()}")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = _run("mount", "-o", "loop", image, str(mnt))
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a loop filesystem here: {proc.stderr.strip()}")

    def shutdown() -> None:
        fd = os.open(mnt, os.O_RDONLY)
        try:
            fcntl.ioctl(fd, _FS_IOC_SHUTDOWN, struct.pack("I", _SHUTDOWN_NOLOGFLUSH))
        finally:
            os.close(fd)

    try:
        yield mnt, shutdown
    finally:
        _run("umount", str(mnt))


def test_real_eio_from_file_on_failed_filesystem(shut_down_fs) -> None:
    mnt, shutdown = shut_down_fs
    path = make_file(mnt / "log.img", 64 * 1024)
    regions = 1000
    with DiskLogDevice.open(path) as dev:
        bits = bits_from(regions, {1})
        write_image(dev, bits, regions)
        shutdown()
        bits[2] = 1
        with pytest.raises(DiskIOError) as exc:
            write_image(dev, bits, regions, {0})
        assert exc.value.errno == errno.EIO and path in str(exc.value)
        with pytest.raises(DiskIOError) as exc:
            dev.read(io_size(regions, dev.block_size))
        assert exc.value.errno == errno.EIO


def test_real_eio_from_loop_device_over_failed_filesystem(shut_down_fs, loop_factory) -> None:
    mnt, shutdown = shut_down_fs
    node = loop_factory(make_file(mnt / "backing.img", 1 << 20))
    regions = 1000
    with DiskLogDevice.open(node) as dev:
        bits = bits_from(regions, {1})
        write_image(dev, bits, regions)
        shutdown()
        bits[2] = 1
        with pytest.raises(DiskIOError) as exc:
            write_image(dev, bits, regions)
        assert exc.value.errno == errno.EIO and node in str(exc.value)


# --------------------------------------------------------------------------------------------
# Durable and cached writes (issue 17: a clears-only flush does not wait for the cache)


def test_a_cached_write_makes_no_sync_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    regions = 5000
    path = make_file(tmp_path / "log.img", 64 * 1024)
    spy = IOSpy(monkeypatch)
    with DiskLogDevice.open(path) as dev:
        bits = bits_from(regions, {1, 2})
        dev.write_extents(plan_write(bits, regions, None, dev.block_size), flush=False)
        assert (spy.syncs, spy.plain_writes) == (0, 1)
        assert (dev.sync_calls, dev.cached_writes, dev.durable_writes) == (0, 1, 0)
        assert read_image(dev, regions).clean == bits  # written all the same
        dev.write_extents(plan_write(bits, regions, {0}, dev.block_size))
        assert (spy.syncs, spy.plain_writes) == (1, 2)
        assert (dev.sync_calls, dev.durable_writes) == (1, 1)


def test_memory_log_counts_durable_and_cached_writes() -> None:
    store = MemoryDiskLog(4096)
    store.write_extents([(0, bytes(512))])
    store.write_extents([(512, b"\1" * 512)], flush=False)
    assert (store.flushes, store.cached_writes, len(store.writes)) == (1, 1, 2)
    assert store.data[512] == 1
