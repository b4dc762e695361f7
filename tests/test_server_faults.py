"""Resource faults in CTR and DTR (issue 14, item 4): a read-only run directory, and the
descriptor limit (a real ``RLIMIT_NOFILE`` set on a daemon process with ``prlimit``).

The state directory is covered by a read-only bind mount of itself, as a file system that
went read-only would be.  The logs already open keep their writable mappings (through the
mount below), so they go on being served; what needs the directory — creating a state file,
removing one — fails with EROFS.  Every such request gets its error reply and one line, and
a log whose file could not be removed never comes back.
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from ulogd.engine.server import Server
from ulogd.protocol.spec import RequestType as T
from ulogd.state.statefile import StateDir
from ulogd.testing.driver import InProcess, LogDriver

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mount --bind)")

TEXT = "131072 core 1024 nosync"  # 128 regions


@contextmanager
def read_only(directory: Path) -> Iterator[None]:
    """``directory`` read-only (a bind mount of itself, remounted ro) for the duration."""
    subprocess.run(["mount", "--bind", str(directory), str(directory)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(directory)], check=True)
        yield
    finally:
        subprocess.run(["umount", str(directory)], check=True)


def fingerprint(server: Server) -> object:
    return sorted(
        (key, e.log.clean.tobytes(), e.log.sync.tobytes(), e.log.mine.tobytes(), e.log.scalars())
        for key, e in server.logs.items()
    )


@pytest.fixture
def logs_dir(tmp_path: Path) -> Path:
    return tmp_path / "logs"


@pytest.fixture
def served(logs_dir: Path) -> Iterator[tuple[Server, dict[str, LogDriver]]]:
    """Three resumed logs with marks of their own, on a real state directory."""
    server = Server(state_dir=StateDir(logs_dir))
    drivers = {}
    for i, name in enumerate(("LVM-keep-a", "LVM-gone-b", "LVM-keep-c")):
        d = LogDriver(InProcess(server), uuid=name, luid=0x100 + i)
        d.create(TEXT)
        assert d.mark([i, 40 + i]).error == 0 and d.flush().error == 0
        drivers[name] = d
    yield server, drivers
    server.close()


def restart(logs_dir: Path) -> Server:
    """The next daemon: a new server restoring what the state directory holds."""
    server = Server(state_dir=StateDir(logs_dir))
    assert server.restore(server.state_dir.load_all()) == []  # type: ignore[union-attr]
    return server


def errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_ctr_on_a_read_only_directory_is_answered_erofs_with_one_line(
    served: tuple[Server, dict[str, LogDriver]], logs_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server, drivers = served
    before = fingerprint(server)
    files = sorted(p.name for p in logs_dir.iterdir())
    newcomer = LogDriver(InProcess(server), uuid="LVM-new-d", luid=0x200)
    with read_only(logs_dir), caplog.at_level(logging.INFO, logger="ulogd"):
        caplog.clear()
        assert newcomer.ctr(TEXT).error == -errno.EROFS
        lines = errors(caplog)
        assert len(lines) == 1, lines
        assert lines[0].getMessage().startswith("[VM-new-d] CTR luid=0x200")
        assert "EROFS" in lines[0].getMessage() and lines[0].exc_info is None
        # the others are served as before, marks included
        assert drivers["LVM-keep-a"].mark([7]).error == 0
        assert drivers["LVM-keep-a"].clear([7]).error == 0
        assert newcomer.call(T.GET_SYNC_COUNT).error == -errno.ESRCH
    assert fingerprint(server) == before
    assert sorted(p.name for p in logs_dir.iterdir()) == files
    # once the directory is writable again the same CTR succeeds
    assert newcomer.ctr(TEXT).error == 0


def test_dtr_that_cannot_remove_the_file_is_answered_and_never_resurrected(
    served: tuple[Server, dict[str, LogDriver]], logs_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server, drivers = served
    gone = drivers["LVM-gone-b"]
    files = {p.name for p in logs_dir.iterdir()}
    with read_only(logs_dir), caplog.at_level(logging.INFO, logger="ulogd"):
        caplog.clear()
        assert gone.call(T.DTR).error == -errno.EROFS
        lines = errors(caplog)
        assert len(lines) == 1, lines
        message = lines[0].getMessage()
        assert message.startswith("[M-gone-b] DTR luid=0x101") and "EROFS" in message
        assert lines[0].exc_info is None
        assert gone.call(T.GET_SYNC_COUNT).error == -errno.ESRCH  # gone for the kernel
        # the file stays (the directory is read-only), the others' state is untouched
        assert {p.name for p in logs_dir.iterdir()} == files
        assert drivers["LVM-keep-c"].mark([9]).error == 0
        kept = fingerprint(server)
        assert [k for k, *_ in kept] == [("LVM-keep-a", 0x100), ("LVM-keep-c", 0x102)]  # type: ignore[misc]
        server.retry_removals()  # still read-only: fails quietly, stays pending
        assert len(server.unremoved) == 1 and len(errors(caplog)) == 1
    server.close()  # kill -9 equivalent for the state: the mappings are the state
    with caplog.at_level(logging.INFO, logger="ulogd"):
        successor = restart(logs_dir)
    try:
        assert fingerprint(successor) == kept
        assert sorted(successor.logs) == [("LVM-keep-a", 0x100), ("LVM-keep-c", 0x102)]
        assert len(list(logs_dir.iterdir())) == 2, "the tombstoned file was not removed"
        assert "destroyed before the restart: removed" in caplog.text
        # the kernel's reconnect CTR for the destroyed log finds nothing: a fresh log
        again = LogDriver(InProcess(successor), uuid="LVM-gone-b", luid=0x101)
        assert again.ctr(TEXT).error == 0
        assert again.is_clean(1) == 1 and again.is_clean(41) == 1  # not the old marks
    finally:
        successor.close()


def test_a_failed_removal_is_retried_once_the_directory_is_writable(
    served: tuple[Server, dict[str, LogDriver]], logs_dir: Path
) -> None:
    server, drivers = served
    with read_only(logs_dir):
        assert drivers["LVM-gone-b"].call(T.DTR).error == -errno.EROFS
    assert len(list(logs_dir.iterdir())) == 3
    server.retry_removals()
    assert server.unremoved == {}
    assert len(list(logs_dir.iterdir())) == 2


def test_a_retry_leaves_a_new_log_of_the_same_identity_alone(
    served: tuple[Server, dict[str, LogDriver]], logs_dir: Path
) -> None:
    server, drivers = served
    gone = drivers["LVM-gone-b"]
    with read_only(logs_dir):
        assert gone.call(T.DTR).error == -errno.EROFS
    pending = set(server.unremoved)
    # the same identity created again (the kernel reuses a luid): its file replaces the old
    server.unremoved, saved = {}, server.unremoved  # keep the CTR from retrying first
    assert gone.ctr(TEXT).error == 0
    server.unremoved = saved
    server.retry_removals()
    assert server.unremoved == {}
    assert all(p.exists() for p in pending), "the new log's file was removed"
    assert gone.is_clean(1) == 1  # a fresh log, not the destroyed one's marks
    successor = restart(logs_dir)
    try:
        assert ("LVM-gone-b", 0x101) in successor.logs
    finally:
        successor.close()


def test_a_dtr_whose_log_device_fails_to_close_still_removes_the_log(
    logs_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from ulogd.state import disklog

    class Sticky(disklog.MemoryDiskLog):
        def close(self) -> None:
            raise OSError(errno.EIO, "Input/output error")

    server = Server(state_dir=StateDir(logs_dir), open_device=lambda _p: Sticky(1 << 20))
    d = LogDriver(InProcess(server), uuid="LVM-sticky-device", luid=4)
    d.create("131072 disk /dev/fake 1024")
    with caplog.at_level(logging.INFO, logger="ulogd"):
        assert d.call(T.DTR).error == 0
    assert server.logs == {} and list(logs_dir.iterdir()) == []
    assert "closing the log device failed: EIO" in caplog.text
    assert restart(logs_dir).logs == {}


# ---------------------------------------------------------------------- a daemon process
def test_a_daemon_on_a_read_only_run_directory_answers_and_restarts_right(
    tmp_path: Path,
) -> None:
    from tests.test_control import DaemonProcess
    from ulogd.edges.transport.unixsock import UnixClient

    with DaemonProcess(tmp_path) as d, UnixClient(d.transport) as link:
        keep = LogDriver(link, uuid="LVM-daemon-keep", luid=1)
        gone = LogDriver(link, uuid="LVM-daemon-gone", luid=2)
        for driver in (keep, gone):
            driver.create(TEXT)
            assert driver.mark([5]).error == 0 and driver.flush().error == 0
        with read_only(d.run_dir / "logs"):
            newcomer = LogDriver(link, uuid="LVM-daemon-new", luid=3)
            assert newcomer.ctr(TEXT).error == -errno.EROFS
            assert gone.call(T.DTR).error == -errno.EROFS
            assert keep.mark([7]).error == 0  # the others are served, their state kept
            assert [e["uuid"] for e in d.request("status")["logs"]] == [keep.uuid]
            d.proc.kill()  # kill -9 while the directory is still read-only
            d.proc.wait()
    text = d.log()
    assert "Traceback" not in text
    assert len([ln for ln in text.splitlines() if "EROFS" in ln]) == 2, text
    with DaemonProcess(tmp_path) as successor:
        logs = successor.request("status")["logs"]
        assert [(e["uuid"], e["luid"], e["marked"]) for e in logs] == [(keep.uuid, 1, 2)]
        assert "destroyed before the restart: removed, not restored" in successor.log()
    assert len(list((d.run_dir / "logs").iterdir())) == 1


def test_a_ctr_at_the_descriptor_limit_is_answered_emfile(tmp_path: Path) -> None:
    from tests.test_control import DaemonProcess
    from ulogd.edges.transport.unixsock import UnixClient

    with DaemonProcess(tmp_path) as d, UnixClient(d.transport) as link:
        keep = LogDriver(link, uuid="LVM-limit-keep", luid=1)
        keep.create(TEXT)
        pid = d.proc.pid
        used = len(os.listdir(f"/proc/{pid}/fd"))
        subprocess.run(["prlimit", f"--pid={pid}", f"--nofile={used}:"], check=True)  # soft only
        newcomer = LogDriver(link, uuid="LVM-limit-new", luid=2)
        assert newcomer.ctr(TEXT).error == -errno.EMFILE
        assert keep.mark([3]).error == 0 and keep.flush().error == 0
        subprocess.run(["prlimit", f"--pid={pid}", "--nofile=1024:"], check=True)
        assert newcomer.ctr(TEXT).error == 0
    text = d.log()
    assert "Traceback" not in text
    (line,) = [ln for ln in text.splitlines() if "EMFILE" in ln]
    assert "[imit-new] CTR luid=0x2" in line and "state file" in line
