"""Cluster message codec: round trips, every way a message can be wrong, fuzzing, fixed
little-endian layout."""

from __future__ import annotations

import contextlib
import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ulogd.cluster import messages as m

OPS = (
    m.OpRecord(m.Op.MARK, 7, (1, 2, 3)),
    m.OpRecord(m.Op.CLEAR, 8, (2**64 - 1,)),
    m.OpRecord(m.Op.FLUSH, 9, ()),
    m.OpRecord(m.Op.RESYNC_WORK, 10),
    m.OpRecord(m.Op.SET_SYNC, 11, (5, 1)),
    m.OpRecord(m.Op.REMOTE_RECOVERING, 2**32 - 1, (9,)),
)
TARGETS = (m.Target(1, 100, 0), m.Target(2**32 - 1, 7, 2**64 - 1))


def samples() -> list[bytes]:
    return [
        m.encode_ops(OPS),
        m.encode_ops([]),
        m.encode_disk_done(12, 0),
        m.encode_disk_done(2**64 - 1, -5),
        m.encode_checkpoint(4, 1, 3, TARGETS, b"chunk bytes"),
        m.encode_checkpoint(0, 0, 1, (), b""),
        m.encode_merge(3, 0, 2, TARGETS, b"state"),
        m.encode_merge(0, 0, 0, TARGETS, b""),
    ]


def test_round_trips() -> None:
    assert m.decode(m.encode_ops(OPS)) == m.Ops(OPS)
    assert m.decode(m.encode_ops([])) == m.Ops(())
    assert m.decode(m.encode_disk_done(12, -5)) == m.DiskDone(12, -5)
    ck = m.decode(m.encode_checkpoint(4, 1, 3, TARGETS, b"chunk bytes"))
    assert ck == m.CheckpointChunk(4, 1, 3, TARGETS, b"chunk bytes")
    assert ck.data == b"chunk bytes"  # not part of ==/repr
    mg = m.decode(m.encode_merge(3, 1, 2, TARGETS, b"state"))
    assert mg == m.MergeChunk(3, 1, 2, TARGETS, b"state") and mg.data == b"state"


@given(
    st.lists(
        st.tuples(
            st.sampled_from(list(m.Op)),
            st.integers(0, 2**32 - 1),
            st.lists(st.integers(0, 2**64 - 1), max_size=20),
        ),
        max_size=20,
    )
)
def test_ops_round_trip_property(ops: list[tuple[m.Op, int, list[int]]]) -> None:
    arity = {m.Op.RESYNC_WORK: 0, m.Op.SET_SYNC: 2, m.Op.REMOTE_RECOVERING: 1, m.Op.NODE_GONE: 1}
    recs = tuple(
        m.OpRecord(
            op,
            seq % 3 if op is m.Op.REJOIN else seq,
            tuple([*v, 0, 0][: arity[op]] if op in arity else v),
        )
        for op, seq, v in ops
    )
    assert m.decode(m.encode_ops(recs)) == m.Ops(recs)


def test_rejoin_with_an_unknown_mode_is_dropped() -> None:
    data = m.encode_ops([m.OpRecord(m.Op.REJOIN, 3, (1,))])
    with pytest.raises(m.MessageError, match="REJOIN"):
        m.decode(data)


def test_little_endian_layout_at_fixed_offsets() -> None:
    """Field positions do not depend on the host: read them back at fixed offsets as
    little-endian, whatever this host's order."""
    data = m.encode_ops([m.OpRecord(m.Op.MARK, 0x01020304, (0x1122334455667788,))])
    assert data[0:4] == b"ULGC"
    assert data[4:6] == b"\x03\x00"  # version 3
    assert data[6:8] == b"\x01\x00"  # OPS
    assert int.from_bytes(data[8:12], "little") == len(data) == 24 + 8 + 8
    assert int.from_bytes(data[12:16], "little") == zlib.crc32(data[24:])
    assert data[16:20] == b"\0\0\0\0"
    assert int.from_bytes(data[20:24], "little") == zlib.crc32(data[:20])
    assert data[24] == m.Op.MARK and data[25] == 0
    assert data[26:28] == b"\x01\x00"  # one value
    assert data[28:32] == bytes([4, 3, 2, 1])  # seq, little-endian
    assert data[32:40] == bytes([0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11])
    done = m.encode_disk_done(0x0102, -5)
    assert done[24:32] == b"\x02\x01" + b"\0" * 6
    assert done[32:36] == struct.pack("<i", -5) == b"\xfb\xff\xff\xff"
    ck = m.encode_checkpoint(0x0A, 1, 2, (m.Target(3, 0x0405, 6),), b"Z")
    body = ck[24:]
    assert body[:8] == b"\x0a" + b"\0" * 7 and body[8:12] == b"\x01\0\0\0"
    assert body[12:16] == b"\x02\0\0\0" and body[16:18] == b"\x01\0"
    assert body[18:22] == b"\x03\0\0\0" and body[22:26] == b"\x05\x04\0\0"
    assert body[26:34] == b"\x06" + b"\0" * 7 and body[34:] == b"Z"


def reframe(data: bytes, **changes: int) -> bytes:
    """Rewrite header fields and recompute both CRCs (so only the named change is wrong)."""
    magic, version, kind, size, _bcrc, res, _hcrc = struct.unpack_from("<IHHIIII", data)
    f = {"magic": magic, "version": version, "kind": kind, "size": size, "res": res}
    f.update(changes)
    body = data[24:]
    first = struct.pack(
        "<IHHIII", f["magic"], f["version"], f["kind"], f["size"], zlib.crc32(body), f["res"]
    )
    return first + struct.pack("<I", zlib.crc32(first)) + body


@pytest.mark.parametrize(
    ("mutate", "words"),
    [
        (lambda d: d[:10], "shorter than"),
        (lambda d: b"XXXX" + d[4:], "bad magic"),
        (lambda d: d[:20] + bytes([d[20] ^ 1]) + d[21:], "header CRC"),
        (lambda d: d[:5] + b"\x07" + d[6:], "header CRC"),  # any header bit
        (lambda d: d[:-1] + bytes([d[-1] ^ 0x80]), "body CRC"),
        (lambda d: reframe(d, version=2), "protocol version 2"),
        (lambda d: reframe(d, version=4), "protocol version 4"),
        (lambda d: reframe(d, size=len(d) + 1), "header says"),
        (lambda d: d[:-8], "header says"),  # truncated in transit
        (lambda d: reframe(d, kind=9), "unknown message type 9"),
    ],
)
def test_bad_messages_raise_message_error(mutate: object, words: str) -> None:
    data = m.encode_ops(OPS)
    with pytest.raises(m.MessageError, match=words):
        m.decode(mutate(data))  # type: ignore[operator]


def _frame(kind: m.Kind, body: bytes) -> bytes:
    return m._frame(kind, body)


@pytest.mark.parametrize(
    ("kind", "body", "words"),
    [
        (m.Kind.OPS, struct.pack("<BBHI", 99, 0, 0, 1), "unknown op 99"),
        (m.Kind.OPS, struct.pack("<BBHI", 1, 0, 5, 1) + b"\0" * 8, "past the end"),
        (m.Kind.OPS, b"\x01\x00", "truncated OPS"),
        (m.Kind.DISK_DONE, b"\0" * 11, "DISK_DONE body of 11"),
        (m.Kind.CHECKPOINT, struct.pack("<QIIH", 1, 3, 3, 0), "part 3 of 3"),
        (m.Kind.CHECKPOINT, struct.pack("<QIIH", 1, 0, 1, 2) + b"\0" * 16, "truncated"),
        (m.Kind.CHECKPOINT, b"\0" * 5, "truncated"),
        (m.Kind.MERGE, struct.pack("<QIIH", 1, 2, 2, 0), "merge part 2 of 2"),
    ],
)
def test_bad_bodies_with_valid_frames(kind: m.Kind, body: bytes, words: str) -> None:
    with pytest.raises(m.MessageError, match=words):
        m.decode(_frame(kind, body))


@settings(max_examples=800)
@given(st.binary(max_size=200))
def test_fuzz_random_bytes_raise_only_message_error(data: bytes) -> None:
    with contextlib.suppress(m.MessageError):
        m.decode(data)


@settings(max_examples=1000)
@given(st.sampled_from(samples()), st.data())
def test_fuzz_bit_flips_and_cuts_of_valid_messages(data: bytes, draw: st.DataObject) -> None:
    buf = bytearray(data)
    for pos in draw.draw(st.lists(st.integers(0, len(buf) * 8 - 1), min_size=1, max_size=4)):
        buf[pos // 8] ^= 1 << (pos % 8)
    cut = draw.draw(st.integers(0, len(buf)))
    for candidate in (bytes(buf), bytes(buf[:cut])):
        with contextlib.suppress(m.MessageError):
            m.decode(candidate)


@settings(max_examples=800)
@given(st.sampled_from(list(m.Kind)), st.binary(max_size=120))
def test_fuzz_bodies_behind_valid_frames(kind: m.Kind, body: bytes) -> None:
    """Past the CRCs (a buggy or hostile sender): still only MessageError."""
    with contextlib.suppress(m.MessageError):
        m.decode(_frame(kind, body))
