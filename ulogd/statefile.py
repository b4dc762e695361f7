"""Crash-safe live state: each log's bitmaps and scalars in a memory-mapped file.

Theory of operation
-------------------
When ulogd dies, the kernel keeps the mirror and reconnects to the next daemon (CTR with its
NUL, then RESUME, then the pending request).  It does not repeat earlier marks and, once it
believes the mirror is in sync, stops asking for resync work; so the next daemon must answer
exactly as the dead one would have.  The region bitmaps therefore *live* in a shared mapping
of a file under the run directory (``/run/dm-ulogd/logs``, tmpfs): every bit the state machine
flips is in the page cache the instant it is flipped, so a crash (even ``kill -9``) loses
nothing, while a reboot — which also resets the kernel's side — starts clean.

File layout (host byte order; the file never leaves this machine)::

    0      magic "ULOGDST1", layout version, header size (4096)
    ...    luid, region count and size, bitmap size, the :class:`~ulogd.regionlog.Scalars`,
           a save counter, the uuid and the constructor text (enough to rebuild the log)
    4096   clean bitmap (``bitmap_bytes``), then the sync bitmap, then this node's own marks
           (what its kernel was acknowledged and has not cleared: ``RegionLog.mine``; the
           kernel does not re-send MARKs to a restarted daemon)

Scalars are written with one ``pack_into`` by :meth:`LogState.save_scalars` before the reply
that depends on them.  A new file is built under a temporary name and renamed into place,
so a half-created file is never loaded; files are 0600 in a 0700 directory.  A file that does
not validate is renamed ``*.corrupt`` and reported, never half-used.  A destroyed log's file is
first marked :data:`DESTROYED` through its mapping, then unlinked: if the unlink fails (a
read-only directory) the mark keeps the next daemon from restoring it.

:class:`MemoryState` offers the same interface without a file, for replay and benchmarks.

Up to 0.1.0 the run directory was ``/run/ulogd``.  A daemon started under the new name while
mirrors are still loaded finds its ``logs`` directory missing (first start since boot) and
:func:`import_previous` copies the old directory's state files in, once: the upgrade is then
an ordinary restart.  The old directory is only read (the unit mounts it read-only).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import mmap
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

from bitarray import bitarray

from ulogd.regionlog import Scalars, padded_bits

log = logging.getLogger(__name__)

MAGIC = b"ULOGDST1"
LAYOUT_VERSION = 2  # 2: a third bitmap, this node's own marks (1 is still read)
HEADER_SIZE = 4096
# magic, layout version, header size, luid, region_count, region_size, bitmap_bytes
_FIXED = struct.Struct("=8sIIQQQQ")
# sync_search, recovering, recoverer, flags, saves
_SCALARS = struct.Struct("=QqiIQ")
_SCALARS_AT = _FIXED.size
_TEXT = struct.Struct("=H129sH336s")  # uuid length, uuid, ctr text length, ctr text
_TEXT_AT = _SCALARS_AT + _SCALARS.size

_FLAGS = ("resumed", "recovery_halted", "in_sync_override", "disk_loaded", "disk_failed")
#: in the flags word: the log's DTR was answered but its file could not be removed (a
#: tombstone, written through the mapping, which works when the directory is read-only);
#: such a file is never restored, only removed (see ``Server.restore``)
DESTROYED = 1 << 31
_FLAGS_AT = _SCALARS_AT + struct.calcsize("=Qqi")
_U32 = struct.Struct("=I")


class StateError(Exception):
    """A state file that cannot be used."""


def bitmap_bytes(region_count: int) -> int:
    return padded_bits(region_count) // 8


def _pack_flags(s: Scalars) -> int:
    """The flags in ``_FLAGS`` order, bit 0 first (unrolled: this runs before every reply that
    changed a scalar, and a generator over ``_FLAGS`` cost a microsecond)."""
    return (
        int(s.resumed)
        | s.recovery_halted << 1
        | s.in_sync_override << 2
        | s.disk_loaded << 3
        | s.disk_failed << 4
    )


@dataclass(frozen=True, slots=True)
class Identity:
    """What a state file says about the log it belongs to."""

    uuid: str
    luid: int
    region_count: int
    region_size: int
    ctr_text: str


class MemoryState:
    """Bitmaps in ordinary memory; nothing survives the process."""

    def __init__(self, region_count: int) -> None:
        bits = padded_bits(region_count)
        self.clean = bitarray(bits, endian="little")
        self.sync = bitarray(bits, endian="little")
        self.mine = bitarray(bits, endian="little")
        self.clean.setall(0)
        self.sync.setall(0)
        self.mine.setall(0)

    destroyed = False

    def save_scalars(self, scalars: Scalars) -> None:
        pass

    def mark_destroyed(self) -> None:
        pass

    def remove(self) -> None:
        pass

    def close(self) -> None:
        pass


class LogState:
    """One log's state file, mapped; ``clean`` and ``sync`` are views on the mapping."""

    def __init__(self, path: Path, fd: int, mapping: mmap.mmap, identity: Identity) -> None:
        self.path = path
        self.identity = identity
        self._fd = fd
        self._map = mapping
        self._view = memoryview(mapping)
        size = bitmap_bytes(identity.region_count)
        self.clean = bitarray(buffer=self._view[HEADER_SIZE : HEADER_SIZE + size], endian="little")
        self.sync = bitarray(
            buffer=self._view[HEADER_SIZE + size : HEADER_SIZE + 2 * size], endian="little"
        )
        if len(mapping) >= HEADER_SIZE + 3 * size:
            self.mine = bitarray(
                buffer=self._view[HEADER_SIZE + 2 * size : HEADER_SIZE + 3 * size],
                endian="little",
            )
        else:  # a layout-1 file (an older daemon's): no own marks were kept
            self.mine = bitarray(8 * size, endian="little")
            self.mine.setall(0)
        self._saves = 0

    def save_scalars(self, s: Scalars) -> None:
        self._saves = (self._saves + 1) & 0xFFFFFFFFFFFFFFFF  # a u64 in the file: wraps
        _SCALARS.pack_into(
            self._map,
            _SCALARS_AT,
            s.sync_search,
            s.recovering,
            s.recoverer,
            _pack_flags(s),
            self._saves,
        )

    def mark_destroyed(self) -> None:
        """Write the :data:`DESTROYED` tombstone into the mapped header (before a removal
        that may fail); no scalar is saved after it."""
        (flags,) = _U32.unpack_from(self._map, _FLAGS_AT)
        _U32.pack_into(self._map, _FLAGS_AT, flags | DESTROYED)

    @property
    def destroyed(self) -> bool:
        """The file carries the :data:`DESTROYED` tombstone."""
        return bool(_U32.unpack_from(self._map, _FLAGS_AT)[0] & DESTROYED)

    def load_scalars(self) -> Scalars:
        search, recovering, recoverer, flags, self._saves = _SCALARS.unpack_from(
            self._map, _SCALARS_AT
        )
        named = {name: bool(flags >> i & 1) for i, name in enumerate(_FLAGS)}
        return Scalars(sync_search=search, recovering=recovering, recoverer=recoverer, **named)

    def close(self) -> None:
        """Release the mapping (the file stays).  Bitarrays still held elsewhere keep the
        mapping alive until they are dropped; the descriptor is closed either way."""
        if self._fd < 0:
            return
        self._map.flush()
        os.close(self._fd)
        self._fd = -1
        del self.clean, self.sync, self.mine
        with contextlib.suppress(BufferError):
            self._view.release()
            self._map.close()

    def remove(self) -> None:
        self.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def _file_name(uuid: str, luid: int) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else f"%{ord(c):02x}" for c in uuid)
    if len(safe) > 200:
        safe = safe[:120] + "~" + safe.encode().hex()[-64:]
    return f"{safe}@{luid:016x}.state"


class StateDir:
    """The directory of state files (``<run dir>/logs``)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.path, 0o700)

    def create(
        self, uuid: str, luid: int, region_count: int, region_size: int, ctr_text: str
    ) -> LogState:
        identity = Identity(uuid, luid, region_count, region_size, ctr_text)
        final = self.path / _file_name(uuid, luid)
        tmp = final.with_name(final.name + ".new")
        size = bitmap_bytes(region_count)
        total = HEADER_SIZE + 3 * size
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, total)
            mapping = mmap.mmap(fd, total)
            _FIXED.pack_into(
                mapping, 0, MAGIC, LAYOUT_VERSION, HEADER_SIZE, luid, region_count, region_size,
                size,
            )  # fmt: skip
            u, t = uuid.encode(), ctr_text.encode()
            _TEXT.pack_into(mapping, _TEXT_AT, len(u), u, len(t), t)
            os.rename(tmp, final)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        return LogState(final, fd, mapping, identity)

    def load_all(self) -> list[LogState]:
        """Every valid state file; invalid ones are renamed ``*.corrupt`` and reported."""
        states: list[LogState] = []
        for leftover in self.path.glob("*.state.new"):
            leftover.unlink()
        for path in sorted(self.path.glob("*.state")):
            try:
                states.append(self._load(path))
            except (StateError, OSError, ValueError) as exc:
                log.error("state file %s is unusable (%s); moved aside as .corrupt", path, exc)
                with contextlib.suppress(OSError):
                    path.rename(path.with_suffix(".corrupt"))
        return states

    def _load(self, path: Path) -> LogState:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if st.st_size < HEADER_SIZE:
                raise StateError(f"{st.st_size} bytes is shorter than the header")
            mapping = mmap.mmap(fd, st.st_size)
            try:
                magic, version, header, luid, count, rsize, size = _FIXED.unpack_from(mapping, 0)
                if magic != MAGIC or version not in (1, LAYOUT_VERSION) or header != HEADER_SIZE:
                    raise StateError("bad magic or layout version")
                maps = 2 if version == 1 else 3
                if size != bitmap_bytes(count) or st.st_size != HEADER_SIZE + maps * size:
                    raise StateError("bitmap size disagrees with the region count")
                ulen, uuid, tlen, text = _TEXT.unpack_from(mapping, _TEXT_AT)
                if ulen > len(uuid) or tlen > len(text):
                    raise StateError("identity lengths out of range")
                identity = Identity(uuid[:ulen].decode(), luid, count, rsize, text[:tlen].decode())
            except BaseException:
                mapping.close()
                raise
        except BaseException:
            os.close(fd)
            raise
        return LogState(path, fd, mapping, identity)


def import_previous(old: Path, new: Path) -> int:
    """Copy the state files of ``old`` (``/run/ulogd/logs``, the run directory of the name
    used up to 0.1.0) into ``new`` (``<run dir>/logs``) if ``new`` has never existed; returns
    how many were copied (0: nothing to import, or ``new`` was already in use).

    Refuses (:class:`RuntimeError`) while a daemon holds the old run directory's lock: two
    daemons must never answer one kernel.  The copy is built under a temporary name and
    renamed into place, so a start that fails half-way imports again the next time.
    """
    if new.exists() or not old.is_dir():
        return 0
    files = sorted(old.glob("*.state"))
    if not files:
        return 0
    lock = old.parent / "ulogd.lock"
    with contextlib.suppress(FileNotFoundError):
        fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(
                f"a daemon still serves from {old.parent} (the run directory of ulogd's old "
                "name): stop it (systemctl stop ulogd.service) before starting this one"
            ) from None
        finally:
            os.close(fd)
    new.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    staging = new.with_name(new.name + ".import")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(mode=0o700)
    for path in files:
        target = staging / path.name
        shutil.copyfile(path, target)
        os.chmod(target, 0o600)
    os.chmod(staging, 0o700)
    os.rename(staging, new)
    return len(files)
