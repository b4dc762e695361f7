"""Snapshots of a log replica for members that join its group (pure).

Theory of operation
-------------------
A joiner must start from the state the group had *exactly* at the configuration change that
admitted it, including what cmirrord never transferred: every node's mark references (so a
joiner never cleans a region another node is writing), the recovery assignment and the
priority list, the nodes whose daemon is gone while their kernel may still write (orphans),
the disk-log bookkeeping, and the group's own bookkeeping (which members hold
state, which are still waiting for it, and since when).

:func:`snapshot` serialises all of that little-endian, compresses it (bitmaps of a healthy
mirror are long runs of ones and compress to almost nothing) and cuts it into chunks below
the group's atomic message size, so logs of 2^32 regions transfer without one giant message.
The whole snapshot carries a CRC-32 of its uncompressed bytes; :func:`restore` checks it and
the geometry before touching the replica, and raises :class:`CheckpointError` otherwise.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from bitarray import bitarray

from ulogd.state.regionlog import RegionLog, Snapshot, SnapshotError

_HEAD = struct.Struct("<4sIQQQqqIIIIIIIQI")
_MAGIC = b"UCK2"
_FLAG_DISK_FAILED = 1
_FLAG_FULL_WRITE = 2
_FLAG_OVERRIDE = 4


class CheckpointError(ValueError):
    """A snapshot that cannot be applied (corrupt, or for another geometry)."""


@dataclass(frozen=True, slots=True)
class GroupBook:
    """The group's own replicated bookkeeping, carried with the region state."""

    index: int  # delivery index of the configuration change the snapshot was taken at
    valid: tuple[tuple[int, int], ...]  # members (nodeid, pid) that hold state
    joiners: tuple[tuple[int, int, int], ...]  # (nodeid, pid, joined_at) still waiting


def snapshot(rl: RegionLog, book: GroupBook) -> bytes:
    """The replica and the group's bookkeeping as one compressed blob."""
    n = rl.region_count
    nbytes = (n + 7) // 8
    clean = rl.clean[:n].tobytes()[:nbytes]
    sync = rl.sync[:n].tobytes()[:nbytes]
    holders = b"".join(
        struct.pack(f"<QH{len(h)}I", r, len(h), *sorted(h)) for r, h in sorted(rl.holders.items())
    )
    priority = struct.pack(f"<{len(rl.priority)}Q", *rl.priority)
    dirty = sorted(rl.dirty_chunks)
    chunks = struct.pack(f"<{len(dirty)}I", *dirty)
    valid = b"".join(struct.pack("<II", *m) for m in book.valid)
    joiners = b"".join(struct.pack("<IIQ", *j) for j in book.joiners)
    orphans = struct.pack(f"<{len(rl.orphans)}I", *sorted(rl.orphans))
    flags = (
        (_FLAG_DISK_FAILED if rl.disk_failed else 0)
        | (_FLAG_FULL_WRITE if rl.full_write else 0)
        | (_FLAG_OVERRIDE if rl.in_sync_override else 0)
    )
    body = clean + sync + holders + priority + chunks + valid + joiners + orphans
    head = _HEAD.pack(
        _MAGIC, flags, n, rl.config.region_size, book.index, rl.sync_search, rl.recovering,
        rl.recoverer & 0xFFFFFFFF, len(rl.holders), len(rl.priority), len(dirty),
        len(book.valid), len(book.joiners), len(rl.orphans), len(body), zlib.crc32(body),
    )  # fmt: skip
    return zlib.compress(head + body, 1)


def split(blob: bytes, chunk_size: int) -> list[bytes]:
    return [blob[i : i + chunk_size] for i in range(0, len(blob), chunk_size)] or [b""]


def restore(rl: RegionLog, blob: bytes) -> GroupBook:
    """Overwrite the replica's shared state from a snapshot; returns the group bookkeeping."""
    try:
        raw = zlib.decompress(blob)
    except zlib.error as exc:
        raise CheckpointError(f"snapshot does not decompress: {exc}") from None
    if len(raw) < _HEAD.size:
        raise CheckpointError("snapshot shorter than its header")
    (magic, flags, n, region_size, index, search, recovering, recoverer, nholders, nprio,
     ndirty, nvalid, njoin, norphans, body_len, crc) = _HEAD.unpack_from(raw)  # fmt: skip
    body = raw[_HEAD.size :]
    if magic != _MAGIC or len(body) != body_len or zlib.crc32(body) != crc:
        raise CheckpointError("snapshot header or CRC mismatch")
    if (n, region_size) != (rl.region_count, rl.config.region_size):
        raise CheckpointError(
            f"snapshot is for {n} regions of {region_size} sectors, this log has "
            f"{rl.region_count} of {rl.config.region_size}: the mirror differs between nodes"
        )
    try:
        nbytes = (n + 7) // 8
        pos = 0
        clean = bitarray(endian="little")
        clean.frombytes(body[pos : pos + nbytes])
        pos += nbytes
        sync = bitarray(endian="little")
        sync.frombytes(body[pos : pos + nbytes])
        pos += nbytes
        holders: dict[int, set[int]] = {}
        for _ in range(nholders):
            region, count = struct.unpack_from("<QH", body, pos)
            pos += 10
            holders[region] = set(struct.unpack_from(f"<{count}I", body, pos))
            pos += 4 * count
        priority = list(struct.unpack_from(f"<{nprio}Q", body, pos))
        pos += 8 * nprio
        dirty = set(struct.unpack_from(f"<{ndirty}I", body, pos))
        pos += 4 * ndirty
        valid = tuple(struct.iter_unpack("<II", body[pos : pos + 8 * nvalid]))
        pos += 8 * nvalid
        joiners = tuple(struct.iter_unpack("<IIQ", body[pos : pos + 16 * njoin]))
        pos += 16 * njoin
        orphans = set(struct.unpack_from(f"<{norphans}I", body, pos))
        pos += 4 * norphans
    except struct.error as exc:
        raise CheckpointError(f"snapshot body truncated: {exc}") from None
    if pos != len(body):
        raise CheckpointError("snapshot body inconsistent")
    snapshot = Snapshot(
        clean=clean,
        sync=sync,
        holders=holders,
        orphans=orphans,
        priority=priority,
        dirty_chunks=dirty,
        sync_search=search,
        recovering=recovering,
        recoverer=recoverer if recoverer != 0xFFFFFFFF else -1,
        disk_failed=bool(flags & _FLAG_DISK_FAILED),
        full_write=bool(flags & _FLAG_FULL_WRITE),
        in_sync_override=bool(flags & _FLAG_OVERRIDE),
    )
    try:
        rl.load(snapshot)  # the rules of what a replica can be in are RegionLog's
    except SnapshotError as exc:
        raise CheckpointError(str(exc)) from None
    return GroupBook(index, valid, joiners)  # type: ignore[arg-type]
