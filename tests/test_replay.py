"""dm-ulogd replay: dry-run a capture through a fresh server and compare the answers."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

import pytest

from ulogd.edges.capture import CaptureWriter, Direction, Packet
from ulogd.edges.capture_reader import read_capture
from ulogd.engine.actions import LogDevice
from ulogd.engine.server import Server
from ulogd.ops import cli, replay, replay_report
from ulogd.protocol import wire
from ulogd.protocol.spec import RequestType as T
from ulogd.state import disklog
from ulogd.state.statefile import StateDir
from ulogd.testing.driver import InProcess, LogDriver

REPO = Path(__file__).resolve().parents[1]
CAPTURES = REPO / "captures"
CORE = "16384 clustered-core 2048"  # 8 regions


class Recorder:
    """A link into an in-process server that records every datagram, like --capture."""

    def __init__(self, server: Server, writer: CaptureWriter) -> None:
        self.inner = InProcess(server)
        self.writer = writer

    def request(self, datagram: bytes) -> bytes:
        replies = self.send(datagram)
        assert len(replies) == 1
        return replies[0]

    def send(self, datagram: bytes) -> list[bytes]:
        self.writer.record(Direction.TO_DAEMON, datagram)
        replies = self.inner.exchange(datagram)
        for reply in replies:
            self.writer.record(Direction.FROM_DAEMON, reply)
        return replies


def record(path: Path, session: Callable[[Recorder], None], server: Server | None = None) -> Path:
    writer = CaptureWriter(path, background=False)
    try:
        session(Recorder(server or Server(), writer))
    finally:
        writer.close()
    return path


def lifecycle(link: Recorder, uuid: str = "LVM-replay-life", luid: int = 0x10) -> None:
    d = LogDriver(link, uuid=uuid, luid=luid)
    d.create(CORE)
    d.sync_count()
    d.resync_all()
    d.mark([1, 3])
    d.flush()
    d.in_sync(3)
    d.clear([1, 3])
    d.flush()
    d.status_info()
    d.ok(T.STATUS_TABLE)
    d.ok(T.PRESUSPEND)
    d.ok(T.POSTSUSPEND)
    d.ok(T.RESUME)
    d.ok(T.IS_REMOTE_RECOVERING, struct.pack("=Q", 2))
    d.ok(T.IS_CLEAN, struct.pack("=Q", 2))
    # reload: a new luid for the same uuid carries the state over
    new = LogDriver(link, uuid=uuid, luid=luid + 1)
    assert not new.ctr(CORE).error
    new.ok(T.GET_REGION_SIZE)
    d.ok(T.PRESUSPEND)
    d.ok(T.POSTSUSPEND)
    new.ok(T.RESUME)
    d.ok(T.DTR)
    new.sync_count()
    new.ok(T.PRESUSPEND)
    new.ok(T.POSTSUSPEND)
    new.ok(T.DTR)


def packets_of(path: Path) -> list[Packet]:
    return list(read_capture(path))


def rewrite(path: Path, packets: Iterator[Packet] | list[Packet]) -> Path:
    writer = CaptureWriter(path, background=False)
    for pkt in packets:
        writer.record(pkt.direction, pkt.data, pkt.timestamp_ns)
    writer.close()
    return path


def run_cli(*argv: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = cli.main(["replay", *argv])
    out, err = capsys.readouterr()
    return status, out, err


# ------------------------------------------------------------------------------ round trips
def test_in_process_lifecycle_replays_without_mismatch(tmp_path: Path) -> None:
    cap = record(tmp_path / "life.pcapng", lifecycle)
    report = replay.replay([cap])
    assert report.exit_status == replay_report.EXIT_OK
    assert report.total(replay.MISMATCH) == 0
    assert report.total(replay.UNVERIFIABLE) == 0
    assert report.total(replay.UNANSWERED) == 0
    requests = sum(p.direction is Direction.TO_DAEMON for p in packets_of(cap))
    assert report.replayed == requests == report.total(replay.MATCH)
    assert report.counts["CTR"][replay.MATCH] == 2
    assert report.counts["DTR"][replay.MATCH] == 2
    assert report.counts["SET_REGION_SYNC"][replay.MATCH] == 8
    assert [info.origin for info in report.logs.values()] == ["capture", "capture"]
    assert all(info.removed for info in report.logs.values())


def test_several_logs_interleaved_and_replies_out_of_order(tmp_path: Path) -> None:
    """Replies are paired by seq, not by position: reorder them in the file."""
    cap = tmp_path / "two.pcapng"

    def session(link: Recorder) -> None:
        a = LogDriver(link, uuid="LVM-a", luid=1)
        b = LogDriver(link, uuid="LVM-b", luid=2)
        a.create(CORE)
        b.create("16384 clustered-core 1024")
        for _ in range(3):
            a.resync_work()
            b.sync_count()
            a.ok(T.SET_REGION_SYNC, struct.pack("=Qq", 0, 1))

    record(cap, session)
    pkts = packets_of(cap)
    # move every reply two packets later (after the next request), like concurrent requests
    reordered: list[Packet] = []
    held: list[Packet] = []
    for pkt in pkts:
        if pkt.direction is Direction.FROM_DAEMON:
            held.append(pkt)
            continue
        reordered.append(pkt)
        if len(held) > 1:
            reordered.append(held.pop(0))
    reordered += held
    shuffled = rewrite(tmp_path / "shuffled.pcapng", reordered)
    report = replay.replay([shuffled])
    assert report.total(replay.MISMATCH) == 0, report.render()
    assert report.total(replay.MATCH) == report.replayed == len(pkts) // 2
    assert report.orphan_replies == 0


# ------------------------------------------------------------------------------ mismatches
def test_altered_recorded_answer_is_a_mismatch(tmp_path: Path) -> None:
    cap = record(tmp_path / "life.pcapng", lifecycle)
    pkts = packets_of(cap)
    # the reply to the first GET_SYNC_COUNT: make it claim 5 regions in sync
    index = next(
        i
        for i, pkt in enumerate(pkts)
        if pkt.direction is Direction.TO_DAEMON
        and isinstance(req := wire.decode(pkt.data), wire.Request)
        and req.request_type == T.GET_SYNC_COUNT
    )
    reply = pkts[index + 1]
    original = wire.decode_reply(reply.data)
    assert original.data == struct.pack("=Q", 0)
    altered = reply.data[:-8] + struct.pack("=Q", 5)
    pkts[index + 1] = Packet(reply.number, reply.timestamp_ns, reply.direction, altered)
    bad = rewrite(tmp_path / "altered.pcapng", pkts)

    report = replay.replay([bad])
    assert report.exit_status == replay_report.EXIT_MISMATCH
    (mismatch,) = report.of(replay.MISMATCH)
    assert mismatch.type_name == "GET_SYNC_COUNT"
    assert mismatch.packet == index + 1  # packets are numbered from 1
    assert mismatch.recorded is not None and mismatch.replayed is not None
    assert mismatch.recorded.describe(T.GET_SYNC_COUNT) == "error 0, 5"
    assert mismatch.replayed.describe(T.GET_SYNC_COUNT) == "error 0, 0"
    assert mismatch.state is not None and "in_sync=0/8" in mismatch.state
    text = report.render()
    assert "MISMATCHES (1)" in text and "in_sync=0/8" in text and "RESULT: 1 mismatch" in text


def test_altered_error_and_missing_reply(tmp_path: Path) -> None:
    cap = record(tmp_path / "life.pcapng", lifecycle)
    pkts = packets_of(cap)
    # flip the error of the reply to MARK_REGION, drop the last reply
    for i, pkt in enumerate(pkts):
        req = wire.decode(pkt.data) if pkt.direction is Direction.TO_DAEMON else None
        if isinstance(req, wire.Request) and req.request_type == T.MARK_REGION:
            rep = pkts[i + 1]
            data = bytearray(rep.data)
            struct.pack_into("=i", data, wire.CURRENT.offsets["error"], -5)
            pkts[i + 1] = Packet(rep.number, rep.timestamp_ns, rep.direction, bytes(data))
            break
    assert pkts[-1].direction is Direction.FROM_DAEMON
    bad = rewrite(tmp_path / "bad.pcapng", pkts[:-1])
    report = replay.replay([bad])
    (mismatch,) = report.of(replay.MISMATCH)
    assert mismatch.type_name == "MARK_REGION"
    assert mismatch.request == "MARK_REGION regions [1, 3]"
    assert mismatch.recorded is not None and mismatch.recorded.error == -5
    (unanswered,) = report.of(replay.UNANSWERED)
    assert unanswered.type_name == "DTR"
    assert report.exit_status == replay_report.EXIT_MISMATCH


def test_status_strings_are_compared_exactly(tmp_path: Path) -> None:
    cap = record(tmp_path / "life.pcapng", lifecycle)
    raw = bytearray(cap.read_bytes())
    at = raw.find(b"1 clustered-core\0")
    assert at > 0
    raw[at : at + 17] = b"1 clustered-core "  # NUL -> space: same length, other string
    (tmp_path / "status.pcapng").write_bytes(raw)
    report = replay.replay([tmp_path / "status.pcapng"])
    (mismatch,) = report.of(replay.MISMATCH)
    assert mismatch.type_name == "STATUS_INFO"


# ------------------------------------------------------------------------------ damaged files
def test_truncated_file_names_the_packet(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cap = record(tmp_path / "life.pcapng", lifecycle)
    raw = cap.read_bytes()
    # cut in the middle of packet 7 (offsets: find the 7th EPB)
    offsets = _epb_offsets(raw)
    cut = tmp_path / "cut.pcapng"
    cut.write_bytes(raw[: offsets[6] + 20])
    report = replay.replay([cut])
    assert report.error_packet == 7
    assert "packet 7" in (report.error or "")
    assert report.exit_status == replay_report.EXIT_UNREADABLE
    assert report.replayed == 3  # requests 1, 3, 5 before the defect
    status, out, err = run_cli(str(cut), capsys=capsys)
    assert status == replay_report.EXIT_UNREADABLE
    assert "packet 7" in err and "Traceback" not in err + out
    assert "capture damaged" in out


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "empty file"),
        (b"GET / HTTP/1.1\r\n\r\n", "not a pcap or pcapng file"),
        (b"directory", "cannot read"),
    ],
)
def test_unreadable_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes | None, expected: str
) -> None:
    path = tmp_path / "bad.pcapng"
    if content == b"directory":
        path.mkdir()
    else:
        path.write_bytes(content)
    status, out, err = run_cli(str(path), "--json", capsys=capsys)
    assert status == replay_report.EXIT_UNREADABLE
    assert expected in err
    assert "Traceback" not in err
    doc = json.loads(out)
    assert doc["exit_status"] == replay_report.EXIT_UNREADABLE
    assert expected in doc["error"]["message"]


@pytest.mark.parametrize("fmt", [[], ["--json"]])
def test_missing_file_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fmt: list[str]
) -> None:
    cap = record(tmp_path / "life.pcapng", lifecycle)
    missing = tmp_path / "nope.pcapng"
    status, out, err = run_cli(str(cap), str(missing), *fmt, capsys=capsys)
    assert status == replay_report.EXIT_UNREADABLE
    assert out == ""
    assert err == f"dm-ulogd replay: {missing}: no such file\n"


def test_cli_subprocess_never_tracebacks_on_garbage(tmp_path: Path) -> None:
    path = tmp_path / "garbage.pcapng"
    path.write_bytes(b"\x0a\x0d\x0d\x0a" + b"\xff" * 40)
    proc = subprocess.run(
        [sys.executable, "-m", "ulogd", "replay", str(path)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == replay_report.EXIT_UNREADABLE
    assert "packet 1" in proc.stderr
    assert "Traceback" not in proc.stderr


def _epb_offsets(raw: bytes) -> list[int]:
    offsets = []
    pos = 0
    while pos + 8 <= len(raw):
        btype, length = struct.unpack_from("<II", raw, pos)
        if btype == 6:
            offsets.append(pos)
        pos += length
    return offsets


# ------------------------------------------------------------------------------ mid-stream
def test_capture_starting_mid_stream_is_unverifiable_not_a_bug(tmp_path: Path) -> None:
    cap = record(tmp_path / "life.pcapng", lifecycle)
    pkts = packets_of(cap)
    # start after the resync: the first request is a GET_RESYNC_WORK/SET_REGION_SYNC...
    tail = rewrite(tmp_path / "tail.pcapng", pkts[40:])
    report = replay.replay([tail])
    assert report.exit_status == replay_report.EXIT_OK
    assert report.total(replay.MISMATCH) == 0
    assert report.total(replay.UNVERIFIABLE) > 0
    assert all(o.reason == replay.MID_STREAM for o in report.of(replay.UNVERIFIABLE))
    # the unknown log got -ESRCH from the fresh server
    first = report.of(replay.UNVERIFIABLE)[0]
    assert first.replayed is not None and first.replayed.error == -3
    origins = {info.luid: info.origin for info in report.logs.values()}
    assert origins[0x10] == replay.MID_STREAM
    # the reload (new luid) is constructed in the capture but inherits the unknown history
    assert report.logs[("LVM-replay-life", 0x11)].taint == replay.MID_STREAM
    assert "starts mid-stream" in report.render()


def test_daemon_restart_across_two_files(tmp_path: Path) -> None:
    """File 1: a daemon with a state directory; file 2: its successor after kill -9."""
    state = StateDir(tmp_path / "run" / "logs")
    first = Server(state_dir=state)
    holder: dict[str, LogDriver] = {}

    def before(link: Recorder) -> None:
        d = holder["d"] = LogDriver(link, uuid="LVM-restart", luid=7)
        d.create(CORE)
        d.resync_work()
        d.ok(T.SET_REGION_SYNC, struct.pack("=Qq", 0, 1))
        d.ok(T.SET_REGION_SYNC, struct.pack("=Qq", 1, 1))
        d.mark([4])
        d.flush()

    record(tmp_path / "one.pcapng", before, first)
    second = Server(state_dir=state)  # the first is abandoned as by SIGKILL
    second.restore(state.load_all())

    def after(link: Recorder) -> None:
        d = holder["d"]
        d.link = link
        assert not d.ctr(CORE, reconnect=True).error
        d.ok(T.RESUME)
        assert d.sync_count() == 2
        d.resync_all()
        d.status_info()
        d.ok(T.PRESUSPEND)
        d.ok(T.POSTSUSPEND)
        d.ok(T.DTR)

    record(tmp_path / "two.pcapng", after, second)
    report = replay.replay([tmp_path / "one.pcapng", tmp_path / "two.pcapng"])
    assert report.restarts == 1
    assert report.total(replay.MISMATCH) == 0, report.render()
    assert report.total(replay.UNVERIFIABLE) == 0, report.render()
    assert report.exit_status == replay_report.EXIT_OK

    alone = replay.replay([tmp_path / "two.pcapng"])
    assert alone.exit_status == replay_report.EXIT_OK
    assert alone.total(replay.UNVERIFIABLE) > 0  # GET_SYNC_COUNT: 2 recorded, 0 replayed
    assert alone.logs[("LVM-restart", 7)].origin == replay.MID_STREAM


# ------------------------------------------------------------------------------ disk logs
def _disk_server(image: bytes | None = None) -> Server:
    def opener(arg: str) -> LogDevice:
        assert arg == "/dev/loop4"
        device = disklog.MemoryDiskLog(
            1 << 20 if image is None else None, data=image, rdev=(7, 4), path=arg
        )
        return cast(LogDevice, device)

    return Server(open_device=opener)


def _disk_session(link: Recorder) -> None:
    d = LogDriver(link, uuid="LVM-disk", luid=3)
    d.create("16384 clustered-disk /dev/loop4 256")
    d.resync_all()
    d.mark([2])
    d.flush()
    d.clear([2])
    d.flush()
    d.status_info()
    d.ok(T.STATUS_TABLE)
    d.ok(T.PRESUSPEND)
    d.ok(T.POSTSUSPEND)
    d.ok(T.DTR)


def test_disk_log_on_a_fresh_device_replays_and_device_numbers_map(tmp_path: Path) -> None:
    cap = record(tmp_path / "disk.pcapng", _disk_session, _disk_server())
    report = replay.replay([cap])
    assert report.total(replay.MISMATCH) == 0, report.render()
    assert report.total(replay.UNVERIFIABLE) == 0
    assert report.counts["STATUS_INFO"][replay.MATCH] == 1
    notes = "\n".join(report.notes)
    assert "/dev/loop4 was 7:4 when captured" in notes
    assert "content before the capture is unknown" in notes


def test_disk_log_with_unknown_prior_content_is_unverifiable(tmp_path: Path) -> None:
    # the real device already held a valid log: regions 0-3 clean (in sync), the rest not
    from bitarray import bitarray

    bits = bitarray(64, endian="little")
    bits.setall(0)
    bits[0:4] = 1
    extents = disklog.plan_write(bits, 64, None, 512)
    image = bytearray(1 << 20)
    for offset, data in extents:
        image[offset : offset + len(data)] = data
    cap = record(tmp_path / "disk.pcapng", _disk_session, _disk_server(bytes(image)))
    report = replay.replay([cap])
    assert report.exit_status == replay_report.EXIT_OK
    assert report.total(replay.MISMATCH) == 0
    unverifiable = report.of(replay.UNVERIFIABLE)
    assert unverifiable and {o.reason for o in unverifiable} == {replay.DISK_CONTENT}
    assert report.logs[("LVM-disk", 3)].taint == replay.DISK_CONTENT


def test_disk_log_recreated_reads_back_what_the_replay_wrote(tmp_path: Path) -> None:
    """DTR and a new CTR on the same device: the second RESUME reads the replay's own image,
    so its answers are verified (not unverifiable)."""
    store = disklog.MemoryDiskLog(1 << 20, rdev=(7, 4))

    class Handle:
        block_size = 512
        rdev: tuple[int, int] | None = (7, 4)
        size_bytes = store.size_bytes

        def read(self, n: int) -> bytes:
            return store.read(n)

        def write_extents(self, extents: list[tuple[int, bytes]], flush: bool = True) -> None:
            store.write_extents(extents, flush)

        def close(self) -> None:
            pass

    server = Server(open_device=lambda arg: Handle())

    def session(link: Recorder) -> None:
        first = LogDriver(link, uuid="LVM-disk", luid=3)
        first.create("16384 clustered-disk 7:4 256 nosync")  # ignores the device's content
        first.mark([5])
        first.flush()
        first.ok(T.PRESUSPEND)
        first.ok(T.POSTSUSPEND)
        first.ok(T.DTR)
        d = LogDriver(link, uuid="LVM-disk2", luid=9)
        d.create("16384 clustered-disk 7:4 256")  # reads what the first one wrote
        assert d.sync_count() == 63  # region 5 was marked, never cleared
        d.ok(T.DTR)

    cap = record(tmp_path / "disk2.pcapng", session, server)
    report = replay.replay([cap])
    assert report.total(replay.MISMATCH) == 0, report.render()
    assert report.total(replay.UNVERIFIABLE) == 0, report.render()
    # now pretend the second log answered differently: a real mismatch, not unverifiable
    pkts = packets_of(cap)
    last_count = max(
        i
        for i, pkt in enumerate(pkts)
        if pkt.direction is Direction.TO_DAEMON
        and isinstance(req := wire.decode(pkt.data), wire.Request)
        and req.request_type == T.GET_SYNC_COUNT
    )
    rep = pkts[last_count + 1]
    pkts[last_count + 1] = Packet(
        rep.number, rep.timestamp_ns, rep.direction, rep.data[:-8] + struct.pack("=Q", 7)
    )
    report = replay.replay([rewrite(tmp_path / "alt.pcapng", pkts)])
    assert [o.type_name for o in report.of(replay.MISMATCH)] == ["GET_SYNC_COUNT"]


# ------------------------------------------------------------------------------ rejected
def test_rejected_datagrams_are_replayed(tmp_path: Path) -> None:
    def session(link: Recorder) -> None:
        d = LogDriver(link, uuid="LVM-junk", luid=1)
        d.create(CORE)
        good = d.datagram(T.IN_SYNC, struct.pack("=Q", 1), seq=900)
        bad_size = bytearray(good)
        struct.pack_into("=I", bad_size, wire.CURRENT.offsets["data_size"], 3)
        link.send(bytes(bad_size))  # data_size disagrees with cn_msg.len: -EINVAL
        unknown = bytearray(d.datagram(T.IN_SYNC, struct.pack("=Q", 1), seq=901))
        struct.pack_into("=I", unknown, wire.CURRENT.offsets["request_type"], 99)
        link.send(bytes(unknown))
        link.send(b"\x01\x02")  # too short to answer
        d.status_info()

    cap = record(tmp_path / "junk.pcapng", session)
    report = replay.replay([cap])
    assert report.counts[replay.REJECTED][replay.MATCH] == 3
    assert report.exit_status == replay_report.EXIT_OK
    # a recorded reply to junk that the replay would not send is a mismatch
    pkts = packets_of(cap)
    short = next(i for i, pkt in enumerate(pkts) if pkt.data == b"\x01\x02")
    forged = wire.encode_ack(0, -22)  # an answer to the 30 zero bytes below (cn_msg.seq 0)
    pkts.insert(short + 1, Packet(0, pkts[short].timestamp_ns, Direction.FROM_DAEMON, forged))
    pkts[short] = Packet(0, pkts[short].timestamp_ns, Direction.TO_DAEMON, b"\0" * 30)
    report = replay.replay([rewrite(tmp_path / "junk2.pcapng", pkts)])
    assert report.counts[replay.REJECTED][replay.MISMATCH] == 1
    (m,) = report.of(replay.MISMATCH)
    assert m.request.startswith("rejected: ")


# ------------------------------------------------------------------------------ filters, CLI
def test_until_and_log_filters(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def session(link: Recorder) -> None:
        lifecycle(link, "LVM-first-log", 1)
        lifecycle(link, "LVM-second-log", 5)

    cap = record(tmp_path / "two.pcapng", session)
    total = sum(p.direction is Direction.TO_DAEMON for p in packets_of(cap))
    both = replay.replay([cap])
    only = replay.replay([cap], log_filter="LVM-second-log")
    tail = replay.replay([cap], log_filter="ond-log")
    assert both.replayed == total
    assert only.replayed == tail.replayed == total // 2
    assert {k[0] for k in only.logs} == {"LVM-second-log"}
    assert only.skipped["requests of other logs (--log)"] == total // 2
    assert only.total(replay.MISMATCH) == 0
    first_ten = replay.replay([cap], until=replay_report.parse_until("10"))
    assert first_ten.replayed == 5
    assert first_ten.orphan_replies == 0  # the replies after the limit answer skipped requests
    status, out, _ = run_cli(
        str(cap), "--until", "20", "--log", "LVM-first-log", "--json", capsys=capsys
    )
    doc = json.loads(out)
    assert status == 0 and doc["replayed"] == 10 and doc["totals"]["match"] == 10
    assert doc["counts"]["CTR"]["match"] == 1


def test_log_filter_matching_nothing_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cap = record(tmp_path / "life.pcapng", lifecycle)
    report = replay.replay([cap], log_filter="LVM-not-there")
    assert report.replayed == 0 and report.nothing_matched
    assert report.exit_status == replay_report.EXIT_NO_MATCH
    status, out, _ = run_cli(str(cap), "--log", "LVM-not-there", capsys=capsys)
    assert status == replay_report.EXIT_NO_MATCH
    assert out.splitlines()[-1] == "RESULT: nothing compared: no log matches --log 'LVM-not-there'"
    assert "RESULT: OK" not in out
    status, out, _ = run_cli(str(cap), "--log", "LVM-not-there", "--json", capsys=capsys)
    assert status == json.loads(out)["exit_status"] == replay_report.EXIT_NO_MATCH


def test_parse_until() -> None:
    assert replay_report.parse_until("42") == replay_report.Until(packet=42)
    assert replay_report.parse_until("1.5s") == replay_report.Until(seconds=1.5)
    stamp = replay_report.parse_until("2026-01-02T03:04:05+00:00").timestamp_ns
    assert stamp == 1767323045 * 10**9
    with pytest.raises(ValueError, match="--until"):
        replay_report.parse_until("soon")


def test_until_time(tmp_path: Path) -> None:
    cap = record(tmp_path / "life.pcapng", lifecycle)
    pkts = packets_of(cap)
    base = 1_700_000_000 * 10**9
    timed = [
        Packet(p.number, base + i * 10**8, p.direction, p.data) for i, p in enumerate(pkts)
    ]  # 0.1 s apart
    path = rewrite(tmp_path / "timed.pcapng", timed)
    assert replay.replay([path], until=replay_report.parse_until("0.95s")).replayed == 5
    until = replay_report.Until(timestamp_ns=base + 3 * 10**8)
    assert replay.replay([path], until=until).replayed == 2


def test_cli_text_report_and_bad_until(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cap = record(tmp_path / "life.pcapng", lifecycle)
    status, out, _ = run_cli(str(cap), capsys=capsys)
    assert status == 0
    assert "request" in out and "GET_RESYNC_WORK" in out and "RESULT: OK" in out
    line = next(x for x in out.splitlines() if x.startswith("SET_REGION_SYNC"))
    assert line.split() == ["SET_REGION_SYNC", "8", "8", "0", "0", "0"]
    status, _, err = run_cli(str(cap), "--until", "tomorrow", capsys=capsys)
    assert status == 2 and "--until" in err


def test_legacy_layout(tmp_path: Path) -> None:
    def session(link: Recorder) -> None:
        for seq, (rtype, data) in enumerate(
            [
                (T.CTR, CORE.encode()),
                (T.GET_REGION_SIZE, b""),
                (T.RESUME, b""),
                (T.GET_SYNC_COUNT, b""),
                (T.STATUS_INFO, b""),
            ],
            start=100,
        ):
            link.send(
                wire.encode_request(
                    rtype, uuid="LVM-old", seq=seq, data=data, layout=wire.LEGACY_2009
                )
            )

    cap = record(tmp_path / "old.pcapng", session, Server(layout=wire.LEGACY_2009))
    report = replay.replay([cap], layout=wire.LEGACY_2009)
    assert report.total(replay.MATCH) == 5 and report.exit_status == 0
    wrong = replay.replay([cap])  # read with the wrong layout: the answers differ
    assert wrong.exit_status == replay_report.EXIT_MISMATCH


# ------------------------------------------------------------------------------ shipped captures
SHIPPED = [
    ["lifecycle.pcapng"],
    ["integrated-flush.pcapng"],
    ["restart-1.pcapng", "restart-2.pcapng"],
    ["clustered-disk.pcapng"],
]


@pytest.mark.parametrize("names", SHIPPED, ids=lambda names: "+".join(names))
def test_shipped_captures_replay_without_mismatch(names: list[str]) -> None:
    paths = [CAPTURES / name for name in names]
    for path in paths:
        assert path.exists(), f"{path} is missing: run tools/make-captures"
        assert path.stat().st_size < 200_000
    report = replay.replay(paths)
    assert report.error is None
    assert report.total(replay.MISMATCH) == 0, report.render()
    assert report.total(replay.UNVERIFIABLE) == 0, report.render()
    assert report.total(replay.UNANSWERED) == 0, report.render()
    assert report.replayed > 20
    assert report.total(replay.MATCH) == report.replayed
    assert all(info.origin in ("capture", "restored") for info in report.logs.values())


def test_shipped_lifecycle_contents() -> None:
    report = replay.replay([CAPTURES / "lifecycle.pcapng"])
    for name in (
        "CTR",
        "GET_REGION_SIZE",
        "RESUME",
        "GET_RESYNC_WORK",
        "SET_REGION_SYNC",
        "MARK_REGION",
        "CLEAR_REGION",
        "FLUSH",
        "STATUS_INFO",
        "PRESUSPEND",
        "POSTSUSPEND",
        "DTR",
    ):
        assert report.counts[name][replay.MATCH] > 0, name
    assert report.counts["CTR"][replay.MATCH] == 2  # create and reload
    assert len(report.logs) == 2 and all(info.removed for info in report.logs.values())


def test_shipped_restart_second_half_alone_starts_mid_stream() -> None:
    report = replay.replay([CAPTURES / "restart-2.pcapng"])
    assert report.exit_status == replay_report.EXIT_OK
    (info,) = report.logs.values()
    assert info.origin == replay.MID_STREAM
    assert any("starts mid-stream" in note for note in report.notes)


def test_altered_shipped_capture_is_reported(tmp_path: Path) -> None:
    raw = bytearray((CAPTURES / "lifecycle.pcapng").read_bytes())
    at = raw.find(b"1 clustered-core\0")
    assert at > 0, "the lifecycle capture holds a STATUS_INFO reply"
    raw[at] = ord("2")
    copy = tmp_path / "lifecycle-altered.pcapng"
    copy.write_bytes(raw)
    report = replay.replay([copy])
    assert report.exit_status == replay_report.EXIT_MISMATCH
    (m,) = report.of(replay.MISMATCH)
    assert m.type_name == "STATUS_INFO"
    assert m.recorded is not None and m.recorded.data.startswith(b"2 clustered-core")
    assert m.state is not None and m.state.startswith("clustered-core regions=8")


def test_state_shown_is_the_one_after_the_request_even_when_the_reply_comes_late(
    tmp_path: Path,
) -> None:
    cap = record(tmp_path / "life.pcapng", lifecycle)
    pkts = packets_of(cap)
    index = next(
        i
        for i, pkt in enumerate(pkts)
        if pkt.direction is Direction.TO_DAEMON
        and isinstance(req := wire.decode(pkt.data), wire.Request)
        and req.request_type == T.GET_SYNC_COUNT
    )
    reply = pkts.pop(index + 1)
    altered = Packet(0, reply.timestamp_ns, reply.direction, reply.data[:-8] + b"\x09" + bytes(7))
    pkts.append(altered)  # the (wrong) answer is recorded only at the very end
    report = replay.replay([rewrite(tmp_path / "late.pcapng", pkts)])
    (m,) = report.of(replay.MISMATCH)
    assert m.type_name == "GET_SYNC_COUNT" and m.recorded is not None
    assert m.recorded.packet == len(pkts)
    assert m.state is not None and "in_sync=0/8" in m.state and "resumed=1" in m.state


def test_shipped_disk_capture_reads_back_its_own_image(tmp_path: Path) -> None:
    """The second disk log reads what the first wrote: an altered answer of it is a real
    mismatch (the replay knows the image), and the device path/number is noted."""
    path = CAPTURES / "clustered-disk.pcapng"
    report = replay.replay([path])
    assert [info.type_word for info in report.logs.values()] == ["clustered-disk"] * 2
    assert all(info.taint is None for info in report.logs.values())
    assert any("/dev/loop0 was 7:0 when captured" in note for note in report.notes)
    pkts = packets_of(path)
    second_ctr = [
        i
        for i, pkt in enumerate(pkts)
        if pkt.direction is Direction.TO_DAEMON
        and isinstance(req := wire.decode(pkt.data), wire.Request)
        and req.request_type == T.CTR
    ][1]
    index = max(  # the last GET_SYNC_COUNT (dmsetup status), after the RESUME read the disk
        i
        for i, pkt in enumerate(pkts)
        if i > second_ctr
        and pkt.direction is Direction.TO_DAEMON
        and isinstance(req := wire.decode(pkt.data), wire.Request)
        and req.request_type == T.GET_SYNC_COUNT
    )
    reply_at = next(
        j
        for j in range(index + 1, len(pkts))
        if pkts[j].direction is Direction.FROM_DAEMON
        and wire.decode_reply(pkts[j].data).seq == wire.decode(pkts[index].data).seq  # type: ignore[union-attr]
    )
    rep = pkts[reply_at]
    assert wire.decode_reply(rep.data).data == struct.pack("=Q", 64)
    pkts[reply_at] = Packet(
        0, rep.timestamp_ns, rep.direction, rep.data[:-8] + struct.pack("=Q", 60)
    )
    report = replay.replay([rewrite(tmp_path / "disk-altered.pcapng", pkts)])
    (m,) = report.of(replay.MISMATCH)
    assert m.uuid == "ulogd-disk-again" and m.type_name == "GET_SYNC_COUNT"
    assert report.total(replay.UNVERIFIABLE) == 0
