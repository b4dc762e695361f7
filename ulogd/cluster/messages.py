"""Messages between the ulogd instances of one log's process group (pure codec).

Theory of operation
-------------------
Every message is a fixed 24-byte header followed by a typed body, all little-endian whatever
the host (mixed-endian clusters work; cmirrord sent host-order bitmaps)::

    0   u32  magic "ULGC"
    4   u16  protocol version (3)
    6   u16  message type
    8   u32  total size (header + body)
    12  u32  CRC-32 of the body
    16  u32  reserved (0)
    20  u32  CRC-32 of bytes 0..19

A receiver checks the magic, the version, the size against what was delivered, then both
CRCs, and only then decodes the body; anything wrong raises :class:`MessageError` naming the
problem, and the caller drops the message with a log line.  Bodies:

* ``OPS`` — a batch of one member's kernel requests, in the order its kernel sent them.  Each
  op is ``u8 kind, u8 flags, u16 count, u32 seq`` + ``count`` u64 values.  MARK and CLEAR ride
  in the batch of the next FLUSH (the kernel writes no data before FLUSH returns, so this costs
  nothing in safety and saves an ordered delivery per request).
* ``DISK_DONE`` — the disk server's word: every FLUSH delivered at or before ``index`` is on
  the log device (``error`` 0), or writing failed (``-EIO``: every member then reports ``D``).
* ``CHECKPOINT`` — one chunk of a state snapshot for members that joined at a configuration
  change: ``u64 point, u32 part, u32 parts`` + a target list + the chunk's bytes.
* ``MERGE`` — one chunk of a member's state when partitions merge (same body; the target list
  is the merge change's membership, the snapshot's book names the sender's side: who held
  state there and who did not).

* ``REJOIN`` and ``NODE_GONE`` ops (version 3) carry the live-kernel rules: a node's new
  daemon re-asserts what its kernel holds before anything else it sends, and a member that
  sees an orphan's node leave the ring says so in the total order (ring changes are local
  notifications, not ordered with messages, so every replica applies them at this message).

Version 3 added the ``REJOIN``/``NODE_GONE`` ops and the orphan list in snapshots; version 2
changed how merge contributions are combined (each node's marks come from its own
side, see :meth:`~ulogd.state.regionlog.RegionLog.merge_from`); members of both versions in one
group
would combine them differently, so a member drops the other version's messages.
"""

from __future__ import annotations

import enum
import struct
import zlib
from dataclasses import dataclass, field

MAGIC = 0x43474C55  # "ULGC" little-endian
VERSION = 3
_HEADER = struct.Struct("<IHHIIII")
HEADER_SIZE = _HEADER.size  # 24


class MessageError(ValueError):
    """A cluster message that must be dropped (corrupt, foreign, or of another version)."""


class Kind(enum.IntEnum):
    OPS = 1
    DISK_DONE = 2
    CHECKPOINT = 3
    MERGE = 4  # a member's contribution to a partition merge (checkpoint body, no targets)


class Op(enum.IntEnum):
    MARK = 1
    CLEAR = 2
    FLUSH = 3  # values: integrated marks; the originator answers its kernel at delivery
    RESYNC_WORK = 4
    SET_SYNC = 5  # values: region, in_sync
    REMOTE_RECOVERING = 6  # values: region
    REJOIN = 7  # seq: a RegionLog.Rejoin mode; values: the marks the sender's kernel holds
    NODE_GONE = 8  # values: a node seen leaving the ring while it held marks as an orphan


#: ops that carry a fixed number of values (the group indexes them without checking)
_ARITY = {Op.RESYNC_WORK: 0, Op.SET_SYNC: 2, Op.REMOTE_RECOVERING: 1, Op.NODE_GONE: 1}

_OP = struct.Struct("<BBHI")
_DONE = struct.Struct("<Qi")
_CKPT = struct.Struct("<QIIH")
_TARGET = struct.Struct("<IIQ")


@dataclass(frozen=True, slots=True)
class OpRecord:
    op: Op
    seq: int = 0
    values: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Ops:
    ops: tuple[OpRecord, ...]


@dataclass(frozen=True, slots=True)
class DiskDone:
    index: int
    error: int


@dataclass(frozen=True, slots=True)
class Target:
    """A member a checkpoint is for, and the delivery index of the change that admitted it."""

    nodeid: int
    pid: int
    joined_at: int


@dataclass(frozen=True, slots=True)
class CheckpointChunk:
    point: int  # delivery index of the configuration change the snapshot was taken at
    part: int
    parts: int
    targets: tuple[Target, ...]
    data: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class MergeChunk:
    """One chunk of a member's state at a merge change (``parts == 0``: it has no state)."""

    point: int  # the sender's own delivery index at the merge change
    part: int
    parts: int
    members: tuple[Target, ...]  # the merge change's membership: who must contribute
    data: bytes = field(repr=False)


Message = Ops | DiskDone | CheckpointChunk | MergeChunk


def _frame(kind: Kind, body: bytes) -> bytes:
    size = HEADER_SIZE + len(body)
    first = struct.pack("<IHHIII", MAGIC, VERSION, kind, size, zlib.crc32(body), 0)
    return first + struct.pack("<I", zlib.crc32(first)) + body


def encode_ops(ops: list[OpRecord] | tuple[OpRecord, ...]) -> bytes:
    parts = []
    for rec in ops:
        parts.append(_OP.pack(rec.op, 0, len(rec.values), rec.seq))
        parts.append(struct.pack(f"<{len(rec.values)}Q", *rec.values))
    return _frame(Kind.OPS, b"".join(parts))


def encode_disk_done(index: int, error: int) -> bytes:
    return _frame(Kind.DISK_DONE, _DONE.pack(index, error))


def encode_checkpoint(
    point: int, part: int, parts: int, targets: tuple[Target, ...], data: bytes
) -> bytes:
    head = _CKPT.pack(point, part, parts, len(targets))
    body = head + b"".join(_TARGET.pack(t.nodeid, t.pid, t.joined_at) for t in targets) + data
    return _frame(Kind.CHECKPOINT, body)


def encode_merge(
    point: int, part: int, parts: int, members: tuple[Target, ...], data: bytes
) -> bytes:
    head = _CKPT.pack(point, part, parts, len(members))
    body = head + b"".join(_TARGET.pack(t.nodeid, t.pid, t.joined_at) for t in members)
    return _frame(Kind.MERGE, body + data)


def decode(data: bytes) -> Message:
    """Check and decode one delivered message; raises :class:`MessageError`."""
    if len(data) < HEADER_SIZE:
        raise MessageError(f"{len(data)} bytes is shorter than the {HEADER_SIZE}-byte header")
    magic, version, kind, size, body_crc, _reserved, head_crc = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise MessageError(f"bad magic {magic:#010x} (not a ulogd message)")
    if zlib.crc32(data[:20]) != head_crc:
        raise MessageError("header CRC mismatch")
    if version != VERSION:
        raise MessageError(f"protocol version {version} (this ulogd speaks {VERSION})")
    if size != len(data):
        raise MessageError(f"header says {size} bytes, {len(data)} were delivered")
    body = data[HEADER_SIZE:]
    if zlib.crc32(body) != body_crc:
        raise MessageError("body CRC mismatch")
    try:
        if kind == Kind.OPS:
            return Ops(_decode_ops(body))
        if kind == Kind.DISK_DONE:
            if len(body) != _DONE.size:
                raise MessageError(f"DISK_DONE body of {len(body)} bytes")
            return DiskDone(*_DONE.unpack(body))
        if kind == Kind.CHECKPOINT:
            return _decode_checkpoint(body)
        if kind == Kind.MERGE:
            chunk = _decode_checkpoint(body, allow_empty=True, what="merge")
            return MergeChunk(chunk.point, chunk.part, chunk.parts, chunk.targets, chunk.data)
    except struct.error as exc:
        raise MessageError(f"truncated {Kind(kind).name} body: {exc}") from None
    raise MessageError(f"unknown message type {kind}")


def _decode_ops(body: bytes) -> tuple[OpRecord, ...]:
    ops = []
    pos = 0
    while pos < len(body):
        kind, _flags, count, seq = _OP.unpack_from(body, pos)
        pos += _OP.size
        if pos + 8 * count > len(body):
            raise MessageError(f"op {kind} claims {count} values past the end of the body")
        try:
            op = Op(kind)
        except ValueError:
            raise MessageError(f"unknown op {kind}") from None
        if op is Op.REJOIN and seq not in (0, 1, 2):
            raise MessageError(f"REJOIN with mode {seq}")
        if _ARITY.get(op, count) != count:
            raise MessageError(f"op {op.name} with {count} values (expects {_ARITY[op]})")
        values = struct.unpack_from(f"<{count}Q", body, pos)
        pos += 8 * count
        ops.append(OpRecord(op, seq, values))
    return tuple(ops)


def _decode_checkpoint(
    body: bytes, allow_empty: bool = False, what: str = "checkpoint"
) -> CheckpointChunk:
    point, part, parts, ntargets = _CKPT.unpack_from(body)
    pos = _CKPT.size
    targets = []
    for _ in range(ntargets):
        targets.append(Target(*_TARGET.unpack_from(body, pos)))
        pos += _TARGET.size
    if not 0 <= part < parts and not (allow_empty and parts == 0 and part == 0):
        raise MessageError(f"{what} part {part} of {parts}")
    return CheckpointChunk(point, part, parts, tuple(targets), bytes(body[pos:]))
