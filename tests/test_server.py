"""The request engine: life cycle, unknown logs, reloads, disk logs and their failures."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from ulogd.engine.actions import DeviceError, DiskWrite, Send
from ulogd.engine.server import Server
from ulogd.protocol import spec as p
from ulogd.protocol import wire
from ulogd.protocol.spec import RequestType as T
from ulogd.state import disklog
from ulogd.state.statefile import StateDir
from ulogd.testing.driver import InProcess, LogDriver

CORE = "131072 clustered-core 1024"  # 128 regions


def memory_devices(size: int = 1 << 20) -> tuple[dict[str, disklog.MemoryDiskLog], object]:
    devices: dict[str, disklog.MemoryDiskLog] = {}

    def open_device(arg: str) -> disklog.MemoryDiskLog:
        if arg == "/dev/missing":
            raise DeviceError(2, "no such device")
        previous = devices.get(arg)
        if previous is None:
            devices[arg] = disklog.MemoryDiskLog(size, rdev=(7, len(devices) + 2))
        elif previous.closed:  # re-open: same bytes, as a block device would keep them
            devices[arg] = disklog.MemoryDiskLog(data=previous.data, rdev=previous.rdev)
        return devices[arg]

    return devices, open_device


@pytest.fixture
def server() -> Server:
    return Server(open_device=memory_devices()[1])  # type: ignore[arg-type]


def test_mirror_life_cycle(server: Server) -> None:
    d = LogDriver(InProcess(server))
    assert d.ctr(CORE).error == 0
    assert struct.unpack("=Q", d.ok(T.GET_REGION_SIZE))[0] == 1024
    assert d.sync_count() == 0
    d.ok(T.RESUME)
    assert d.resync_all() == 128 and d.sync_count() == 128
    assert d.mark([5]).error == 0 and d.flush().error == 0
    assert d.is_clean(5) == 0
    assert d.clear([5]).error == 0 and d.is_clean(5) == 1
    assert d.status_info() == "1 clustered-core"
    status = d.call(T.STATUS_INFO)
    assert status.data.endswith(b"\0")  # the NUL is counted in data_size
    d.ok(T.PRESUSPEND)
    d.ok(T.POSTSUSPEND)
    d.ok(T.RESUME)
    assert d.sync_count() == 128
    d.ok(T.DTR)
    assert d.call(T.GET_SYNC_COUNT).error == p.ESRCH


def test_unknown_log_is_answered_esrch(server: Server) -> None:
    d = LogDriver(InProcess(server), uuid="LVM-never-constructed")
    for rtype, data in [(T.IN_SYNC, bytes(8)), (T.FLUSH, b""), (T.RESUME, b"")]:
        assert d.call(rtype, data).error == p.ESRCH


def test_ctr_errors_reach_the_kernel(server: Server) -> None:
    d = LogDriver(InProcess(server))
    assert d.ctr("100 core 3").error == p.EINVAL
    assert d.ctr("100 clustered-disk /dev/missing 2").error == -2
    d2 = LogDriver(InProcess(server), uuid="")
    assert d2.ctr(CORE).error == p.EINVAL


def test_reconnect_ctr_reattaches_without_device_name(server: Server) -> None:
    d = LogDriver(InProcess(server))
    first = d.ctr("131072 clustered-disk /dev/log0 1024")
    assert first.error == 0 and first.data == b"/dev/log0\0"  # protocol >= 2
    again = d.ctr("131072 clustered-disk /dev/log0 1024", reconnect=True)
    assert again.error == 0 and again.data == b""  # the kernel gave it no reply buffer
    assert d.ctr("131072 clustered-disk /dev/log0 2048").error == p.EEXIST


def test_version_1_ctr_gets_no_device_name(server: Server) -> None:
    d = LogDriver(InProcess(server), version=1)
    assert d.ctr("131072 clustered-disk /dev/log0 1024").data == b""


def test_reload_carries_state_over_without_full_resync(server: Server) -> None:
    old = LogDriver(InProcess(server), luid=1)
    old.create(CORE)
    old.resync_all()
    new = LogDriver(InProcess(server), luid=2)
    assert new.ctr(CORE).error == 0
    assert new.sync_count() == 128  # right after the load, before the swap
    old.ok(T.PRESUSPEND)
    old.ok(T.POSTSUSPEND)
    new.ok(T.RESUME)
    old.ok(T.DTR)
    assert new.sync_count() == 128 and new.resync_work() == (0, 0)


def test_reload_with_sync_keyword_forces_a_full_resync(server: Server) -> None:
    old = LogDriver(InProcess(server), luid=1)
    old.create(CORE)
    old.resync_all()
    new = LogDriver(InProcess(server), luid=2)
    new.ctr(CORE + " sync")
    assert new.sync_count() == 0


def test_disk_log_is_read_at_resume_and_written_on_flush() -> None:
    devices, opener = memory_devices()
    server = Server(open_device=opener)  # type: ignore[arg-type]
    d = LogDriver(InProcess(server))
    d.create("131072 clustered-disk /dev/log0 1024")
    dev = devices["/dev/log0"]
    image = disklog.parse_image(dev.read(disklog.io_size(128, 512)), 128)
    assert image.valid and image.nr_regions == 128 and image.clean.count() == 0
    d.resync_all()
    image = disklog.parse_image(dev.read(1536), 128)
    assert image.clean.count() == 128
    before = len(dev.writes)
    d.mark([3])
    d.flush()
    assert len(dev.writes) == before + 1
    assert not disklog.parse_image(dev.read(1536), 128).clean[3]
    d.flush()  # nothing changed: nothing written
    assert len(dev.writes) == before + 1
    assert d.status_info() == "3 clustered-disk 7:2 A"


def test_disk_log_honours_an_existing_log() -> None:
    _devices, opener = memory_devices()
    first = Server(open_device=opener)  # type: ignore[arg-type]
    d = LogDriver(InProcess(first))
    d.create("131072 clustered-disk /dev/log0 1024")
    d.resync_all()
    d.mark([9])
    d.flush()
    d.ok(T.DTR)
    second = Server(open_device=opener)  # type: ignore[arg-type]
    d2 = LogDriver(InProcess(second))
    d2.create("131072 clustered-disk /dev/log0 1024")
    assert d2.sync_count() == 127 and d2.in_sync(9) == 0  # only the marked region is resynced


def test_disk_write_failure_gives_eio_and_status_d_and_other_logs_go_on() -> None:
    devices, opener = memory_devices()
    server = Server(open_device=opener)  # type: ignore[arg-type]
    disk = LogDriver(InProcess(server), uuid="LVM-disk")
    core = LogDriver(InProcess(server), uuid="LVM-core")
    disk.create("131072 clustered-disk /dev/log0 1024 nosync")
    core.create(CORE)
    devices["/dev/log0"].fail_writes()
    disk.mark([1])
    assert disk.flush().error == p.EIO
    assert disk.status_info().endswith(" D")
    assert core.mark([1]).error == 0 and core.flush().error == 0
    assert disk.flush().error == p.EIO  # still failing, still answered


def test_requests_for_a_log_wait_behind_its_disk_io_others_do_not() -> None:
    _devices, opener = memory_devices()
    server = Server(open_device=opener)  # type: ignore[arg-type]
    disk = LogDriver(InProcess(server), uuid="LVM-disk")
    core = LogDriver(InProcess(server), uuid="LVM-core")
    disk.create("131072 clustered-disk /dev/log0 1024 nosync")
    core.create(CORE)
    disk.mark([1])
    write = server.receive(disk.datagram(T.FLUSH, seq=500))
    assert len(write) == 1 and isinstance(write[0], DiskWrite)
    assert server.receive(disk.datagram(T.GET_SYNC_COUNT, seq=501)) == []  # queued
    served = server.receive(core.datagram(T.GET_SYNC_COUNT, seq=502))
    assert [wire.decode_reply(a.data).seq for a in served if isinstance(a, Send)] == [502]
    after = server.disk_done(write[0].token, None, None)
    assert [wire.decode_reply(a.data).seq for a in after if isinstance(a, Send)] == [500, 501]


def test_state_survives_a_new_server_on_the_same_state_dir(tmp_path: Path) -> None:
    first = Server(state_dir=StateDir(tmp_path))
    d = LogDriver(InProcess(first))
    d.create(CORE)
    for _ in range(50):
        _i, r = d.resync_work()
        d.set_region_sync(r, True)
        d.clear([r])
    _i, recovering = d.resync_work()  # handed out, not finished: the kernel is copying it
    d.mark([100])
    del first  # a crash: nothing is closed or saved on the way out
    second = Server(state_dir=StateDir(tmp_path))
    second.restore(second.state_dir.load_all())  # type: ignore[union-attr]
    d2 = LogDriver(InProcess(second))
    assert d2.ctr(CORE, reconnect=True).error == 0
    d2.ok(T.RESUME)
    assert d2.sync_count() == 50
    assert d2.resync_work() == (1, recovering)  # the same answer the old daemon would give
    assert d2.is_clean(100) == 0


def test_rejected_datagrams_are_answered_when_possible(server: Server) -> None:
    bad = wire.encode_request(T.IN_SYNC, uuid="u", seq=4, data=bytes(3))
    (reply,) = server.receive(bad)
    assert isinstance(reply, Send) and wire.decode_reply(reply.data).error == p.EINVAL
    assert server.receive(b"\x00" * 10) == []
    assert server.receive(wire.encode_request(T.IN_SYNC, uuid="u", seq=4, data=bytes(8)), 77) == []


@pytest.mark.parametrize("regions", [8, 63, 65, 4097])
def test_disk_log_geometries_that_are_not_whole_words(regions: int) -> None:
    """The bitmaps are padded to 64-bit words; the on-disk bitmap must not be."""
    devices, opener = memory_devices()
    server = Server(open_device=opener)  # type: ignore[arg-type]
    d = LogDriver(InProcess(server))
    d.create(f"{regions * 2} clustered-disk /dev/log0 2 nosync")
    d.mark([regions - 1])
    assert d.flush().error == 0
    image = disklog.parse_image(devices["/dev/log0"].read(disklog.io_size(regions, 512)), regions)
    assert image.valid and image.nr_regions == regions
    assert image.clean.count() == regions - 1 and not image.clean[regions - 1]
