"""The durable path of disk logs: a FLUSH that adds marks is on stable storage before it is
answered; a FLUSH that only records clears is written without waiting for the device's cache.

Counted at the edge: the memory device counts durable and cached writes, and the file device
the system calls that wait for stable storage (``RWF_DSYNC`` writes, ``fdatasync``).  The last
test runs a real :class:`~ulogd.daemon.Daemon` (its disk worker thread performs the writes).
"""

from __future__ import annotations

import threading
from pathlib import Path

from ulogd import disklog
from ulogd.daemon import Daemon
from ulogd.server import Server
from ulogd.testing.driver import InProcess, LogDriver
from ulogd.transport.unixsock import UnixClient, UnixServerTransport

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
                counts.append((dev.flushes, dev.cached_writes))
        finally:
            daemon._stop = True
            with UnixClient(str(tmp_path / "t.sock")) as link:  # wake the loop up
                link.send(b"\0" * 16)

    client = threading.Thread(target=kernel)
    client.start()
    daemon.run()
    client.join(timeout=30)
    assert errors == [0] * 40
    (durable, cached), after = counts
    assert after == (durable + 10, cached + 10)
