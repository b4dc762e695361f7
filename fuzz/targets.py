"""Fuzz targets for every decoder of untrusted or semi-trusted input (issue 9).

Each target is a function ``check(data: bytes) -> None`` that feeds ``data`` (possibly read
structure-aware, see :class:`Reader`) to one decoder and asserts what must hold:

* the decoder raises nothing but its documented error type;
* what it accepts is consistent (round trips, invariants, differential checks);
* ``Server.receive`` answers every answerable datagram exactly once, with an error when the
  request is malformed, never changes state for a foreign datagram, and never reports clean a
  region the kernel marked and did not clear.

Any other exception or an ``AssertionError`` is a finding.  The same functions drive the
long atheris campaign (``fuzz/run.py``) and the short CI run (``tests/test_fuzz_decoders.py``).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import io
import os
import shutil
import struct
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path

from bitarray import bitarray

from ulogd.cluster import checkpoint as ck
from ulogd.cluster import group as g
from ulogd.cluster import messages as m
from ulogd.edges import capture, capture_reader
from ulogd.engine.actions import Action, DiskRead, DiskWrite
from ulogd.engine.runner import SyncRunner
from ulogd.engine.server import Server
from ulogd.ops import config
from ulogd.protocol import ctr, wire
from ulogd.protocol import spec as p
from ulogd.protocol.spec import S64
from ulogd.protocol.spec import RequestType as T
from ulogd.state import disklog, statefile
from ulogd.state.regionlog import RegionLog, new_bitmaps, scalars_problem
from ulogd.state.requests import OPERATIONS
from ulogd.state.statefile import StateDir

Target = Callable[[bytes], None]


class Reader:
    """Reads structured values from fuzz bytes; past the end everything reads as 0/empty."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def __bool__(self) -> bool:
        return self.pos < len(self.data)

    def u8(self) -> int:
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def u16(self) -> int:
        return self.u8() | self.u8() << 8

    def u32(self) -> int:
        return self.u16() | self.u16() << 16

    def u64(self) -> int:
        return self.u32() | self.u32() << 32

    def take(self, n: int) -> bytes:
        chunk = self.data[self.pos : self.pos + n]
        self.pos += len(chunk)
        return chunk

    def rest(self) -> bytes:
        return self.take(len(self.data))


# ---------------------------------------------------------------------------------- wire


def check_wire(data: bytes) -> None:
    """``wire.decode``: never raises; fast path and checked path agree; buffer types agree;
    error replies decode and name the request."""
    layout = wire.LEGACY_2009 if data[:1] == b"\xff" else wire.CURRENT
    datagram = data[1:]
    port = 0 if data[:1] != b"\xfe" else 4242
    result = wire.decode(datagram, layout, port)
    for other in (bytearray(datagram), memoryview(datagram)):
        assert wire.decode(other, layout, port) == result, "decode depends on the buffer type"
    if port:
        assert isinstance(result, wire.Rejected) and result.foreign and result.reply is None
        return
    checked = wire._decode_checked(datagram, layout, len(datagram))
    assert checked == result, f"fast and checked decoders disagree: {result!r} / {checked!r}"
    if isinstance(result, wire.Request):
        assert result.request_type in p.SPECS
        assert 1 <= result.version <= p.PROTOCOL_VERSION
        assert p.payload_error(result.request_type, result.version, len(result.data)) is None
        assert len(result.raw_header) == layout.header_size
        reply = wire.decode_reply(wire.encode_reply(result, p.EINVAL), layout)
        assert (reply.seq, reply.error, reply.data) == (result.seq, p.EINVAL, b"")
        return
    assert isinstance(result, wire.Rejected) and result.reason
    if result.reply is not None:
        reply = wire.decode_reply(result.reply, layout)
        assert reply.error == p.EINVAL and reply.data == b""
        if reply.ack_only:
            assert reply.seq == struct.unpack_from("=I", datagram, 24)[0]
        else:
            assert reply.seq == struct.unpack_from("=I", datagram, layout.offsets["seq"])[0]


# ---------------------------------------------------------------------------------- ctr


def check_ctr(data: bytes) -> None:
    """``ctr.parse``: CtrError only; what it accepts is a sane, re-parsable geometry."""
    try:
        c = ctr.parse(data)
    except ctr.CtrError as exc:
        assert exc.errno > 0 and str(exc)
        return
    assert c.target_sectors > 0
    assert c.region_size >= 2 and c.region_size & (c.region_size - 1) == 0
    assert c.region_size <= c.target_sectors
    assert 1 <= c.region_count <= ctr.MAX_REGIONS
    assert (c.log_device is not None) == ctr.TYPES[c.type_word]
    assert ctr.parse(c.text.encode()) == c
    assert ctr.parse(c.text.encode() + b"\0") == c


# ---------------------------------------------------------------------------------- messages

_ARITY = {m.Op.RESYNC_WORK: 0, m.Op.SET_SYNC: 2, m.Op.REMOTE_RECOVERING: 1}


def _frame(kind: int, body: bytes, version: int = m.VERSION) -> bytes:
    size = m.HEADER_SIZE + len(body)
    first = struct.pack("<IHHIII", m.MAGIC, version, kind, size, zlib.crc32(body), 0)
    return first + struct.pack("<I", zlib.crc32(first)) + body


def framed_message(data: bytes) -> bytes:
    """Raw bytes (first byte even) or a body framed with valid CRCs (odd): the CRCs would
    otherwise hide every body decoder from the fuzzer."""
    if not data or data[0] % 2 == 0:
        return data[1:]
    kind = data[1] % 6 if len(data) > 1 else 1
    version = m.VERSION if data[0] % 4 != 3 else (data[0] >> 2)
    return _frame(kind, data[2:], version)


def encode_merge(point: int, part: int, parts: int, data: bytes, members: tuple = ()) -> bytes:
    """``messages.encode_merge`` before and after MERGE bodies carried the membership."""
    import inspect

    if len(inspect.signature(m.encode_merge).parameters) == 5:
        return m.encode_merge(point, part, parts, members, data)  # type: ignore[call-arg]
    return m.encode_merge(point, part, parts, data)  # type: ignore[call-arg]


def check_messages(data: bytes) -> None:
    """``messages.decode``: MessageError only; what it accepts re-encodes to itself and is
    well-formed for the group code that consumes it."""
    raw = framed_message(data)
    try:
        msg = m.decode(raw)
    except m.MessageError as exc:
        assert str(exc)
        return
    if isinstance(msg, m.Ops):
        for rec in msg.ops:
            want = _ARITY.get(rec.op)
            assert want is None or len(rec.values) == want, f"{rec.op.name} with {rec.values}"
        again = m.encode_ops(msg.ops)
    elif isinstance(msg, m.DiskDone):
        again = m.encode_disk_done(msg.index, msg.error)
    elif isinstance(msg, m.CheckpointChunk):
        assert 0 <= msg.part < msg.parts
        again = m.encode_checkpoint(msg.point, msg.part, msg.parts, msg.targets, msg.data)
    else:
        assert isinstance(msg, m.MergeChunk)
        assert msg.parts == 0 or 0 <= msg.part < msg.parts
        again = encode_merge(msg.point, msg.part, msg.parts, msg.data,
                             getattr(msg, "members", ()))  # fmt: skip
    assert m.decode(again) == msg


# ---------------------------------------------------------------------------------- group

_GROUP_CTR = ctr.parse(b"1024 clustered-disk 7:0 8")  # 128 regions


def check_group(data: bytes) -> None:
    """``Group.deliver`` of decoded-valid and corrupt messages from a member holding state and
    from a stranger: never raises; a stranger's or corrupt message changes nothing."""
    r = Reader(data)
    clean, sync = new_bitmaps(_GROUP_CTR)
    rl = RegionLog(_GROUP_CTR, clean, sync, local_node=1)
    me, peer, stranger = (1, 100), (2, 200), (9, 900)
    grp = g.Group(rl, me, chunk_size=64)
    grp.confchg([me], [], [me])
    assert grp.phase is g.Phase.VALID
    while r:
        op = r.u8()
        n = r.u8()
        raw = framed_message(r.take(n))
        sender = (me, peer, stranger)[op % 3]
        before = (rl.clean.tobytes(), rl.sync.tobytes(), sorted(rl.holders.items()))
        try:
            decodable = True
            m.decode(raw)
        except m.MessageError:
            decodable = False
        grp.deliver(sender, raw)
        if not decodable or sender == stranger:
            after = (rl.clean.tobytes(), rl.sync.tobytes(), sorted(rl.holders.items()))
            assert after == before, "a corrupt or foreign message changed the replica"
        _check_regionlog(rl)
        if op % 7 == 0:
            grp.confchg([me, peer], [], [peer])
        elif op % 7 == 1:
            grp.confchg([me], [peer], [])


# ---------------------------------------------------------------------------------- checkpoint


def _snapshot_blob(r: Reader, n: int, region_size: int) -> bytes:
    """A snapshot whose framing (length, CRC, compression) is right and whose fields are fuzz:
    reaches the body checks that random bytes never would."""
    mode = r.u8() % 4
    if mode == 0:
        return r.rest()
    if mode == 1:
        return zlib.compress(r.rest(), 1)
    head = struct.Struct("<4sIQQQqqIIIIIIQI")
    counts = [r.u8() % 5 for _ in range(5)]
    fields = (
        b"UCK1", r.u8(), n if mode == 2 else r.u32(), region_size,
        r.u64(), r.u64() - (1 << 63), r.u64() - (1 << 63), r.u32(), *counts,
    )  # fmt: skip
    body = r.rest()
    return zlib.compress(head.pack(*fields, len(body), zlib.crc32(body)) + body, 1)


def check_checkpoint(data: bytes) -> None:
    """``checkpoint.restore``: CheckpointError only, nothing touched on error; a restored
    replica is consistent, serves requests and snapshots back to itself."""
    r = Reader(data)
    sectors = 8 * (1 + r.u8() % 200)
    config_ = ctr.parse(f"{sectors} clustered-disk 7:0 8".encode())
    clean, sync = new_bitmaps(config_)
    rl = RegionLog(config_, clean, sync, local_node=1)
    n = rl.region_count
    before = (rl.clean.tobytes(), rl.sync.tobytes())
    blob = _snapshot_blob(r, n, 8)
    try:
        book = ck.restore(rl, blob)
    except ck.CheckpointError as exc:
        assert str(exc)
        assert (rl.clean.tobytes(), rl.sync.tobytes()) == before, "failed restore touched state"
        return
    _check_regionlog(rl)
    # the restored replica must serve every request without raising
    for node in (1, 2):
        rl.get_resync_work(node)
        rl.is_remote_recovering(node, n - 1)
        rl.set_region_sync(node, 0, True)
        rl.mark(node, [0, n - 1])
        rl.clear(node, [0])
        rl.take_disk_work()
    disklog.plan_write(rl.clean, n, None, 512)
    copy = rl.blank_copy()
    again = ck.restore(copy, ck.snapshot(rl, book))
    assert again == book
    assert (copy.clean[:n], copy.sync[:n], copy.holders) == (rl.clean[:n], rl.sync[:n], rl.holders)


def _check_regionlog(rl: RegionLog, *, strict_clean: bool = True) -> None:
    n = rl.region_count
    assert rl.sync_count == rl.sync.count(1, 0, n), "sync_count drifted"
    assert all(0 <= r < n for r in rl.holders), "holder of a region out of range"
    assert not rl.clean[n:].any() and not rl.sync[n:].any(), "bits set past region_count"
    for r in rl.holders:
        assert not rl.clean[r], f"region {r} marked and clean"
    if strict_clean:
        assert not (rl.clean[:n] & ~rl.sync[:n]).any(), "a region clean but out of sync"
    assert -1 <= rl.recovering < n, f"recovering {rl.recovering} outside the log"
    assert 0 <= rl.sync_search <= n + 1, f"search position {rl.sync_search} outside the log"


# ---------------------------------------------------------------------------------- disk log


def check_disklog(data: bytes) -> None:
    """``disklog.parse_image``: DiskFormatError only; an image carries exactly region_count
    bits; a valid image written back parses to the same bits."""
    r = Reader(data)
    region_count = r.u16() % 9000
    buf = r.rest()
    try:
        image = disklog.parse_image(buf, region_count)
    except disklog.DiskFormatError as exc:
        assert str(exc)
        return
    assert len(image.clean) == region_count
    if not image.valid:
        assert image.nr_regions == 0 and not image.clean.any()
        return
    store = disklog.MemoryDiskLog(disklog.io_size(region_count, 512))
    padded = bitarray(image.clean, endian="little")
    padded.extend([0] * (-len(padded) % 64 or 0))
    if not padded:
        padded = bitarray(64, endian="little")
        padded.setall(0)
    store.write_extents(disklog.plan_write(padded, region_count, None, 512))
    assert disklog.read_image(store, region_count).clean == image.clean  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------- capture


def check_capture(data: bytes) -> None:
    """``read_capture``: CaptureFormatError only; packets are well-formed records."""
    for family in (capture.NETLINK_CONNECTOR, None):
        try:
            packets = list(capture_reader.read_capture(io.BytesIO(data), netlink_family=family,
                                                on_foreign_linktype="skip"))  # fmt: skip
        except capture.CaptureFormatError as exc:
            assert exc.packet_number >= 1 and exc.offset >= 0
            continue
        numbers = [pk.number for pk in packets]
        assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)
        for pk in packets:
            assert isinstance(pk.data, bytes) and pk.direction in capture.Direction
    try:
        for _ in capture_reader.read_capture(io.BytesIO(data), on_foreign_linktype="error"):
            pass
    except capture.CaptureFormatError:
        pass


# ---------------------------------------------------------------------------------- config

_scratch: list[Path] = []


def _scratch_dir() -> Path:
    """Where config/statefile inputs are written: $ULOGD_FUZZ_SCRATCH, else a temporary
    directory made on first use and removed at exit."""
    if not _scratch:
        given = os.environ.get("ULOGD_FUZZ_SCRATCH")
        path = Path(given) if given else Path(tempfile.mkdtemp(prefix="ulogd-fuzz-"))
        if not given:
            owner = os.getpid()
            # Only the process that made it removes it: a forked child (tests fork to drop
            # privileges) inherits atexit handlers and would delete it under its parent.
            atexit.register(lambda: os.getpid() == owner and shutil.rmtree(path, True))
        _scratch.append(path)
    _scratch[0].mkdir(parents=True, exist_ok=True)
    return _scratch[0]


def check_config(data: bytes) -> None:
    """``config.load``: ConfigError only; accepted settings are in range."""
    path = _scratch_dir() / "dm-ulogd.toml"
    path.write_bytes(data)
    try:
        settings = config.load(path)
    except config.ConfigError as exc:
        assert str(exc).startswith(str(path))
        return
    assert settings.log_level in config.LOG_LEVELS
    assert settings.cluster in config.CLUSTER_MODES
    assert isinstance(settings.run_dir, Path)


# ---------------------------------------------------------------------------------- state files


_EDGES = (-2, -1, 0, 1, 2, 2**31 - 1, 2**32, 2**40, 2**63 - 1)


def _scalar_near(r: Reader, count: int) -> int:
    """A value around the edges of a log of ``count`` regions, or far outside it."""
    pick = r.u8() % 14
    if pick < len(_EDGES):
        return _EDGES[pick]
    return count + pick - len(_EDGES) - 2  # count-2 .. count+2


def _scalars(r: Reader, count: int) -> bytes:
    """The 32 scalar bytes: raw, or each field at or beyond the edges of the geometry."""
    if r.u8() % 2 == 0:
        return r.take(statefile._SCALARS.size).ljust(statefile._SCALARS.size, b"\0")
    search = _scalar_near(r, count) & (2**64 - 1)
    recovering = max(-(2**63), min(2**63 - 1, _scalar_near(r, count)))
    recoverer = max(-(2**31), min(2**31 - 1, _scalar_near(r, count)))
    flags = (0, 1, 31, 32, 1 << 31)[r.u8() % 5]
    return statefile._SCALARS.pack(search, recovering, recoverer, flags, r.u64())


def _state_file(r: Reader) -> tuple[bytes, bool]:
    """Raw bytes, or a layout-1/2/3 header with fuzzed fields (scalars around the geometry's
    edges) and a consistent or fuzzed size; and whether it is named after its identity."""
    mode = r.u8() % 5
    named = r.u8() % 8 != 0
    if mode == 0:
        return r.rest(), named
    version = (1, 2, 3, 3)[mode - 1] if mode < 4 else r.u32()
    count = r.u16() % 5000 if mode < 4 else r.u64()
    size = ((max(64, -(-count // 64) * 64)) // 8) if mode < 4 else r.u64()
    rsize = (8, 16, 1, r.u32())[r.u8() % 4]
    if r.u8() % 4:
        text = f"{count * rsize} core {rsize}{(' nosync', '', ' sync')[r.u8() % 3]}".encode()
    else:
        text = r.take(r.u16() % 400)
    uuid = (b"LVM-fuzz", b"\xff" * 129, b"+" * 60 + b"A" + b"+" * 68, r.take(r.u8()))[r.u8() % 4]
    head = bytearray(4096)
    struct.pack_into("=8sIIQQQQ", head, 0, b"ULOGDST1", version & 0xFFFFFFFF, 4096,
                     r.u64(), count & (2**64 - 1), rsize, size & (2**64 - 1))  # fmt: skip
    head[48:80] = _scalars(r, count)
    if version == 3:
        u = uuid.decode("ascii", "backslashreplace").encode()
        ulen = len(u) if r.u8() % 8 else r.u16()
        struct.pack_into(f"=H{statefile.UUID_TEXT_MAX}sH{statefile.CTR_TEXT_MAX}s", head,
                         statefile._TEXT_AT, ulen, u, len(text), text)  # fmt: skip
    else:
        ulen = len(uuid) if r.u8() % 8 else r.u8()
        struct.pack_into("=H129sH336s", head, 80, ulen, uuid[:129], len(text), text[:336])
    maps = 2 if version == 1 else 3
    total = 4096 + maps * size if mode < 4 else 4096 + r.u16()
    body = r.rest()
    return (bytes(head) + body).ljust(total, b"\0")[:total], named


def _name_for(blob: bytes, named: bool) -> str:
    """Where the fuzzed file is put: named after the identity it holds (if it holds one),
    else a name no identity has."""
    if named:
        with contextlib.suppress(Exception):
            ident, _version = statefile._parse_header(blob[:4096], len(blob))
            return statefile.file_name(ident.uuid, ident.luid)
    return "x.0000.state"


def check_statefile(data: bytes) -> None:
    """``StateDir.load_all`` + ``Server.restore`` on one fuzzed state file: never raise; a bad
    file is moved aside (never a resource error); a layout-1/2 file is migrated; a restored
    log's scalars are in range for its geometry and it answers requests."""
    directory = _scratch_dir() / "state"
    if directory.exists():
        for leftover in directory.iterdir():
            leftover.unlink()
    state_dir = StateDir(directory)
    blob, named = _state_file(Reader(data))
    name = _name_for(blob, named)
    (directory / name).write_bytes(blob)
    states = state_dir.load_all()
    names = sorted(q.name for q in directory.iterdir())
    if not states:
        assert names in ([name[: -len(".state")] + ".corrupt"],
                         [name[: -len(".state")] + ".unbacked"]), names  # fmt: skip
        return
    (state,) = states
    assert names == [state.path.name] and state.path.name.endswith(".state"), names
    ident = state.identity
    assert state.path.name == statefile.file_name(ident.uuid, ident.luid)
    assert scalars_problem(ident.region_count, state.load_scalars()) is None
    server = Server(state_dir=state_dir)
    try:
        server.restore(states)
        for (uuid, luid), entry in list(server.logs.items()):
            n = entry.log.region_count
            assert scalars_problem(n, entry.log.scalars()) is None
            if not uuid.isascii() or "\\" in uuid:
                continue
            for rtype, payload in (
                (T.GET_SYNC_COUNT, b""), (T.STATUS_INFO, b""), (T.STATUS_TABLE, b""),
                (T.GET_RESYNC_WORK, b""), (T.IS_REMOTE_RECOVERING, bytes(8)),
                (T.IN_SYNC, bytes(8)), (T.RESUME, b""), (T.MARK_REGION, bytes(8)),
                (T.FLUSH, b""), (T.CLEAR_REGION, bytes(8)), (T.PRESUSPEND, b""),
                (T.POSTSUSPEND, b""),
            ):  # fmt: skip
                dg = wire.encode_request(rtype, uuid=uuid, luid=luid, seq=7, data=payload)
                replies = _run(server, dg, {})
                assert len(replies) == 1, f"{p.type_name(rtype)}: {len(replies)} replies"
                if rtype == T.GET_RESYNC_WORK:
                    reply = wire.decode_reply(replies[0])
                    if reply.error == 0:
                        more, region = struct.unpack("=qQ", reply.data)
                        assert not more or region < n, (more, region, n)
    finally:
        server.close()


# ---------------------------------------------------------------------------------- server

_CTRS = (
    b"1024 core 64",
    b"1024 core 64 nosync",
    b"1000 clustered-core 8 sync block_on_error",
    b"4096 disk /dev/log0 64",
    b"4096 clustered-disk /dev/log1 64 nosync",
    b"4096 disk /dev/log0 128",
    b"8192 disk 253:4 64",
    b"4096 disk /dev/missing 64",
    b"4096 disk /dev/" + b"l" * 130 + b" 64",
)
_UUIDS = ("LVM-fuzz-a", "LVM-fuzz-b", "")
_LUIDS = (0x10, 0x11, 0)
_MAX_FUZZ_REGIONS = 1 << 16  # bigger logs only cost memory and time per input


class _Devices:
    def __init__(self) -> None:
        self.devices: dict[str, disklog.MemoryDiskLog] = {}
        self.fail_read = False
        self.fail_write = False

    def open(self, path: str) -> disklog.MemoryDiskLog:
        from ulogd.engine.actions import DeviceError

        if path == "/dev/missing":
            raise DeviceError(errno.ENOENT, "no such device")
        old = self.devices.get(path)
        size = 8192 if path != "253:4" else 1024  # 253:4 is too small for its log
        dev = disklog.MemoryDiskLog(
            data=old.data if old else bytes(size), rdev=(253, len(self.devices))
        )
        self.devices[path] = dev
        return dev


class _FaultyRunner(SyncRunner):
    """The one synchronous runner, with injected read/write faults; a server without
    cluster mode produces nothing else."""

    def __init__(self, server: Server, faults: dict[str, bool]) -> None:
        super().__init__(server)
        self.faults = faults

    def read(self, action: DiskRead) -> bytes:
        if self.faults.get("read"):
            raise disklog.DiskIOError(errno.EIO, "injected")
        return super().read(action)

    def write(self, action: DiskWrite) -> None:
        if self.faults.get("write"):
            raise disklog.DiskIOError(errno.EIO, "injected")
        super().write(action)

    def other(self, action: Action) -> None:
        raise AssertionError(f"unexpected action {action!r} from a non-cluster server")


def _run(server: Server, datagram: bytes, faults: dict[str, bool], port: int = 0) -> list[bytes]:
    return _FaultyRunner(server, faults).run(server.receive(datagram, port))


def _answerable(dg: bytes, port: int) -> bool:
    """The documented policy: a datagram from the kernel (port 0, pid 0, connector 7.1,
    NLMSG_DONE) with a non-empty connector message is answered, however malformed."""
    if port or len(dg) < 36:
        return False
    fields = struct.unpack_from("=IHHIIIIIIHH", dg)
    nl_type, pid, idx, val, cn_len = fields[1], fields[4], fields[5], fields[6], fields[9]
    return pid == 0 and (idx, val) == (7, 1) and nl_type == 3 and cn_len != 0


def _well_formed(dg: bytes) -> bool:
    """An independent reading of a well-formed request (current layout)."""
    nl_len = struct.unpack_from("=I", dg)[0]
    cn_len = struct.unpack_from("=H", dg, 32)[0]
    if nl_len > len(dg) or 36 + cn_len > nl_len or cn_len < 160:
        return False
    version, _err, _seq, rtype, size = struct.unpack_from("=IiIII", dg, 36 + 140)
    rtype &= 0xFF
    if 160 + size != cn_len or rtype not in p.SPECS or version > 3:
        return False
    return p.payload_error(rtype, max(version, 1), size) is None


def _fingerprint(server: Server) -> object:
    return sorted(
        (key, e.log.clean.tobytes(), e.log.sync.tobytes(), sorted(e.log.holders.items()),
         e.log.scalars())
        for key, e in server.logs.items()
    )  # fmt: skip


def _request(r: Reader, server: Server, marked: dict[tuple[str, int], set[int]]) -> bytes:
    uuid = _UUIDS[r.u8() % len(_UUIDS)]
    luid = _LUIDS[r.u8() % len(_LUIDS)]
    rtype = r.u8() % 19  # 0 and 18: unknown types
    version = (3, 3, 2, 1, 0, 4)[r.u8() % 6]
    entry = server.logs.get((uuid, luid))
    n = entry.log.region_count if entry else 64
    shape = r.u8()
    if rtype == T.CTR:
        data = _CTRS[shape % len(_CTRS)] if shape < 200 else r.take(r.u8())
        if shape & 1 and shape < 200:
            data += b"\0"  # a reconnecting kernel
    elif shape < 16:
        data = r.take(shape)  # any size: mostly malformed payloads
    else:
        count = shape % 5
        data = b"".join(struct.pack("=Q", (r.u16() % (n + 2))) for _ in range(count))
        if rtype in (T.IS_CLEAN, T.IN_SYNC, T.IS_REMOTE_RECOVERING):
            data = struct.pack("=Q", r.u16() % (n + 2))
        elif rtype == T.SET_REGION_SYNC:
            data = struct.pack("=Qq", r.u16() % (n + 2), r.u8() % 2)
        elif rtype in (T.MARK_REGION, T.CLEAR_REGION, T.FLUSH):
            if r.u8() % 4 == 0 and entry is not None and marked.get((uuid, luid)):
                data = struct.pack("=Q", min(marked[(uuid, luid)]))  # clear what was marked
        elif rtype != T.DTR:
            data = b""
    return wire.encode_request(
        rtype, uuid=uuid, luid=luid, seq=r.u32(), data=data, version=version
    )


def _mutate(r: Reader, dg: bytes) -> bytes:
    buf = bytearray(dg)
    for _ in range(1 + r.u8() % 4):
        how = r.u8() % 4
        if how == 0 and buf:
            buf[r.u16() % len(buf)] = r.u8()
        elif how == 1:
            del buf[r.u16() % (len(buf) + 1) :]
        elif how == 2:
            buf += r.take(r.u8() % 32)
        elif buf:
            at = r.u8() % min(len(buf), 40)  # the headers: lengths, ids, pid
            buf[at : at + 4] = r.take(4).ljust(4, b"\0")[: len(buf[at : at + 4])]
    return bytes(buf)


def _ctr_too_big(dg: bytes) -> bool:
    req = wire.decode(dg)
    if isinstance(req, wire.Request) and req.request_type == T.CTR:
        try:
            return ctr.parse(req.data).region_count > _MAX_FUZZ_REGIONS
        except ctr.CtrError:
            return False
    return False


def check_server(data: bytes) -> None:
    """``Server.receive`` end to end on a sequence of garbage, well-formed and mutated
    datagrams with disk faults; see the module docstring for what is asserted."""
    r = Reader(data)
    devices = _Devices()
    server = Server(open_device=devices.open)  # type: ignore[arg-type]
    faults = {"read": False, "write": False}
    marked: dict[tuple[str, int], set[int]] = {}
    steps = 0
    while r and steps < 64:
        steps += 1
        op = r.u8() % 10
        port = 0
        if op == 0:
            dg = r.take(r.u8())
        elif op == 1:
            faults["read"], faults["write"] = bool(r.u8() & 1), bool(r.u8() & 1)
            continue
        elif op == 2:
            dg = _mutate(r, _request(r, server, marked))
        elif op == 3:
            dg, port = _request(r, server, marked), 1 + r.u8()
        else:
            dg = _request(r, server, marked)
        if _ctr_too_big(dg):
            continue
        request = wire.decode(dg) if not port else None
        key = (request.uuid, request.luid) if isinstance(request, wire.Request) else None
        was_resumed = key in server.logs and server.logs[key].log.resumed
        before = _fingerprint(server) if not _answerable(dg, port) else None
        replies = _run(server, dg, faults, port)
        if before is not None:
            assert replies == [], "a datagram that is not the kernel's was answered"
            assert _fingerprint(server) == before, "a foreign datagram changed state"
            continue
        assert len(replies) == 1, f"{len(replies)} replies to one kernel datagram"
        reply = wire.decode_reply(replies[0])
        assert reply.error <= 0
        if not _well_formed(dg):
            assert reply.error < 0, "a malformed request was answered with success"
            continue
        assert isinstance(request, wire.Request), f"well-formed but rejected: {request!r}"
        assert not reply.ack_only and reply.seq == request.seq
        assert len(reply.data) <= p.SPECS[request.request_type].reply_capacity
        assert reply.error == 0 or reply.data == b""
        _model(server, request, reply, marked, was_resumed)
        for entry in server.logs.values():
            _check_regionlog(entry.log)
    server.close()


def _model(
    server: Server,
    request: wire.Request,
    reply: wire.Reply,
    marked: dict[tuple[str, int], set[int]],
    was_resumed: bool,
) -> None:
    """No region the kernel marked (and did not clear) since its last RESUME is ever reported
    or recorded clean."""
    key, rtype = request.key, request.request_type
    entry = server.logs.get(key)
    if entry is None:
        marked.pop(key, None)
        return
    row = OPERATIONS[rtype]  # the payload codec the server decodes it with
    regions = set(row.decode(request.data)) if rtype in (
        T.MARK_REGION, T.CLEAR_REGION, T.FLUSH) else set()  # fmt: skip
    mine = marked.setdefault(key, set())
    if rtype == T.RESUME and not was_resumed:
        mine.clear()  # a (re)loaded log: the kernel's earlier marks are gone with its writes
    elif rtype in (T.MARK_REGION, T.FLUSH) and reply.error == 0 and was_resumed:
        mine |= regions
    elif rtype == T.CLEAR_REGION and reply.error == 0:
        mine -= regions
    elif rtype == T.IS_CLEAN and reply.error == 0:
        region = row.decode(request.data)[0]
        if region in mine:
            assert S64.unpack(reply.data)[0] == 0, f"marked region {region} is clean"
    for region in mine:
        assert not entry.log.clean[region], f"marked region {region} recorded clean"


TARGETS: dict[str, Target] = {
    "wire": check_wire,
    "ctr": check_ctr,
    "messages": check_messages,
    "group": check_group,
    "checkpoint": check_checkpoint,
    "disklog": check_disklog,
    "capture": check_capture,
    "config": check_config,
    "statefile": check_statefile,
    "server": check_server,
}
