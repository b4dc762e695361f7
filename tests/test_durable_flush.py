"""The durable path of disk logs: a FLUSH that adds marks is on stable storage before it is
answered; a FLUSH that only records clears is written without waiting for the device's cache.

Counted at the edge: the memory device counts durable and cached writes, and the file device
the system calls that wait for stable storage (``RWF_DSYNC`` writes, ``fdatasync``).  The last
test runs a real :class:`~ulogd.daemon.Daemon` (its disk worker thread performs the writes).
"""

from __future__ import annotations

import struct
import threading
from pathlib import Path

from ulogd.edges.daemon import Daemon
from ulogd.edges.transport.unixsock import UnixClient, UnixServerTransport
from ulogd.engine.actions import DiskWrite, Send
from ulogd.engine.server import Server
from ulogd.protocol import wire
from ulogd.protocol.spec import RequestType as T
from ulogd.state import disklog
from ulogd.testing.driver import InProcess, LogDriver

DISK = "131072 clustered-disk /dev/log0 1024 nosync"  # 128 regions


def test_marks_flush_durably_clears_only_flush_cached() -> None:
    dev = disklog.MemoryDiskLog(1 << 20)
    d = LogDriver(InProcess(Server(open_device=lambda _arg: dev)))
    d.create(DISK)
    durable, cached = dev.flushes, dev.cached_writes
    assert d.mark([3]).error == 0 and d.flush().error == 0
    assert (dev.flushes, dev.cached_writes) == (durable + 1, cached)
    assert d.clear([3]).error == 0 and d.flush().error == 0
    assert (dev.flushes, dev.cached_writes) == (durable + 1, cached + 1)
    image = disklog.parse_image(dev.read(disklog.io_size(128, 512)), 128)
    assert image.clean[3]  # the clear did reach the device
    assert d.flush(marks=[9]).error == 0  # integrated flush: its marks are durable too
    assert (dev.flushes, dev.cached_writes) == (durable + 2, cached + 1)


class Kernel:
    """Requests straight into a server, its actions returned as they come (no I/O done)."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.seq = 0

    def send(self, rtype: int, data: bytes = b"") -> list[object]:
        self.seq += 1
        datagram = wire.encode_request(rtype, uuid="LVM-behind", luid=5, seq=self.seq, data=data)
        return list(self.server.receive(datagram))


def replies(actions: list[object]) -> list[int]:
    return [wire.decode_reply(a.data).seq for a in actions if isinstance(a, Send)]


def test_a_clears_only_flush_is_answered_with_its_write_not_after_it() -> None:
    dev = disklog.MemoryDiskLog(1 << 20)
    server = Server(open_device=lambda _arg: dev)
    d = LogDriver(InProcess(server), uuid="LVM-behind", luid=5)
    d.create(DISK)
    k = Kernel(server)
    k.seq = 1000
    region = struct.pack("=Q", 3)
    k.send(T.MARK_REGION, region)
    marks = k.send(T.FLUSH)
    (write,) = marks  # a mark: the reply waits for the durable write
    assert isinstance(write, DiskWrite) and write.durable
    assert replies(server.disk_done(write.token, None, None)) == [k.seq]
    k.send(T.CLEAR_REGION, region)
    clears = k.send(T.FLUSH)
    behind = clears[0]
    assert isinstance(behind, DiskWrite) and not behind.durable
    assert replies(clears) == [k.seq]  # answered at once, the write queued before the reply
    # the hot path goes on while it is in flight; a DTR waits until it has landed
    assert replies(k.send(T.IN_SYNC, region)) == [k.seq]
    assert k.send(T.DTR) == []
    dtr = k.seq
    assert replies(server.disk_done(behind.token, None, None)) == [dtr]
    assert server.logs == {}


def test_a_failed_write_behind_makes_the_next_flush_write_everything_durably() -> None:
    dev = disklog.MemoryDiskLog(1 << 20)
    server = Server(open_device=lambda _arg: dev)
    d = LogDriver(InProcess(server), uuid="LVM-behind", luid=5)
    d.create(DISK)
    k = Kernel(server)
    k.seq = 1000
    region = struct.pack("=Q", 4)
    k.send(T.MARK_REGION, region)
    (write,) = k.send(T.FLUSH)
    server.disk_done(write.token, None, None)
    k.send(T.CLEAR_REGION, region)
    behind = k.send(T.FLUSH)[0]
    assert isinstance(behind, DiskWrite)
    assert server.disk_done(behind.token, None, OSError(5, "Input/output error")) == []
    (full,) = k.send(T.FLUSH)  # nothing changed since, but the device state is unknown
    assert isinstance(full, DiskWrite) and full.durable
    assert full.extents[0][0] == 0 and len(full.extents[0][1]) == disklog.io_size(128, 512)


def test_on_a_file_device_a_clears_only_flush_makes_no_sync_call(tmp_path: Path) -> None:
    path = tmp_path / "log.img"
    path.write_bytes(bytes(1 << 20))
    devices: list[disklog.DiskLogDevice] = []

    def open_device(_arg: str) -> disklog.DiskLogDevice:
        devices.append(disklog.DiskLogDevice.open(str(path)))
        return devices[-1]

    d = LogDriver(InProcess(Server(open_device=open_device)))
    d.create(DISK)
    (dev,) = devices
    syncs = dev.sync_calls
    assert syncs >= 1  # the whole unit written at RESUME, durably
    d.mark([5])
    d.flush()
    assert dev.sync_calls == syncs + 1
    d.clear([5])
    d.flush()
    assert dev.sync_calls == syncs + 1 and dev.cached_writes == 1
    assert disklog.parse_image(path.read_bytes(), 128).clean[5]
    dev.close()


def test_the_daemon_worker_keeps_the_durability_of_each_write(tmp_path: Path) -> None:
    dev = disklog.MemoryDiskLog(1 << 20)
    transport = UnixServerTransport(str(tmp_path / "t.sock"))
    daemon = Daemon(Server(open_device=lambda _arg: dev), transport)
    counts: list[tuple[int, int]] = []
    errors: list[int] = []

    def kernel() -> None:  # the loop must run on the main thread (signals)
        try:
            with UnixClient(str(tmp_path / "t.sock")) as link:
                d = LogDriver(link)
                d.create(DISK)
                counts.append((dev.flushes, dev.cached_writes))
                for r in range(10):
                    for reply in (d.mark([r]), d.flush(), d.clear([r]), d.flush()):
                        errors.append(reply.error)
        finally:
            daemon._stop = True
            with UnixClient(str(tmp_path / "t.sock")) as link:  # wake the loop up
                link.send(b"\0" * 16)

    client = threading.Thread(target=kernel)
    client.start()
    daemon.run()
    client.join(timeout=30)
    assert errors == [0] * 40
    ((durable, cached),) = counts
    # counted once the daemon stopped: a write-behind may land after its FLUSH is answered
    assert (dev.flushes, dev.cached_writes) == (durable + 10, cached + 10)
