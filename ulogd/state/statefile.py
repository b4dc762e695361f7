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

File layout 3 (host byte order; the file never leaves this machine)::

    0      magic "ULOGDST1", layout version, header size (4096)
    ...    luid, region count and size, bitmap size, the :class:`~ulogd.state.regionlog.Scalars`,
           a save counter
    1024   the uuid (as ulogd names it: up to 4 x 129 characters, every byte the kernel may
           send escaped) and the constructor text (enough to rebuild the log)
    4096   clean bitmap (``bitmap_bytes``), then the sync bitmap, then this node's own marks
           (what its kernel was acknowledged and has not cleared: ``RegionLog.mine``; the
           kernel does not re-send MARKs to a restarted daemon)

A file is named after a hash of its log's whole identity (uuid and luid, see
:func:`file_name`), and the identity inside must hash to the name: two logs never share a file.
Files of layouts 1 and 2 (uuid at offset 80, at most 129 bytes, named after the uuid's text)
are copied into layout-3 files at restore and then removed (a crash in between leaves the old
file, which is copied again, or both, and the new one wins).

Space: the whole file is reserved (``posix_fallocate``) before it is mapped or renamed into
place, so a full run directory fails the CTR that does not fit with ``ENOSPC`` and never
leaves a mapping that a store could fault on (SIGBUS).  A file whose blocks are not all
allocated (an older daemon's sparse file) is allocated at restore before it is mapped; when
that cannot be done it is set aside as ``*.unbacked`` and reported.

Scalars are written with one ``pack_into`` by :meth:`LogState.save_scalars` before the reply
that depends on them.  A new file is built under a temporary name and renamed into place,
so a half-created file is never loaded; files are 0600 in a 0700 directory.  A file whose
*contents* do not validate (header, identity, constructor text, scalars out of range for its
geometry) is renamed ``*.corrupt`` and reported, never half-used.  A *resource* error while
restoring (``EMFILE``, ``ENOMEM``, ``EIO``, ...) renames nothing: :meth:`StateDir.load_all`
raises :class:`RestoreError`, so the daemon's start fails with one clear line and the next
start (systemd restarts it) finds every file as it was.  A destroyed log's file is first
marked :data:`DESTROYED` through its mapping, then unlinked: if the unlink fails (a read-only
directory) the mark keeps the next daemon from restoring it.

The mapping keeps its own descriptor (``mmap`` duplicates it); the one used to build or open
the file is closed at once, so each log costs one descriptor.

:class:`MemoryState` offers the same interface without a file, for replay and benchmarks.

Up to 0.1.0 the run directory was ``/run/ulogd``.  A daemon started under the new name while
mirrors are still loaded finds its ``logs`` directory missing (first start since boot) and
:func:`import_previous` copies the old directory's state files in, once (they migrate like any
older layout): the upgrade is then an ordinary restart.  The old directory is only read.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import mmap
import os
import re
import shutil
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from bitarray import bitarray

from ulogd.protocol import ctr
from ulogd.protocol import spec as p
from ulogd.state.regionlog import Scalars, padded_bits, scalars_problem

log = logging.getLogger(__name__)

MAGIC = b"ULOGDST1"
LAYOUT_VERSION = 3  # 3: named by a hash of the identity, uuid of any bytes; 1 and 2 migrate
HEADER_SIZE = 4096
# magic, layout version, header size, luid, region_count, region_size, bitmap_bytes
_FIXED = struct.Struct("=8sIIQQQQ")
# sync_search, recovering, recoverer, flags, saves
_SCALARS = struct.Struct("=QqiIQ")
_SCALARS_AT = _FIXED.size
#: the longest uuid text: every one of the kernel's DM_UUID_LEN bytes escaped as ``\xNN``
UUID_TEXT_MAX = 4 * p.DM_UUID_LEN
CTR_TEXT_MAX = 2048
_TEXT = struct.Struct(f"=H{UUID_TEXT_MAX}sH{CTR_TEXT_MAX}s")  # uuid, constructor text
_TEXT_AT = 1024
_OLD_TEXT = struct.Struct("=H129sH336s")  # layouts 1 and 2
_OLD_TEXT_AT = _SCALARS_AT + _SCALARS.size

_FLAGS = ("resumed", "recovery_halted", "in_sync_override", "disk_loaded", "disk_failed")
#: in the flags word: the log's DTR was answered but its file could not be removed (a
#: tombstone, written through the mapping, which works when the directory is read-only);
#: such a file is never restored, only removed (see ``Server.restore``)
DESTROYED = 1 << 31
_FLAGS_AT = _SCALARS_AT + struct.calcsize("=Qqi")
_U32 = struct.Struct("=I")
_FILL = b"\xff" * (1 << 20)


class StateError(Exception):
    """A state file whose contents cannot be used."""


class RestoreError(Exception):
    """A state file could not be read for lack of a resource (nothing was renamed)."""


def bitmap_bytes(region_count: int) -> int:
    return padded_bits(region_count) // 8


def file_size(region_count: int) -> int:
    """Bytes of a layout-3 state file (what a CTR reserves in the run directory)."""
    return HEADER_SIZE + 3 * bitmap_bytes(region_count)


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


def file_name(uuid: str, luid: int) -> str:
    """``<uuid tail>.<hash of uuid and luid>.state``: the tail is for the operator's eye, the
    hash (BLAKE2b over the luid's 8 bytes and the whole uuid) is what tells logs apart."""
    raw = luid.to_bytes(8, "little") + uuid.encode("utf-8", "surrogateescape")
    digest = hashlib.blake2b(raw, digest_size=16, person=b"ulogd-state").hexdigest()
    tail = re.sub(r"[^A-Za-z0-9_-]", "", uuid)[-12:] or "log"
    return f"{tail}.{digest}.state"


def _encode_uuid(uuid: str) -> bytes:
    return uuid.encode("utf-8", "surrogateescape")


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

    def __init__(self, path: Path, mapping: mmap.mmap, identity: Identity) -> None:
        self.path = path
        self.identity = identity
        self._map = mapping
        self._open = True
        self._view = memoryview(mapping)
        size = bitmap_bytes(identity.region_count)
        self.clean = bitarray(buffer=self._view[HEADER_SIZE : HEADER_SIZE + size], endian="little")
        self.sync = bitarray(
            buffer=self._view[HEADER_SIZE + size : HEADER_SIZE + 2 * size], endian="little"
        )
        self.mine = bitarray(
            buffer=self._view[HEADER_SIZE + 2 * size : HEADER_SIZE + 3 * size], endian="little"
        )
        self._saves = 0

    @property
    def size(self) -> int:
        return len(self._map)

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
        scalars, self._saves = _unpack_scalars(self._map)
        return scalars

    def census(self) -> tuple[int, list[int]]:
        """The number of sync bits and the regions in the own-marks bitmap, read from the
        file in 4 MiB slices: meant to run in a worker thread (``preadv`` releases the
        interpreter lock; each slice's count holds it for about a millisecond).  Reading,
        not a second mapping: pre-faulting one holds the process's memory-map lock, which
        stalls every other thread that allocates."""
        n = self.identity.region_count
        size = bitmap_bytes(n)
        step = 1 << 22  # bytes per slice
        buffer = bytearray(step)
        count = 0
        marks: list[int] = []
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            for base, want_marks in ((HEADER_SIZE + size, False), (HEADER_SIZE + 2 * size, True)):
                for at in range(0, size, step):
                    got = os.preadv(fd, [memoryview(buffer)[: min(step, size - at)]], base + at)
                    bits = bitarray(endian="little", buffer=memoryview(buffer)[:got])
                    stop = min(len(bits), n - 8 * at)
                    if want_marks:
                        marks += (8 * at + r for r in bits.search(1, 0, stop))
                    else:
                        count += bits.count(1, 0, stop)
                    del bits
        finally:
            os.close(fd)
        return count, marks

    def close(self) -> None:
        """Release the mapping (the file stays).  Bitarrays still held elsewhere keep the
        mapping alive until they are dropped."""
        if not self._open:
            return
        self._open = False
        self._map.flush()
        del self.clean, self.sync, self.mine
        with contextlib.suppress(BufferError):
            self._view.release()
            self._map.close()

    def remove(self) -> None:
        self.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def _unpack_scalars(buffer: mmap.mmap | bytes) -> tuple[Scalars, int]:
    search, recovering, recoverer, flags, saves = _SCALARS.unpack_from(buffer, _SCALARS_AT)
    if (flags & ~DESTROYED) >> len(_FLAGS):  # (a tombstoned file is removed, not restored)
        raise StateError(f"unknown flag bits {flags:#x}")
    named = {name: bool(flags >> i & 1) for i, name in enumerate(_FLAGS)}
    scalars = Scalars(sync_search=search, recovering=recovering, recoverer=recoverer, **named)
    return scalars, saves


def _fill_ones(fd: int, offset: int, bits: int) -> None:
    """Set the first ``bits`` bits at ``offset`` with ``pwrite`` (the interpreter lock is
    released while the kernel copies, so this may run beside the event loop)."""
    end = offset + bits // 8
    while offset < end:
        offset += os.pwrite(fd, memoryview(_FILL)[: min(len(_FILL), end - offset)], offset)
    if bits % 8:
        os.pwrite(fd, bytes([(1 << bits % 8) - 1]), offset)


def _map(fd: int, size: int) -> mmap.mmap:
    """A shared mapping, not pre-faulted: MAP_POPULATE of a huge file holds the process's
    memory-map lock for its whole length (every other thread that allocates waits)."""
    return mmap.mmap(fd, size)


class StateDir:
    """The directory of state files (``<run dir>/logs``)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.path, 0o700)

    def create(
        self,
        uuid: str,
        luid: int,
        region_count: int,
        region_size: int,
        ctr_text: str,
        fill: int = 0,
    ) -> LogState:
        """A new log's file with every clean and sync bit set to ``fill`` and no own marks.

        Raises ``OSError`` (``ENOSPC`` when the run directory cannot hold it, ``EMFILE``...)
        or :class:`StateError` (an identity too long to record); nothing is left behind."""
        identity = Identity(uuid, luid, region_count, region_size, ctr_text)
        u, t = _encode_uuid(uuid), ctr_text.encode()
        if len(u) > UUID_TEXT_MAX or len(t) > CTR_TEXT_MAX:
            raise StateError(f"uuid or constructor text too long ({len(u)}, {len(t)} bytes)")
        final = self.path / file_name(uuid, luid)
        tmp = final.with_name(final.name + ".new")
        size = bitmap_bytes(region_count)
        total = HEADER_SIZE + 3 * size
        header = bytearray(HEADER_SIZE)
        _FIXED.pack_into(
            header, 0, MAGIC, LAYOUT_VERSION, HEADER_SIZE, luid, region_count, region_size, size
        )
        _TEXT.pack_into(header, _TEXT_AT, len(u), u, len(t), t)
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.posix_fallocate(fd, 0, total)  # ENOSPC here, not SIGBUS at a later store
            os.pwrite(fd, header, 0)
            if fill:
                _fill_ones(fd, HEADER_SIZE, region_count)
                _fill_ones(fd, HEADER_SIZE + size, region_count)
            mapping = _map(fd, total)
            os.rename(tmp, final)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        finally:
            os.close(fd)  # the mapping holds its own descriptor
        return LogState(final, mapping, identity)

    def load_all(self) -> list[LogState]:
        """Every valid state file; those whose contents are invalid are renamed ``*.corrupt``
        and reported.  Raises :class:`RestoreError` (after closing what it opened) when a
        resource runs out: no file is renamed for that."""
        states: list[LogState] = []
        try:
            for leftover in self.path.glob("*.state.new"):
                leftover.unlink()
            for path in sorted(self.path.glob("*.state")):
                state = self._load_one(path)
                if state is not None:
                    states.append(state)
        except OSError as exc:
            for state in states:
                state.close()
            where = f"{exc.filename}: " if exc.filename and exc.filename != str(self.path) else ""
            raise RestoreError(
                f"cannot restore the logs in {self.path}: {where}{exc.strerror or exc} "
                f"(errno {exc.errno}); no state file was changed, start again once the "
                "resource is available"
            ) from exc
        return states

    def _load_one(self, path: Path) -> LogState | None:
        """The log in ``path``; None when it was set aside (or migrated into a file that was
        loaded already).  ``OSError`` means a resource error: nothing was renamed."""
        try:
            info = path.lstat()
        except FileNotFoundError:
            return None  # gone since the directory was listed
        if not stat.S_ISREG(info.st_mode):
            self.set_aside(path, "not a regular file")
            return None
        try:
            return self._load(path)
        except (StateError, ValueError) as exc:
            self.set_aside(path, str(exc))
            return None
        except _Unbacked as exc:
            log.error(
                "state file %s is not completely allocated and the run directory cannot "
                "back it (%s): moved aside as .unbacked, not mapped",
                path,
                exc.cause,
            )
            with contextlib.suppress(OSError):
                path.rename(path.with_suffix(".unbacked"))
            return None

    def set_aside(self, path: Path, reason: str) -> None:
        """A file whose contents are wrong: renamed ``*.corrupt``, one line says why."""
        log.error("state file %s is unusable (%s); moved aside as .corrupt", path, reason)
        with contextlib.suppress(OSError):
            path.rename(path.with_suffix(".corrupt"))

    def _load(self, path: Path) -> LogState | None:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            st = os.fstat(fd)
            head = os.pread(fd, HEADER_SIZE, 0)
            if len(head) < HEADER_SIZE:
                raise StateError(f"{st.st_size} bytes is shorter than the header")
            identity, version = _parse_header(head, st.st_size)
            if version < LAYOUT_VERSION:
                os.close(fd)
                fd = -1
                return self._migrate(path, head, identity, version)
            if path.name != file_name(identity.uuid, identity.luid):
                raise StateError("its name is not that of the identity it holds")
            if st.st_blocks * 512 < st.st_size:
                _allocate(fd, st.st_size)
            # Not pre-faulted: a huge log is counted off the event loop (see census()).
            mapping = mmap.mmap(fd, st.st_size)
        finally:
            if fd >= 0:
                os.close(fd)
        return LogState(path, mapping, identity)

    def _migrate(self, old: Path, head: bytes, identity: Identity, version: int) -> LogState | None:
        """Copy a layout-1/2 file into a layout-3 file (renamed into place complete), then
        remove the old one.  Returns the new file's state, or None when a layout-3 file of
        the same log exists already (an interrupted migration): it is the newer."""
        final = self.path / file_name(identity.uuid, identity.luid)
        if final == old:
            raise StateError(f"a layout-{version} file under a layout-{LAYOUT_VERSION} name")
        if final.exists():
            log.info("state file %s: already migrated to %s; removing it", old, final.name)
            old.unlink()
            return None
        n = identity.region_count
        size = bitmap_bytes(n)
        maps = 2 if version == 1 else 3
        with open(old, "rb") as src:
            try:
                state = self.create(identity.uuid, identity.luid, n, identity.region_size,
                                    identity.ctr_text)  # fmt: skip
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise _Unbacked(exc) from exc
                raise
            try:
                for i in range(maps):
                    data = os.pread(src.fileno(), size, HEADER_SIZE + i * size)
                    if len(data) != size:
                        raise StateError("shorter than its layout says")
                    state._view[HEADER_SIZE + i * size : HEADER_SIZE + (i + 1) * size] = data
                scalars, _saves = _unpack_scalars(head)
                state.save_scalars(scalars)
            except BaseException:
                state.remove()
                raise
        old.unlink()
        log.info(
            "state file %s (layout %d) migrated to %s (layout %d)",
            old.name, version, state.path.name, LAYOUT_VERSION,
        )  # fmt: skip
        return state


class _Unbacked(Exception):
    def __init__(self, cause: OSError) -> None:
        super().__init__(str(cause))
        self.cause = cause


def _allocate(fd: int, size: int) -> None:
    """Allocate the holes of a sparse file before it is mapped (a store into a hole that the
    file system cannot back is a SIGBUS)."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _Unbacked(exc) from exc
        raise


def _parse_header(head: bytes, file_bytes: int) -> tuple[Identity, int]:
    """The identity in a state file's header, and its layout version; :class:`StateError`
    (or ``ValueError``) when anything in it is wrong for a log."""
    magic, version, header, luid, count, rsize, size = _FIXED.unpack_from(head, 0)
    if magic != MAGIC or version not in (1, 2, LAYOUT_VERSION) or header != HEADER_SIZE:
        raise StateError("bad magic or layout version")
    maps = 2 if version == 1 else 3
    if count < 1 or size != bitmap_bytes(count) or file_bytes != HEADER_SIZE + maps * size:
        raise StateError("bitmap size disagrees with the region count or the file size")
    layout, at = (_TEXT, _TEXT_AT) if version == LAYOUT_VERSION else (_OLD_TEXT, _OLD_TEXT_AT)
    ulen, uuid_raw, tlen, text_raw = layout.unpack_from(head, at)
    if ulen > len(uuid_raw) or tlen > len(text_raw) or ulen == 0:
        raise StateError("identity lengths out of range")
    uuid = uuid_raw[:ulen].decode("utf-8", "surrogateescape")
    text = text_raw[:tlen].decode()
    try:
        config = ctr.parse(text.encode())
    except ctr.CtrError as exc:
        raise StateError(f"constructor text {text!r}: {exc}") from None
    if (config.region_count, config.region_size) != (count, rsize):
        raise StateError(f"constructor text {text!r} is not for {count} regions of {rsize}")
    scalars, _saves = _unpack_scalars(head)
    if problem := scalars_problem(count, scalars):
        raise StateError(problem)
    return Identity(uuid, luid, count, rsize, text), version


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
