"""On-disk dirty-log format and aligned, durable I/O on the log device.

Theory of operation
===================

The persistent half of a ``disk`` / ``clustered-disk`` log is one small image at the start of
the log device, laid out exactly as the kernel's own ``disk`` dirty log lays it out, so a log
device can move between ulogd, the in-kernel log and cmirrord (on little-endian hosts) in
either direction::

    byte 0     header, 16 bytes, little-endian: magic u32, version u32, nr_regions u64
    byte 16    zeros up to byte 1024
    byte 1024  clean bitmap: bitmap_len(region_count) = 4 * ceil(region_count / 32) bytes;
               region i is bit (i % 8) of byte (i // 8), least significant bit first; 1 = clean
    ...        zeros up to the end of the logical block holding the bitmap's last byte

The *I/O unit* is ``[0, io_size(region_count, block_size))``: the header and bitmap rounded up
to the device's logical block size. The constructor must refuse a device smaller than that
(:func:`check_device_size`).

Reading (:func:`parse_image`) is lenient the way the kernel is: a bad magic means "there is no
log here yet" (``valid=False``), version 1 is read as version 2, any other version is an error.
``nr_regions`` from the header is only reported; deciding what it means (a log made for a
different size, or LVM's freshly initialised log LV with ``nr_regions = 2**64 - 1``) is the
region log's business. Bits past ``region_count`` are ignored on reading and always written as
zero.

Writing (:func:`plan_write`) turns the in-memory clean bitmap into a list of block-aligned
``(offset, data)`` extents. A *full* plan (``chunks=None``) covers the whole I/O unit, header
included; the region log issues one after every resume, so the header on disk always matches
the current geometry. A *sparse* plan covers only the logical blocks holding the bitmap
*chunks* that changed since the last write (a chunk is 512 bitmap bytes = 4096 regions, index
``region >> 12``), adjacent blocks merged into one extent, the header block only when one of
those chunks shares it. Every block a sparse plan writes is rendered from the same in-memory
state a full plan would render, so a sequence of sparse writes after a full one leaves the
device byte-identical to a single full write. Each logical block is written atomically by the
device; blocks are independent (a torn write only loses some newer bit values, never mixes
two regions' histories), which is why writing fewer blocks is as safe as the kernel's
single-I/O write.

Durability: :meth:`DiskLogDevice.write_extents` returns only after ``fdatasync`` on the open
device, which on a block device sends a cache flush (the equivalent of the kernel log's
``REQ_PREFLUSH``) and on a file flushes the file's data.  (One ``pwritev(RWF_DSYNC)`` per
extent instead of the two calls was measured and dropped: on a block device it costs a FUA
write *and* a flush, 1.2-1.3x the two calls in ``bench/durable_path.py``.)  With
``flush=False`` (a write that only records regions becoming clean: see :mod:`ulogd.regionlog`)
it writes without waiting for the device's cache, as the kernel's ``disk`` log does for such
writes; an O_DIRECT write still reaches the device before the call returns.  Any failure
raises :class:`DiskIOError`; the caller must then consider the on-disk state unknown (report
the log device failed, and write the whole unit again before trusting it).

The format functions are pure and never touch a file; the two I/O classes
(:class:`DiskLogDevice` for a real device or file with ``O_DIRECT``, :class:`MemoryDiskLog`
for a ``bytearray`` with fault injection) share the small :class:`LogStore` interface.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import stat
import struct
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from bitarray import bitarray

__all__ = [
    "BITMAP_OFFSET",
    "CHUNK_BYTES",
    "CHUNK_REGIONS",
    "HEADER_SIZE",
    "MAGIC",
    "VERSION",
    "DiskFormatError",
    "DiskIOError",
    "DiskImage",
    "DiskLogDevice",
    "LogStore",
    "MemoryDiskLog",
    "bitmap_len",
    "check_device_size",
    "endian_of",
    "io_size",
    "parse_image",
    "plan_write",
    "read_image",
    "write_image",
]

log = logging.getLogger(__name__)

MAGIC = 0x4D695272
VERSION = 2
BITMAP_OFFSET = 1024
CHUNK_REGIONS = 4096
CHUNK_BYTES = CHUNK_REGIONS // 8

_HEADER = struct.Struct("<IIQ")
HEADER_SIZE = _HEADER.size  # 16
_ACCEPTED_VERSIONS = (1, 2)  # version 1 is read as 2, as the kernel does on little-endian hosts
_U64_MAX = 2**64 - 1

# Linux ioctls (asm-generic/ioctl.h encodings, identical on every architecture Debian ships).
_BLKSSZGET = 0x1268  # _IO(0x12, 104): logical block size, int
_BLKGETSIZE64 = 0x80081272  # _IOR(0x12, 114, size_t): size in bytes, u64


class DiskFormatError(ValueError):
    """The log image or the device geometry cannot be used (message says why)."""


class DiskIOError(OSError):
    """An I/O operation on the log device failed; ``errno`` is the OS error number."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(err, message)


# --------------------------------------------------------------------------------------------
# Geometry


def _check_region_count(region_count: int) -> None:
    if region_count < 0 or region_count > 0xFFFFFFFF:
        raise ValueError(f"region_count {region_count} is out of range 0..2**32-1")


def _check_block_size(block_size: int) -> None:
    if block_size < 512 or block_size & (block_size - 1):
        raise ValueError(f"block size {block_size} is not a power of two >= 512")


def bitmap_len(region_count: int) -> int:
    """Bytes of clean bitmap on disk: whole 32-bit words, ``4 * ceil(region_count / 32)``."""
    _check_region_count(region_count)
    return 4 * ((region_count + 31) // 32)


def io_size(region_count: int, block_size: int) -> int:
    """Bytes of the I/O unit: header + bitmap rounded up to a whole logical block."""
    _check_block_size(block_size)
    end = BITMAP_OFFSET + bitmap_len(region_count)
    return -(-end // block_size) * block_size


def check_device_size(size_bytes: int, region_count: int, block_size: int) -> None:
    """Raise :class:`DiskFormatError` when the device cannot hold the whole I/O unit."""
    need = io_size(region_count, block_size)
    if size_bytes < need:
        raise DiskFormatError(
            f"log device too small: {size_bytes} bytes, but {region_count} regions need "
            f"{need} bytes (header at 0, {bitmap_len(region_count)}-byte bitmap at "
            f"{BITMAP_OFFSET}, rounded up to {block_size}-byte blocks)"
        )


# --------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class DiskImage:
    """What a log image says.

    ``valid`` is False when the magic is wrong (no log was ever written here); then
    ``nr_regions`` is 0 and ``clean`` is all zeros. ``clean`` always holds exactly the
    caller's ``region_count`` bits (``endian='little'``), whatever ``nr_regions`` says.
    """

    valid: bool
    nr_regions: int
    clean: bitarray


def parse_image(buf: bytes | bytearray | memoryview, region_count: int) -> DiskImage:
    """Decode a log image read from offset 0 of the log device.

    Raises :class:`DiskFormatError` for an unknown header version or a buffer too short for
    the header or (for a valid header) for the bitmap of ``region_count`` regions.
    """
    _check_region_count(region_count)
    view = memoryview(buf).cast("B")
    if len(view) < HEADER_SIZE:
        raise DiskFormatError(
            f"log image truncated: {len(view)} bytes, the header alone needs {HEADER_SIZE}"
        )
    magic, version, nr_regions = _HEADER.unpack_from(view, 0)
    if magic != MAGIC:
        return DiskImage(valid=False, nr_regions=0, clean=_zeros(region_count))
    if version not in _ACCEPTED_VERSIONS:
        raise DiskFormatError(
            f"unsupported log format version {version} (only 1 and {VERSION} are known)"
        )
    need = BITMAP_OFFSET + bitmap_len(region_count)
    if len(view) < need:
        raise DiskFormatError(
            f"log image truncated: {len(view)} bytes, but the bitmap of {region_count} "
            f"regions ends at byte {need}"
        )
    clean = bitarray(endian="little")
    clean.frombytes(bytes(view[BITMAP_OFFSET : BITMAP_OFFSET + (region_count + 7) // 8]))
    del clean[region_count:]
    return DiskImage(valid=True, nr_regions=nr_regions, clean=clean)


def _zeros(n: int) -> bitarray:
    bits = bitarray(n, endian="little")
    bits.setall(0)
    return bits


# --------------------------------------------------------------------------------------------
# Writing


def _render(clean: bitarray, region_count: int, start: int, end: int) -> bytes:
    """Bytes ``[start, end)`` of the full image of ``clean`` (both ends inside the I/O unit)."""
    out = bytearray(end - start)
    if start < HEADER_SIZE:
        header = _HEADER.pack(MAGIC, VERSION, region_count)
        n = min(end, HEADER_SIZE) - start
        out[:n] = header[start : start + n]
    # Bitmap bytes [b0, b1) of this range; bits past region_count stay zero.
    blen = bitmap_len(region_count)
    b0 = max(start - BITMAP_OFFSET, 0)
    b1 = min(end - BITMAP_OFFSET, blen)
    if b1 > b0:
        bits = clean[8 * b0 : min(8 * b1, region_count)]
        data = bits.tobytes()  # pad bits are zero
        pos = BITMAP_OFFSET + b0 - start
        out[pos : pos + len(data)] = data
    return bytes(out)


def endian_of(bits: bitarray) -> str:
    """The bit order of ``bits``: an attribute since bitarray 3, a method before (Debian 12
    ships 2.7.3)."""
    endian = bits.endian
    return str(endian() if callable(endian) else endian)


def plan_write(
    clean: bitarray, region_count: int, chunks: set[int] | None, block_size: int
) -> list[tuple[int, bytes]]:
    """Block-aligned ``(offset, data)`` extents that store ``clean`` on the device.

    ``chunks=None`` writes the whole I/O unit (header included). Otherwise only the logical
    blocks covering the given bitmap chunks (``region >> 12``) are written, adjacent blocks
    merged, sorted by offset; an empty set gives an empty plan.
    """
    if len(clean) < region_count:
        # Longer is fine: the daemon's bitmaps are padded to whole words; only the first
        # region_count bits are written and the rest of the last word is zero on disk.
        raise ValueError(f"bitmap has {len(clean)} bits, fewer than {region_count}")
    if endian_of(clean) != "little":
        clean = bitarray(clean, endian="little")
    total = io_size(region_count, block_size)
    if chunks is None:
        return [(0, _render(clean, region_count, 0, total))]

    blen = bitmap_len(region_count)
    nchunks = -(-blen // CHUNK_BYTES)
    blocks: set[int] = set()
    for chunk in chunks:
        if not 0 <= chunk < nchunks:
            raise ValueError(f"chunk {chunk} out of range: the bitmap has {nchunks} chunks")
        first = BITMAP_OFFSET + chunk * CHUNK_BYTES
        last = BITMAP_OFFSET + min((chunk + 1) * CHUNK_BYTES, blen) - 1
        blocks.update(range(first // block_size, last // block_size + 1))

    extents: list[tuple[int, bytes]] = []
    run_start = run_end = -1  # current run of blocks, [run_start, run_end)
    for block in sorted(blocks):
        if block != run_end:
            if run_end > run_start:
                extents.append(_extent(clean, region_count, run_start, run_end, block_size))
            run_start = block
        run_end = block + 1
    if run_end > run_start:
        extents.append(_extent(clean, region_count, run_start, run_end, block_size))
    return extents


def _extent(
    clean: bitarray, region_count: int, first: int, end: int, block_size: int
) -> tuple[int, bytes]:
    start = first * block_size
    return start, _render(clean, region_count, start, end * block_size)


# --------------------------------------------------------------------------------------------
# I/O


class LogStore(Protocol):
    """What the region log needs from wherever the image lives."""

    path: str
    rdev: tuple[int, int] | None
    block_size: int
    size_bytes: int

    def read(self, nbytes: int) -> bytes: ...

    def write_extents(self, extents: Iterable[tuple[int, bytes]], flush: bool = True) -> None: ...

    def close(self) -> None: ...


def read_image(store: LogStore, region_count: int) -> DiskImage:
    """Read and parse the I/O unit of ``store`` (checks the device size first)."""
    check_device_size(store.size_bytes, region_count, store.block_size)
    return parse_image(store.read(io_size(region_count, store.block_size)), region_count)


def write_image(
    store: LogStore, clean: bitarray, region_count: int, chunks: set[int] | None = None
) -> int:
    """Plan and durably write ``clean``; returns the number of bytes written."""
    extents = plan_write(clean, region_count, chunks, store.block_size)
    if extents:
        store.write_extents(extents)
    return sum(len(data) for _, data in extents)


def _check_extents(
    extents: Sequence[tuple[int, bytes]], block_size: int, size_bytes: int, name: str
) -> None:
    for offset, data in extents:
        if offset % block_size or len(data) % block_size:
            raise ValueError(
                f"{name}: extent at {offset} of {len(data)} bytes is not aligned to "
                f"{block_size}-byte blocks"
            )
        if offset < 0 or offset + len(data) > size_bytes:
            raise ValueError(
                f"{name}: extent at {offset} of {len(data)} bytes lies outside the "
                f"{size_bytes}-byte device"
            )


class DiskLogDevice:
    """A log device (or image file) opened for direct, synchronous, aligned I/O.

    Block devices are opened ``O_RDWR | O_DIRECT``; their logical block size comes from the
    ``BLKSSZGET`` ioctl and their size from ``BLKGETSIZE64``. Regular files use the
    filesystem's preferred block size (``st_blksize``) as the alignment unit, and when their
    filesystem refuses ``O_DIRECT`` they fall back to buffered I/O (``direct`` is then
    False); durability comes from ``fdatasync`` in both cases.

    All I/O goes through a page-aligned anonymous ``mmap`` buffer, which satisfies every
    ``O_DIRECT`` memory-alignment rule. Calls are serialised by a lock, so one worker thread
    per device (or several) may use it.
    """

    def __init__(
        self,
        fd: int,
        path: str,
        *,
        rdev: tuple[int, int] | None,
        block_size: int,
        size_bytes: int,
        direct: bool,
    ) -> None:
        self._fd = fd
        self.path = path
        self.rdev = rdev
        self.block_size = block_size
        self.size_bytes = size_bytes
        self.direct = direct
        self._lock = threading.Lock()
        self._buf: mmap.mmap | None = None
        #: fdatasync calls made (the durable writes' cache flushes)
        self.sync_calls = 0
        #: durable and cached write_extents calls that succeeded
        self.durable_writes = 0
        self.cached_writes = 0

    @classmethod
    def open(cls, path: str) -> DiskLogDevice:
        """Open ``path`` (a block device or a regular file) read-write for direct I/O."""
        flags = os.O_RDWR | os.O_CLOEXEC
        direct = True
        try:
            fd = os.open(path, flags | os.O_DIRECT)
        except OSError as e:
            if e.errno != errno.EINVAL or not _is_regular_file(path):
                raise DiskIOError(
                    e.errno or errno.EIO, f"cannot open log device {path}: {e.strerror}"
                ) from e
            try:
                fd = os.open(path, flags)
            except OSError as e2:
                raise DiskIOError(
                    e2.errno or errno.EIO, f"cannot open log device {path}: {e2.strerror}"
                ) from e2
            direct = False
            log.warning("%s: filesystem refuses O_DIRECT; using buffered I/O with fdatasync", path)
        try:
            st = os.fstat(fd)
            if stat.S_ISBLK(st.st_mode):
                rdev: tuple[int, int] | None = (os.major(st.st_rdev), os.minor(st.st_rdev))
                block_size = struct.unpack("i", fcntl.ioctl(fd, _BLKSSZGET, b"\0" * 4))[0]
                size_bytes = struct.unpack("Q", fcntl.ioctl(fd, _BLKGETSIZE64, b"\0" * 8))[0]
            elif stat.S_ISREG(st.st_mode):
                rdev = None
                block_size = max(st.st_blksize, 512)
                size_bytes = st.st_size
            else:
                raise DiskIOError(
                    errno.ENOTBLK, f"log device {path} is neither a block device nor a file"
                )
            _check_block_size(block_size)
        except OSError as e:
            os.close(fd)
            if isinstance(e, DiskIOError):
                raise
            raise DiskIOError(e.errno or errno.EIO, f"cannot query log device {path}: {e}") from e
        except ValueError as e:
            os.close(fd)
            raise DiskIOError(errno.EINVAL, f"log device {path}: {e}") from e
        return cls(fd, path, rdev=rdev, block_size=block_size, size_bytes=size_bytes, direct=direct)

    # -- helpers -----------------------------------------------------------------------------

    def _fileno(self) -> int:
        if self._fd < 0:
            raise DiskIOError(errno.EBADF, f"log device {self.path} is closed")
        return self._fd

    def _buffer(self, nbytes: int) -> mmap.mmap:
        """A page-aligned scratch buffer of at least ``nbytes`` (kept and reused)."""
        if self._buf is None or len(self._buf) < nbytes:
            if self._buf is not None:
                self._buf.close()
            size = -(-max(nbytes, 1) // mmap.PAGESIZE) * mmap.PAGESIZE
            self._buf = mmap.mmap(-1, size)
        return self._buf

    def _round(self, nbytes: int) -> int:
        return -(-nbytes // self.block_size) * self.block_size

    # -- I/O ---------------------------------------------------------------------------------

    def read(self, nbytes: int) -> bytes:
        """Read ``nbytes`` from offset 0 (the transfer is rounded up to whole blocks)."""
        length = self._round(nbytes)
        with self._lock:
            fd = self._fileno()
            buf = self._buffer(length)
            view = memoryview(buf)
            try:
                done = 0
                while done < length:
                    try:
                        n = os.preadv(fd, [view[done:length]], done)
                    except OSError as e:
                        raise DiskIOError(
                            e.errno or errno.EIO,
                            f"read of log device {self.path} at offset {done} failed: {e.strerror}",
                        ) from e
                    if n == 0:
                        raise DiskIOError(
                            errno.EIO,
                            f"read of log device {self.path}: unexpected end of device at "
                            f"offset {done} (wanted {length} bytes)",
                        )
                    done += n
                return bytes(view[:nbytes])
            finally:
                view.release()

    def write_extents(self, extents: Iterable[tuple[int, bytes]], flush: bool = True) -> None:
        """Write each aligned extent; with ``flush`` (the default) durably (see the module's
        docstring), without it as a plain write that may stay in the device's cache."""
        extents = list(extents)
        _check_extents(extents, self.block_size, self.size_bytes, self.path)
        with self._lock:
            fd = self._fileno()
            buf = self._buffer(max((len(d) for _, d in extents), default=0))
            view = memoryview(buf)
            try:
                for offset, data in extents:
                    length = len(data)
                    view[:length] = data
                    done = 0
                    while done < length:
                        try:
                            n = os.pwritev(fd, [view[done:length]], offset + done)
                        except OSError as e:
                            raise DiskIOError(
                                e.errno or errno.EIO,
                                f"write to log device {self.path} at offset {offset + done} "
                                f"failed: {e.strerror}",
                            ) from e
                        if n == 0:
                            raise DiskIOError(
                                errno.EIO,
                                f"write to log device {self.path} at offset {offset + done} "
                                "made no progress",
                            )
                        done += n
                if flush:
                    try:
                        os.fdatasync(fd)
                        self.sync_calls += 1
                    except OSError as e:
                        raise DiskIOError(
                            e.errno or errno.EIO,
                            f"flush of log device {self.path} failed: {e.strerror}",
                        ) from e
                if flush:
                    self.durable_writes += 1
                else:
                    self.cached_writes += 1
            finally:
                view.release()

    def close(self) -> None:
        """Close the device; further I/O raises ``DiskIOError(EBADF)``. Idempotent."""
        with self._lock:
            if self._fd >= 0:
                fd, self._fd = self._fd, -1
                os.close(fd)
            if self._buf is not None:
                self._buf.close()
                self._buf = None

    def __enter__(self) -> DiskLogDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = "direct" if self.direct else "buffered"
        return (
            f"<DiskLogDevice {self.path} rdev={self.rdev} block_size={self.block_size} "
            f"size={self.size_bytes} {mode}>"
        )


def _is_regular_file(path: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


class MemoryDiskLog:
    """A log device held in a ``bytearray``, for the offline replay tool and tests.

    Applies the same alignment and bounds checks as :class:`DiskLogDevice`. Fault injection:
    :meth:`fail_writes` / :meth:`fail_reads` make later calls raise :class:`DiskIOError`
    (optionally after some extents of a write have landed, to model a torn multi-extent
    write). ``writes`` records ``[(offset, length), ...]`` per successful or failed call and
    ``flushes`` counts completed durable writes, ``cached_writes`` completed writes made with
    ``flush=False``.
    """

    def __init__(
        self,
        size_bytes: int | None = None,
        *,
        block_size: int = 512,
        data: bytes | bytearray | None = None,
        rdev: tuple[int, int] | None = None,
        path: str = "<memory>",
    ) -> None:
        _check_block_size(block_size)
        if data is None:
            if size_bytes is None:
                raise ValueError("give size_bytes or data")
            data = bytearray(size_bytes)
        self.data = bytearray(data)
        if size_bytes is not None and size_bytes != len(self.data):
            raise ValueError("size_bytes does not match len(data)")
        self.path = path
        self.rdev = rdev
        self.block_size = block_size
        self.writes: list[list[tuple[int, int]]] = []
        self.flushes = 0
        self.cached_writes = 0
        self.closed = False
        self._write_error: int | None = None
        self._write_after = 0
        self._read_error: int | None = None
        self._lock = threading.Lock()

    @property
    def size_bytes(self) -> int:
        return len(self.data)

    def fail_writes(self, err: int | None = errno.EIO, *, after_extents: int = 0) -> None:
        """Make every later write fail with ``err`` (``None`` heals the device).

        With ``after_extents=n`` the first ``n`` extents of each write still land before the
        error, and no flush happens.
        """
        self._write_error = err
        self._write_after = after_extents

    def fail_reads(self, err: int | None = errno.EIO) -> None:
        """Make every later read fail with ``err`` (``None`` heals the device)."""
        self._read_error = err

    def read(self, nbytes: int) -> bytes:
        with self._lock:
            self._check_open()
            if self._read_error is not None:
                raise DiskIOError(
                    self._read_error, f"read of log device {self.path} failed (injected)"
                )
            length = -(-nbytes // self.block_size) * self.block_size
            if length > len(self.data):
                raise DiskIOError(
                    errno.EIO,
                    f"read of log device {self.path}: unexpected end of device at offset "
                    f"{len(self.data)} (wanted {length} bytes)",
                )
            return bytes(self.data[:nbytes])

    def write_extents(self, extents: Iterable[tuple[int, bytes]], flush: bool = True) -> None:
        extents = list(extents)
        _check_extents(extents, self.block_size, self.size_bytes, self.path)
        with self._lock:
            self._check_open()
            self.writes.append([(off, len(d)) for off, d in extents])
            for i, (offset, data) in enumerate(extents):
                if self._write_error is not None and i >= self._write_after:
                    raise DiskIOError(
                        self._write_error,
                        f"write to log device {self.path} at offset {offset} failed (injected)",
                    )
                self.data[offset : offset + len(data)] = data
            if self._write_error is not None:
                raise DiskIOError(
                    self._write_error, f"flush of log device {self.path} failed (injected)"
                )
            if flush:
                self.flushes += 1
            else:
                self.cached_writes += 1

    def _check_open(self) -> None:
        if self.closed:
            raise DiskIOError(errno.EBADF, f"log device {self.path} is closed")

    def close(self) -> None:
        self.closed = True
