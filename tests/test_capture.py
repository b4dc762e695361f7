"""Tests for ulogd.edges.capture: pcapng writing, pcap/pcapng reading, robustness, tshark."""

from __future__ import annotations

import io
import logging
import os
import shutil
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.harness import apt
from ulogd import __version__
from ulogd.edges.capture import (
    ARPHRD_NETLINK,
    LINKTYPE_NETLINK,
    NETLINK_CONNECTOR,
    CaptureFormatError,
    CaptureWriter,
    Direction,
    Packet,
)
from ulogd.edges.capture_reader import read_capture

NATIVE = "<" if struct.pack("=H", 1) == b"\x01\x00" else ">"
T0 = 1_700_000_000_123_456_789


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def datagram(seq: int, request_type: int, payload: bytes = b"") -> bytes:
    """nlmsghdr + cn_msg + dm_ulog_request (160 bytes) + payload, host byte order."""
    req = struct.pack(
        "=Q129s3xIiIII", 0x1234, b"LVM-test-uuid", 3, 0, seq, request_type, len(payload)
    )
    assert len(req) == 160
    req += payload
    cn = struct.pack("=IIIIHH", 7, 1, seq, 0, len(req), 0) + req  # CN_IDX_DM, CN_VAL_DM_...LOG
    return struct.pack("=IHHII", 16 + len(cn), 3, 0, seq, 0) + cn


def sample(n: int) -> list[Packet]:
    out = []
    for i in range(n):
        direction = Direction.TO_DAEMON if i % 2 == 0 else Direction.FROM_DAEMON
        payload = bytes(range(i % 7))  # lengths 0..6 exercise every padding case
        out.append(Packet(i + 1, T0 + i * 1_000_003, direction, datagram(i // 2, 5, payload)))
    return out


def write_sample(target, packets: list[Packet], **kwargs) -> None:
    with CaptureWriter(target, **kwargs) as w:
        for p in packets:
            w.record(p.direction, p.data, p.timestamp_ns)


def pseudo(pkttype: int, family: int = NETLINK_CONNECTOR, hatype: int = ARPHRD_NETLINK) -> bytes:
    return struct.pack(">HHH8sH", pkttype, hatype, 0, b"", family)


def pad(b: bytes) -> bytes:
    return b + b"\0" * (-len(b) % 4)


def ng_block(bo: str, btype: int, body: bytes) -> bytes:
    body = pad(body)
    total = 12 + len(body)
    return struct.pack(bo + "II", btype, total) + body + struct.pack(bo + "I", total)


def ng_opt(bo: str, code: int, value: bytes) -> bytes:
    return struct.pack(bo + "HH", code, len(value)) + pad(value)


def ng_shb(bo: str) -> bytes:
    return ng_block(bo, 0x0A0D0D0A, struct.pack(bo + "IHHq", 0x1A2B3C4D, 1, 0, -1))


def ng_idb(bo: str, linktype: int, options: bytes = b"", snaplen: int = 0) -> bytes:
    if options:
        options += ng_opt(bo, 0, b"")
    return ng_block(bo, 1, struct.pack(bo + "HHI", linktype, 0, snaplen) + options)


def ng_epb(bo: str, if_id: int, ts: int, frame: bytes, flags: int | None = None) -> bytes:
    body = struct.pack(bo + "IIIII", if_id, ts >> 32, ts & 0xFFFFFFFF, len(frame), len(frame))
    body += pad(frame)
    if flags is not None:
        body += ng_opt(bo, 2, struct.pack(bo + "I", flags)) + ng_opt(bo, 0, b"")
    return ng_block(bo, 6, body)


def walk_blocks(raw: bytes) -> list[tuple[int, int, bytes]]:
    """(offset, type, body) for each block of a native-order pcapng file; checks framing."""
    blocks = []
    pos = 0
    while pos < len(raw):
        btype, total = struct.unpack_from(NATIVE + "II", raw, pos)
        assert total % 4 == 0, f"block at {pos}: total length {total} not 32-bit aligned"
        assert pos + total <= len(raw)
        (trailing,) = struct.unpack_from(NATIVE + "I", raw, pos + total - 4)
        assert trailing == total, f"block at {pos}: trailing {trailing} != leading {total}"
        blocks.append((pos, btype, raw[pos + 8 : pos + total - 4]))
        pos += total
    assert pos == len(raw)
    return blocks


def parse_options(body: bytes, start: int) -> dict[int, bytes]:
    opts = {}
    pos = start
    while pos < len(body):
        code, length = struct.unpack_from(NATIVE + "HH", body, pos)
        pos += 4
        if code == 0:
            assert length == 0
            assert pos == len(body), "bytes after opt_endofopt"
            break
        value = body[pos : pos + length]
        padding = body[pos + length : pos + ((length + 3) & ~3)]
        assert padding == b"\0" * len(padding)
        opts[code] = value
        pos += (length + 3) & ~3
    return opts


# --------------------------------------------------------------------------------------------
# writer + reader round trips and file structure
# --------------------------------------------------------------------------------------------


def test_round_trip_path(tmp_path: Path) -> None:
    packets = sample(101)
    path = tmp_path / "c.pcapng"
    write_sample(path, packets)
    got = list(read_capture(path))
    assert got == packets
    assert [p.number for p in got] == list(range(1, 102))
    assert {p.direction for p in got} == set(Direction)
    assert all(p.original_length == len(p.data) and not p.truncated for p in got)


def test_round_trip_file_object_left_open() -> None:
    packets = sample(10)
    buf = io.BytesIO()
    write_sample(buf, packets, background=False)
    assert not buf.closed  # a file object we were given is flushed, not closed
    buf.seek(0)
    assert list(read_capture(buf)) == packets
    assert not buf.closed


def test_block_structure_bytes() -> None:
    packets = sample(7)
    buf = io.BytesIO()
    write_sample(buf, packets)
    blocks = walk_blocks(buf.getvalue())
    assert [b[1] for b in blocks] == [0x0A0D0D0A, 1] + [6] * 7

    shb = blocks[0][2]
    bom, major, minor, section_len = struct.unpack_from(NATIVE + "IHHq", shb)
    assert (bom, major, minor, section_len) == (0x1A2B3C4D, 1, 0, -1)
    shb_opts = parse_options(shb, 16)
    assert shb_opts[4] == f"ulogd {__version__}".encode()  # shb_userappl

    idb = blocks[1][2]
    linktype, reserved, snaplen = struct.unpack_from(NATIVE + "HHI", idb)
    assert (linktype, reserved, snaplen) == (LINKTYPE_NETLINK, 0, 65535)
    idb_opts = parse_options(idb, 8)
    assert idb_opts[9] == b"\x09"  # if_tsresol: nanoseconds
    assert idb_opts[2] == b"ulogd"  # if_name
    assert idb_opts[3]  # if_description

    for (_off, _t, body), p in zip(blocks[2:], packets, strict=True):
        if_id, hi, lo, caplen, wirelen = struct.unpack_from(NATIVE + "IIIII", body)
        assert if_id == 0
        assert (hi << 32) | lo == p.timestamp_ns
        assert caplen == wirelen == 16 + len(p.data)
        frame = body[20 : 20 + caplen]
        pkttype, hatype, halen, addr, proto = struct.unpack_from(">HHH8sH", frame)
        assert pkttype == (0 if p.direction is Direction.TO_DAEMON else 4)
        assert (hatype, halen, addr, proto) == (824, 0, b"\0" * 8, 11)
        assert frame[16:] == p.data
        padded_end = 20 + ((caplen + 3) & ~3)
        assert body[20 + caplen : padded_end] == b"\0" * (padded_end - 20 - caplen)
        opts = parse_options(body, padded_end)
        (flags,) = struct.unpack(NATIVE + "I", opts[2])
        assert flags == (1 if p.direction is Direction.TO_DAEMON else 2)


def test_snaplen_truncates_and_reader_reports_it() -> None:
    buf = io.BytesIO()
    big = datagram(1, 1, b"z" * 1000)
    with CaptureWriter(buf, snaplen=100) as w:
        w.record(Direction.TO_DAEMON, big, 42)
    buf.seek(0)
    (p,) = read_capture(buf)
    assert p.data == big[:84]
    assert p.original_length == len(big)
    assert p.truncated
    with pytest.raises(ValueError):
        CaptureWriter(io.BytesIO(), snaplen=8)


def test_default_timestamp_is_now_and_mutable_buffers_are_copied() -> None:
    buf = io.BytesIO()
    scratch = bytearray(datagram(1, 2))
    expected = bytes(scratch)
    before = time.time_ns()
    with CaptureWriter(buf, background=False) as w:
        w.record(Direction.TO_DAEMON, scratch)
        scratch[:] = b"\xff" * len(scratch)  # the daemon reuses its receive buffer
    after = time.time_ns()
    buf.seek(0)
    (p,) = read_capture(buf)
    assert p.data == expected
    assert before <= p.timestamp_ns <= after


# --------------------------------------------------------------------------------------------
# writer threading and failure behaviour
# --------------------------------------------------------------------------------------------


class CountingFile(io.BytesIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, b) -> int:  # type: ignore[override]
        self.writes += 1
        return super().write(b)


def test_record_does_no_io_until_flush() -> None:
    f = CountingFile()
    w = CaptureWriter(f, background=False)
    header_writes = f.writes
    size = len(f.getvalue())
    for p in sample(500):
        w.record(p.direction, p.data, p.timestamp_ns)
    assert f.writes == header_writes and len(f.getvalue()) == size
    assert w.pending == 500
    w.flush()
    assert w.pending == 0 and w.written == 500
    f.seek(0)
    assert len(list(read_capture(f))) == 500
    w.close()


def test_background_thread_writes_without_flush() -> None:
    f = CountingFile()
    w = CaptureWriter(f, flush_interval=0.01)
    try:
        for p in sample(20):
            w.record(p.direction, p.data, p.timestamp_ns)
        deadline = time.monotonic() + 5
        while w.written < 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert w.written == 20
        assert len(list(read_capture(io.BytesIO(f.getvalue())))) == 20
    finally:
        w.close()


def test_close_drains_records_from_other_threads(tmp_path: Path) -> None:
    path = tmp_path / "threads.pcapng"
    # a long flush interval: close() itself must write what the threads recorded
    w = CaptureWriter(path, flush_interval=60, batch_size=10**9)
    n_threads, per_thread = 4, 5000

    def worker(t: int) -> None:
        for i in range(per_thread):
            w.record(Direction.FROM_DAEMON, datagram(i, t), t * 10**9 + i)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    w.close()
    w.record(Direction.TO_DAEMON, b"after close", 1)  # ignored, no exception
    got = list(read_capture(path))
    assert len(got) == n_threads * per_thread
    for t in range(n_threads):  # each thread's records are in its own order
        mine = [p.timestamp_ns - t * 10**9 for p in got if p.timestamp_ns // 10**9 == t]
        assert mine == list(range(per_thread))


class FailingFile(io.BytesIO):
    def __init__(self, fail_after: int) -> None:
        super().__init__()
        self.calls = 0
        self.fail_after = fail_after

    def write(self, b) -> int:  # type: ignore[override]
        self.calls += 1
        if self.calls > self.fail_after:
            raise OSError(28, "No space left on device")
        return super().write(b)


def test_write_error_is_logged_once_and_stops_capture(caplog: pytest.LogCaptureFixture) -> None:
    f = FailingFile(fail_after=1)  # the header goes through, the first batch fails
    w = CaptureWriter(f, background=False)
    with caplog.at_level(logging.ERROR, logger="ulogd.edges.capture"):
        w.record(Direction.TO_DAEMON, datagram(1, 1), 1)
        w.flush()
        assert w.failed
        for _ in range(10):
            w.record(Direction.TO_DAEMON, datagram(1, 1), 1)
            w.flush()
        w.close()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "No space left" in errors[0].getMessage()
    assert f.calls == 2  # nothing was attempted after the failure
    assert w.pending == 0


def test_write_error_in_background_thread_does_not_raise(caplog: pytest.LogCaptureFixture) -> None:
    f = FailingFile(fail_after=1)
    with caplog.at_level(logging.ERROR, logger="ulogd.edges.capture"):
        w = CaptureWriter(f, flush_interval=0.01)
        w.record(Direction.TO_DAEMON, datagram(1, 1), 1)
        deadline = time.monotonic() + 5
        while not w.failed and time.monotonic() < deadline:
            time.sleep(0.01)
        assert w.failed
        w.record(Direction.TO_DAEMON, datagram(1, 1), 1)
        w.close()
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1


def test_unencodable_record_and_overflow_are_dropped_not_raised() -> None:
    buf = io.BytesIO()
    w = CaptureWriter(buf, background=False, max_pending=3)
    w.record(Direction.TO_DAEMON, datagram(1, 1), 2**64)  # timestamp does not fit
    w.record(Direction.FROM_DAEMON, datagram(2, 1), 7)
    w.record(Direction.FROM_DAEMON, datagram(3, 1), 8)
    w.record(Direction.FROM_DAEMON, datagram(4, 1), 9)  # over max_pending
    w.close()
    assert w.dropped == 2
    buf.seek(0)
    assert [p.timestamp_ns for p in read_capture(buf)] == [7, 8]


# --------------------------------------------------------------------------------------------
# reading files written by other tools
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bo", ["<", ">"])
@pytest.mark.parametrize("nanos", [False, True])
def test_classic_pcap_both_byte_orders(bo: str, nanos: bool) -> None:
    magic = 0xA1B23C4D if nanos else 0xA1B2C3D4
    raw = struct.pack(bo + "IHHiIII", magic, 2, 4, 0, 0, 65535, LINKTYPE_NETLINK)
    dgs = [
        (0, datagram(1, 3, b"abc")),  # PACKET_HOST
        (4, datagram(1, 3)),  # PACKET_OUTGOING
        (2, datagram(2, 4, b"x" * 9)),  # PACKET_MULTICAST: how the kernel sends requests
        (7, datagram(2, 4)),  # PACKET_KERNEL (nlmon's "to kernel")
    ]
    for i, (pkttype, d) in enumerate(dgs):
        frame = pseudo(pkttype) + d
        raw += struct.pack(bo + "IIII", 1_700_000_000 + i, 123_456 + i, len(frame), len(frame))
        raw += frame
    got = list(read_capture(io.BytesIO(raw)))
    unit = 1 if nanos else 1000
    dirs = [Direction.TO_DAEMON, Direction.FROM_DAEMON, Direction.TO_DAEMON, Direction.FROM_DAEMON]
    assert got == [
        Packet(i + 1, (1_700_000_000 + i) * 10**9 + (123_456 + i) * unit, dirs[i], d)
        for i, (_, d) in enumerate(dgs)
    ]


@pytest.mark.parametrize("bo", ["<", ">"])
def test_foreign_pcapng_sections_interfaces_and_unknown_blocks(bo: str) -> None:
    d1, d2, d3, d4, d5 = (datagram(i, i, bytes([i]) * i) for i in range(1, 6))
    raw = ng_shb(bo)
    raw += ng_block(bo, 0x0BAD, b"unknown block type")
    raw += ng_idb(bo, LINKTYPE_NETLINK)  # if 0: default microsecond resolution
    raw += ng_idb(bo, LINKTYPE_NETLINK, ng_opt(bo, 9, b"\x83"))  # if 1: 1/8 s ticks
    raw += ng_epb(bo, 0, 5_000_001, pseudo(2) + d1)  # no flags: direction from pkttype
    raw += ng_epb(bo, 1, 17, pseudo(0) + d2, flags=2)  # flags (outbound) win over pkttype
    raw += ng_block(bo, 0x40000BAD, b"custom block")
    # second section, the other byte order, two interfaces; resolution ms and an offset
    other = ">" if bo == "<" else "<"
    raw += ng_shb(other)
    raw += ng_idb(other, LINKTYPE_NETLINK, ng_opt(other, 9, b"\x03"))
    raw += ng_idb(
        other,
        LINKTYPE_NETLINK,
        ng_opt(other, 9, b"\x0c") + ng_opt(other, 14, struct.pack(other + "q", 100)),
    )
    raw += ng_epb(other, 1, 3_000, pseudo(4) + d3)  # ps resolution, +100 s
    obsolete_pb = struct.pack(other + "HHIIII", 0, 0, 0, 2_500, len(d4) + 16, len(d4) + 16)
    obsolete_pb += pad(pseudo(4) + d4) + ng_opt(other, 2, struct.pack(other + "I", 1))
    raw += ng_block(other, 2, obsolete_pb)  # pack_flags inbound wins over pkttype 4
    spb = struct.pack(other + "I", len(d5) + 16) + pseudo(0) + d5
    raw += ng_block(other, 3, spb)  # simple packet block: no timestamp
    got = list(read_capture(io.BytesIO(raw)))
    assert got == [
        Packet(1, 5_000_001_000, Direction.TO_DAEMON, d1),
        Packet(2, 2_125_000_000, Direction.FROM_DAEMON, d2),
        Packet(3, 100 * 10**9 + 3, Direction.FROM_DAEMON, d3),
        Packet(4, 2_500_000_000, Direction.TO_DAEMON, d4),
        Packet(5, 0, Direction.TO_DAEMON, d5),
    ]


def test_foreign_link_type_is_an_error_or_skipped() -> None:
    bo = "<"
    ether = b"\xff" * 14 + b"payload"
    raw = ng_shb(bo) + ng_idb(bo, 1) + ng_idb(bo, LINKTYPE_NETLINK, ng_opt(bo, 9, b"\x09"))
    raw += ng_epb(bo, 1, 10, pseudo(0) + datagram(1, 1))
    raw += ng_epb(bo, 0, 20, ether)
    raw += ng_epb(bo, 1, 30, pseudo(4) + datagram(1, 1))
    reader = read_capture(io.BytesIO(raw))
    assert next(reader).number == 1
    with pytest.raises(CaptureFormatError, match=r"packet 2\b.*") as exc:
        next(reader)
    assert "link type 1" in str(exc.value) and exc.value.packet_number == 2
    skipped = list(read_capture(io.BytesIO(raw), on_foreign_linktype="skip"))
    assert [(p.number, p.timestamp_ns) for p in skipped] == [(1, 10), (3, 30)]


def test_other_netlink_families_are_filtered() -> None:
    bo = ">"
    raw = ng_shb(bo) + ng_idb(bo, LINKTYPE_NETLINK)
    raw += ng_epb(bo, 0, 1, pseudo(0, family=0) + b"\x14\0\0\0rtnetlink...")  # NETLINK_ROUTE
    raw += ng_epb(bo, 0, 2, pseudo(0) + datagram(1, 1))
    assert [p.number for p in read_capture(io.BytesIO(raw))] == [2]
    assert [p.number for p in read_capture(io.BytesIO(raw), netlink_family=None)] == [1, 2]


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (pseudo(0, hatype=1) + b"data", "ARPHRD_ type is 1"),
        (pseudo(3) + b"data", "packet type 3"),
        (b"\0" * 10, "shorter than the 16-byte"),
    ],
)
def test_bad_pseudo_headers(frame: bytes, message: str) -> None:
    raw = ng_shb("<") + ng_idb("<", LINKTYPE_NETLINK) + ng_epb("<", 0, 1, frame)
    with pytest.raises(CaptureFormatError, match=message) as exc:
        list(read_capture(io.BytesIO(raw)))
    assert exc.value.packet_number == 1


# --------------------------------------------------------------------------------------------
# malformed and truncated files
# --------------------------------------------------------------------------------------------


def valid_capture(n: int = 5) -> tuple[bytes, list[Packet], list[int]]:
    buf = io.BytesIO()
    packets = sample(n)
    write_sample(buf, packets, background=False)
    raw = buf.getvalue()
    epb_offsets = [off for off, btype, _ in walk_blocks(raw) if btype == 6]
    return raw, packets, epb_offsets


def test_truncated_file_names_the_packet_number_and_offset() -> None:
    raw, packets, offsets = valid_capture()
    cut = raw[: offsets[2] + 30]  # in the middle of packet 3
    reader = read_capture(io.BytesIO(cut))
    assert [next(reader), next(reader)] == packets[:2]
    with pytest.raises(CaptureFormatError) as exc:
        next(reader)
    assert exc.value.packet_number == 3 and exc.value.offset == offsets[2]
    assert "packet 3" in str(exc.value) and f"byte offset {offsets[2]}" in str(exc.value)
    assert "truncated" in str(exc.value)


def test_every_truncation_is_an_error_or_a_clean_prefix() -> None:
    raw, packets, _offsets = valid_capture(4)
    boundaries = {off for off, _t, _b in walk_blocks(raw)[1:]} | {len(raw)}  # block ends
    for n in range(len(raw)):
        got: list[Packet] = []
        try:
            for p in read_capture(io.BytesIO(raw[:n])):
                got.append(p)
        except CaptureFormatError as exc:
            assert n not in boundaries
            assert exc.packet_number == len(got) + 1
        else:
            assert n in boundaries
            assert got == packets[: len(got)]


def test_mismatched_trailing_length() -> None:
    raw, _packets, offsets = valid_capture(3)
    bad = bytearray(raw)
    end = offsets[1] + struct.unpack_from(NATIVE + "I", raw, offsets[1] + 4)[0]
    bad[end - 4 : end] = struct.pack(NATIVE + "I", 1234)
    with pytest.raises(CaptureFormatError, match=r"trailing length 1234.*packet 2, byte offset"):
        list(read_capture(io.BytesIO(bytes(bad))))


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "empty file"),
        (b"\x0a\x0d", "truncated"),
        (b"GIF89a" + b"\0" * 40, "not a pcap or pcapng"),
        (b"\x0a\x0d\x0d\x0a\x1c\0\0\0\x01\x02\x03\x04" + b"\0" * 16, "byte-order magic"),
    ],
)
def test_not_captures(raw: bytes, message: str) -> None:
    with pytest.raises(CaptureFormatError, match=message) as exc:
        list(read_capture(io.BytesIO(raw)))
    assert exc.value.packet_number == 1 and "packet 1" in str(exc.value)


HEAD = ng_shb("<") + ng_idb("<", LINKTYPE_NETLINK)
GOOD_FRAME = pseudo(0) + b"data"


@pytest.mark.parametrize(
    ("block", "message"),
    [
        (ng_block("<", 1, b"\xfd\0"), "interface description block too short"),
        (ng_block("<", 6, b"\0" * 16), "too short for its fixed fields"),
        (ng_block("<", 3, b""), "simple packet block too short"),
        (
            ng_block("<", 6, struct.pack("<IIIII", 0, 0, 0, 400, 400) + GOOD_FRAME),
            "captured length 400 overruns",
        ),
        (ng_epb("<", 1, 0, GOOD_FRAME), "refers to interface 1"),
        (
            ng_block("<", 6, struct.pack("<IIIII", 0, 0, 0, 20, 20) + GOOD_FRAME + b"\2\0\x40\0"),
            "option 2 of length 64 overruns",
        ),
        (
            ng_block("<", 6, struct.pack("<IIIII", 0, 0, 0, 20, 20) + GOOD_FRAME + b"\2\0"),
            "epb_flags has length 0",
        ),
        (
            ng_block("<", 6, struct.pack("<IIIII", 0, 0, 0, 20, 20) + GOOD_FRAME + b"\2\0\1\0x"),
            "epb_flags has length 1",
        ),
        (ng_idb("<", LINKTYPE_NETLINK, ng_opt("<", 9, b"\6\6")), "if_tsresol has length 2"),
        (ng_idb("<", LINKTYPE_NETLINK, ng_opt("<", 14, b"\0")), "if_tsoffset has length 1"),
        (struct.pack("<II", 6, 10) + b"\0\0", "below the minimum 12"),
        (struct.pack("<II", 6, 14) + b"\0" * 6, "not a multiple of 4"),
    ],
)
def test_malformed_blocks(block: bytes, message: str) -> None:
    first = ng_epb("<", 0, 1, GOOD_FRAME)
    raw = HEAD + first + block
    reader = read_capture(io.BytesIO(raw))
    assert next(reader).number == 1
    with pytest.raises(CaptureFormatError, match=message) as exc:
        next(reader)
    assert exc.value.packet_number == 2 and exc.value.offset == len(HEAD) + len(first)


def test_pcapng_version_and_pcap_version_are_checked() -> None:
    shb = bytearray(ng_shb("<"))
    shb[12:14] = b"\2\0"
    with pytest.raises(CaptureFormatError, match="major version 2"):
        list(read_capture(io.BytesIO(bytes(shb))))
    pcap = struct.pack("<IHHiIII", 0xA1B2C3D4, 3, 0, 0, 0, 65535, LINKTYPE_NETLINK)
    with pytest.raises(CaptureFormatError, match="pcap version 3"):
        list(read_capture(io.BytesIO(pcap)))


def test_huge_block_length_is_rejected_without_allocating() -> None:
    raw, _packets, offsets = valid_capture(2)
    bad = bytearray(raw)
    bad[offsets[0] + 4 : offsets[0] + 8] = struct.pack(NATIVE + "I", 0xFFFFFFFC)
    with pytest.raises(CaptureFormatError, match="exceeds"):
        list(read_capture(io.BytesIO(bytes(bad))))


def drain(raw: bytes) -> None:
    try:
        for _ in read_capture(io.BytesIO(raw)):
            pass
    except CaptureFormatError as exc:
        assert exc.packet_number >= 1 and 0 <= exc.offset <= len(raw)


VALID, _, _ = valid_capture(6)
PCAP_HEADER = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, LINKTYPE_NETLINK)
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=600))
def test_fuzz_random_bytes(raw: bytes) -> None:
    drain(raw)


@FUZZ
@given(
    st.sampled_from([VALID[:28], PCAP_HEADER, b"\x0a\x0d\x0d\x0a"]),
    st.binary(max_size=600),
)
def test_fuzz_random_bytes_after_a_valid_header(head: bytes, tail: bytes) -> None:
    drain(head + tail)


@FUZZ
@given(
    st.lists(
        st.tuples(
            st.sampled_from([1, 2, 3, 6, 6, 6, 0x0A0D0D0A, 0xBAD]),
            st.binary(max_size=64),
        ),
        max_size=6,
    ),
    st.sampled_from(["<", ">"]),
)
def test_fuzz_well_framed_blocks_with_random_bodies(
    blocks: list[tuple[int, bytes]], bo: str
) -> None:
    """Consistent lengths get past the framing checks into every block parser."""
    raw = ng_shb(bo) + ng_idb(bo, LINKTYPE_NETLINK)
    for btype, body in blocks:
        raw += ng_block(bo, btype, body)
    drain(raw)


@FUZZ
@given(st.integers(0, len(VALID)))
def test_fuzz_truncations(n: int) -> None:
    drain(VALID[:n])


@FUZZ
@given(st.lists(st.integers(0, len(VALID) * 8 - 1), min_size=1, max_size=8))
def test_fuzz_bit_flips(bits: list[int]) -> None:
    raw = bytearray(VALID)
    for bit in bits:
        raw[bit // 8] ^= 1 << (bit % 8)
    drain(bytes(raw))


@FUZZ
@given(st.integers(0, len(VALID) - 1), st.binary(min_size=1, max_size=8), st.integers(0, 64))
def test_fuzz_overwrite_and_cut(pos: int, junk: bytes, cut_back: int) -> None:
    raw = bytearray(VALID)
    raw[pos : pos + len(junk)] = junk
    drain(bytes(raw[: max(0, len(raw) - cut_back)]))


# --------------------------------------------------------------------------------------------
# the real tool (tshark / editcap from Debian's "tshark" package)
# --------------------------------------------------------------------------------------------

TSHARK_TOOLS = ("tshark", "editcap", "capinfos")


@pytest.fixture(scope="module")
def tshark() -> None:
    """tshark, editcap and capinfos, installed from Debian's archive when missing (as the
    corosync and QEMU fixtures install theirs), so that the test command skips nothing.
    ``DEBIAN_FRONTEND=noninteractive`` answers wireshark-common's debconf question (may
    non-root users capture?) with its default, no.  Only a non-root run skips, naming the
    command to run."""
    if all(shutil.which(tool) for tool in TSHARK_TOOLS):
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("tshark/editcap not installed (apt-get install tshark)")
    apt.install(["tshark"])
    missing = [tool for tool in TSHARK_TOOLS if shutil.which(tool) is None]
    assert not missing, f"the tshark package installed no {missing}"


def run(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True, timeout=60).stdout


@pytest.mark.usefixtures("tshark")
def test_tshark_reads_every_packet_as_netlink(tmp_path: Path) -> None:
    packets = sample(25)
    path = tmp_path / "c.pcapng"
    write_sample(path, packets)
    out = run(
        "tshark", "-r", str(path), "-T", "fields", "-E", "separator=;",
        "-e", "frame.number", "-e", "frame.protocols", "-e", "netlink.hatype",
        "-e", "netlink.family", "-e", "frame.p2p_dir", "-e", "frame.time_epoch",
        "-e", "netlink.hdr_len", "-e", "frame.cap_len",
    )  # fmt: skip
    rows = [line.split(";") for line in out.splitlines()]
    assert [int(r[0]) for r in rows] == list(range(1, 26))
    for row, p in zip(rows, packets, strict=True):
        assert row[1].startswith("netlink")
        assert int(row[2]) == ARPHRD_NETLINK
        assert int(row[3], 0) == NETLINK_CONNECTOR
        assert row[4] == ("1" if p.direction is Direction.TO_DAEMON else "0")  # received/sent
        sec, frac = row[5].split(".")
        assert int(sec) * 10**9 + int(frac.ljust(9, "0")) == p.timestamp_ns
        assert int(row[6]) == len(p.data)  # host-order nlmsg_len decoded correctly
        assert int(row[7]) == 16 + len(p.data)
    info = run("capinfos", "-k", "-E", str(path))
    assert "Linux Netlink" in info


@pytest.mark.usefixtures("tshark")
@pytest.mark.parametrize("fmt", ["pcapng", "nsecpcap", "pcap"])
def test_files_rewritten_by_editcap_read_the_same(tmp_path: Path, fmt: str) -> None:
    packets = sample(25)
    ours, theirs = tmp_path / "ours.pcapng", tmp_path / f"theirs.{fmt}"
    write_sample(ours, packets)
    run("editcap", "-F", fmt, str(ours), str(theirs))
    got = list(read_capture(theirs))
    if fmt == "pcap":  # microsecond resolution: timestamps lose their last 3 digits
        packets = [Packet(p.number, p.timestamp_ns // 1000 * 1000, p.direction, p.data)
                   for p in packets]  # fmt: skip
    assert got == packets
