"""The datagram codec against bytes laid out by hand from the documented offsets."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ulogd.protocol import spec as p
from ulogd.protocol import wire
from ulogd.protocol.spec import RequestType as T

UUID = "LVM-0123456789abcdef0123456789abcdefABCDEFGHIJKLMNOPQRSTUVWXYZabcdef"


def golden_mark_region(seq: int, luid: int, regions: list[int]) -> bytes:
    """A MARK_REGION datagram written field by field at the offsets of the uapi header:
    nlmsghdr at 0, cn_msg at 16, dm_ulog_request at 36 (unaligned), payload at 196."""
    payload = b"".join(struct.pack("<Q", r) for r in regions)
    buf = bytearray(196 + len(payload))
    struct.pack_into("<I", buf, 0, len(buf))  # nlmsg_len
    struct.pack_into("<H", buf, 4, 3)  # NLMSG_DONE
    struct.pack_into("<I", buf, 8, seq)  # nlmsg_seq copies cn_msg.seq
    struct.pack_into("<II", buf, 16, 7, 1)  # cn_msg.id = (CN_IDX_DM, CN_VAL_DM_USERSPACE_LOG)
    struct.pack_into("<I", buf, 24, seq)  # cn_msg.seq
    struct.pack_into("<H", buf, 32, 160 + len(payload))  # cn_msg.len
    struct.pack_into("<Q", buf, 36, luid)
    buf[44 : 44 + len(UUID)] = UUID.encode()
    struct.pack_into("<I", buf, 176, 3)  # version
    struct.pack_into("<I", buf, 184, seq)  # seq
    struct.pack_into("<I", buf, 188, 10)  # DM_ULOG_MARK_REGION
    struct.pack_into("<I", buf, 192, len(payload))  # data_size
    buf[196:] = payload
    return bytes(buf)


def test_layout_sizes_match_the_headers() -> None:
    assert wire.CURRENT.request_size == 160
    assert wire.CURRENT.prefix_size == 36
    assert wire.CURRENT.offsets["seq"] == 184
    assert wire.CURRENT.offsets["luid"] == 36
    assert wire.LEGACY_2009.request_size == 152
    assert wire.LEGACY_2009.offsets["seq"] == 36 + 140


def test_golden_mark_region_decodes() -> None:
    datagram = golden_mark_region(seq=0x01020304, luid=0xFFFF888812345678, regions=[0, 7, 2**40])
    req = wire.decode(datagram)
    assert isinstance(req, wire.Request)
    assert req.request_type == T.MARK_REGION
    assert req.seq == 0x01020304
    assert req.luid == 0xFFFF888812345678
    assert req.uuid == UUID
    assert req.version == 3
    assert list(memoryview(req.data).cast("Q")) == [0, 7, 2**40]


def test_encoder_reproduces_the_golden_bytes() -> None:
    regions = [5, 6]
    data = b"".join(struct.pack("<Q", r) for r in regions)
    built = wire.encode_request(T.MARK_REGION, uuid=UUID, luid=42, seq=9, data=data)
    assert built == golden_mark_region(9, 42, regions)


def test_reply_keeps_the_header_and_sets_error_and_size() -> None:
    req = wire.decode(golden_mark_region(77, 1, [3]))
    assert isinstance(req, wire.Request)
    reply = wire.encode_reply(req, 0)
    assert len(reply) == 196
    assert struct.unpack_from("<I", reply, 0)[0] == 196
    assert struct.unpack_from("<H", reply, 32)[0] == 160
    assert struct.unpack_from("<iII", reply, 180) == (0, 77, 10)
    assert struct.unpack_from("<I", reply, 192)[0] == 0
    assert reply[36:180] == golden_mark_region(77, 1, [3])[36:180]


def test_error_reply_never_carries_payload() -> None:
    req = wire.decode(wire.encode_request(T.IN_SYNC, uuid="u", seq=1, data=bytes(8)))
    assert isinstance(req, wire.Request)
    rep = wire.decode_reply(wire.encode_reply(req, p.EINVAL, b"\1" * 8))
    assert (rep.error, rep.data) == (p.EINVAL, b"")


@pytest.mark.parametrize(("rtype", "capacity"), [(T.FLUSH, 0), (T.IN_SYNC, 8), (T.CTR, 128)])
def test_reply_larger_than_the_kernel_buffer_is_refused(rtype: int, capacity: int) -> None:
    data = bytes(8) if rtype == T.IN_SYNC else (b"1 core 2" if rtype == T.CTR else b"")
    req = wire.decode(wire.encode_request(rtype, uuid="u", seq=1, data=data))
    assert isinstance(req, wire.Request)
    wire.encode_reply(req, 0, bytes(capacity))
    with pytest.raises(ValueError, match="exceeds"):
        wire.encode_reply(req, 0, bytes(capacity + 1))


def test_request_type_is_masked() -> None:
    req = wire.decode(wire.encode_request(0xABCD00 | T.GET_SYNC_COUNT, uuid="u", seq=1))
    assert isinstance(req, wire.Request)
    assert req.request_type == T.GET_SYNC_COUNT


def test_unknown_type_gets_einval_reply() -> None:
    out = wire.decode(wire.encode_request(18, uuid="u", seq=5))
    assert isinstance(out, wire.Rejected) and out.reply is not None
    rep = wire.decode_reply(out.reply)
    assert (rep.seq, rep.error) == (5, p.EINVAL)


def test_unknown_version_gets_einval_reply_and_version_zero_is_v1() -> None:
    out = wire.decode(wire.encode_request(T.GET_SYNC_COUNT, uuid="u", seq=5, version=4))
    assert isinstance(out, wire.Rejected) and out.reply is not None
    assert wire.decode_reply(out.reply).error == p.EINVAL
    v0 = wire.decode(wire.encode_request(T.GET_SYNC_COUNT, uuid="u", seq=5, version=0))
    assert isinstance(v0, wire.Request) and v0.version == 1


def test_integrated_flush_needs_version_3() -> None:
    marks = struct.pack("=Q", 1)
    ok = wire.decode(wire.encode_request(T.FLUSH, uuid="u", seq=1, data=marks, version=3))
    assert isinstance(ok, wire.Request)
    old = wire.decode(wire.encode_request(T.FLUSH, uuid="u", seq=1, data=marks, version=2))
    assert isinstance(old, wire.Rejected) and "protocol 3" in old.reason


@pytest.mark.parametrize(
    ("rtype", "size"),
    [(T.IN_SYNC, 7), (T.IN_SYNC, 16), (T.MARK_REGION, 12), (T.SET_REGION_SYNC, 8),
     (T.GET_SYNC_COUNT, 8), (T.RESUME, 1)],
)  # fmt: skip
def test_wrong_payload_sizes_get_einval(rtype: int, size: int) -> None:
    out = wire.decode(wire.encode_request(rtype, uuid="u", seq=3, data=bytes(size)))
    assert isinstance(out, wire.Rejected) and out.reply is not None
    assert wire.decode_reply(out.reply) == wire.Reply(seq=3, error=p.EINVAL, data=b"")


def test_foreign_senders_are_dropped_without_reply() -> None:
    good = wire.encode_request(T.GET_SYNC_COUNT, uuid="u", seq=1)
    from_user = wire.decode(good, sender_port=4242)
    assert isinstance(from_user, wire.Rejected) and from_user.foreign and from_user.reply is None
    wrong_id = bytearray(good)
    struct.pack_into("=I", wrong_id, 16, 1)  # the proc connector
    out = wire.decode(bytes(wrong_id))
    assert isinstance(out, wire.Rejected) and out.foreign and out.reply is None
    claims_pid = bytearray(good)
    struct.pack_into("=I", claims_pid, 12, 999)
    out = wire.decode(bytes(claims_pid))
    assert isinstance(out, wire.Rejected) and out.reply is None


def test_lying_lengths_get_an_ack_error_when_the_seq_is_readable() -> None:
    good = bytearray(wire.encode_request(T.GET_SYNC_COUNT, uuid="u", seq=31))
    struct.pack_into("=H", good, 32, 400)  # cn_msg.len larger than the datagram
    out = wire.decode(bytes(good))
    assert isinstance(out, wire.Rejected) and out.reply is not None
    rep = wire.decode_reply(out.reply)
    assert rep.ack_only and rep.seq == 31 and rep.error == p.EINVAL
    short = wire.decode(bytes(good[:20]))
    assert isinstance(short, wire.Rejected) and short.reply is None


def test_a_connector_message_without_a_request_gets_an_ack_error() -> None:
    # cn_msg.len 0 and nlmsg_len 36: nothing of the request, but cn_msg.seq is readable
    empty = bytearray(wire.encode_request(T.GET_SYNC_COUNT, uuid="u", seq=32)[:36])
    struct.pack_into("=I", empty, 0, 36)
    struct.pack_into("=H", empty, 32, 0)
    out = wire.decode(bytes(empty))
    assert isinstance(out, wire.Rejected) and "len 0" in out.reason
    assert out.reply is not None
    rep = wire.decode_reply(out.reply)
    assert rep.ack_only and rep.seq == 32 and rep.error == p.EINVAL


def test_legacy_2009_layout_round_trip() -> None:
    lay = wire.LEGACY_2009
    datagram = wire.encode_request(T.IN_SYNC, uuid="old", seq=8, data=bytes(8), layout=lay)
    assert len(datagram) == 36 + 152 + 8
    req = wire.decode(datagram, lay)
    assert isinstance(req, wire.Request)
    assert (req.uuid, req.luid, req.version, req.seq) == ("old", 0, 1, 8)
    rep = wire.decode_reply(wire.encode_reply(req, 0, struct.pack("=q", 1)), lay)
    assert (rep.seq, rep.data) == (8, struct.pack("=q", 1))


@given(st.binary(max_size=600))
def test_decode_never_raises(data: bytes) -> None:
    out = wire.decode(data)
    assert isinstance(out, (wire.Request, wire.Rejected))


@given(st.integers(0, 700), st.binary(min_size=1, max_size=4), st.integers(0, 300))
def test_corrupted_valid_datagrams_never_raise(pos: int, junk: bytes, cut: int) -> None:
    base = bytearray(golden_mark_region(1, 2, list(range(8))))
    pos %= len(base)
    base[pos : pos + len(junk)] = junk
    out = wire.decode(bytes(base[: len(base) - cut % len(base)]))
    assert isinstance(out, (wire.Request, wire.Rejected))
