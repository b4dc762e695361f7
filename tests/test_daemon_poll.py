"""Polling in a real daemon: it serves with every ``--poll`` mode, says which one it runs, and
an idle daemon uses no CPU (measured as CPU time, from ``/proc/PID/stat``)."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ulogd.edges.transport.unixsock import UnixClient
from ulogd.protocol.spec import RequestType as T
from ulogd.testing.driver import LogDriver

UUID = "LVM-pollPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPP0001"
TICK = os.sysconf("SC_CLK_TCK")


class RunningDaemon:
    def __init__(self, tmp_path: Path, poll: str) -> None:
        self.transport = str(tmp_path / "t.sock")
        self.run_dir = tmp_path / "run"
        self.log = tmp_path / "ulogd.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ulogd", "run", "-f", "--transport",
                 f"unix:{self.transport}", "--run-dir", str(self.run_dir), "--poll", poll,
                 "--log-level", "info"],
                stdout=out, stderr=out,
            )  # fmt: skip
        deadline = time.monotonic() + 60
        while not (self.run_dir / "ulogd.pid").exists():
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, "the daemon did not start"
            time.sleep(0.05)

    def cpu_ticks(self) -> int:
        """utime + stime of the daemon, in clock ticks (fields 14 and 15 of stat)."""
        stat = Path(f"/proc/{self.proc.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        return int(fields[11]) + int(fields[12])

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)


@pytest.fixture(params=["adaptive", "250"])
def running(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RunningDaemon]:
    d = RunningDaemon(tmp_path, request.param)
    try:
        yield d
    finally:
        d.stop()


def write_burst(log: LogDriver, writes: int) -> None:
    """What the kernel sends for ``writes`` 4 KiB writes to fresh regions."""
    for r in range(writes):
        region = struct.pack("=Q", r % 128)  # 131072 sectors in 1024-sector regions
        for rtype, data in (
            (T.IN_SYNC, region),
            (T.IN_SYNC, region),
            (T.MARK_REGION, region),
            (T.FLUSH, b""),
            (T.CLEAR_REGION, region),
            (T.FLUSH, b""),
        ):
            assert log.call(rtype, data).error == 0


def test_an_idle_daemon_uses_no_cpu_after_a_burst(running: RunningDaemon) -> None:
    with UnixClient(running.transport) as link:
        log = LogDriver(link, uuid=UUID, luid=7)
        log.create("131072 clustered-core 1024 nosync")
        write_burst(log, 200)  # the policy has polled and tuned itself on real bursts
        time.sleep(0.2)  # past any poll window (at most 2 ms) and the CTR's one-off work
        before = running.cpu_ticks()
        time.sleep(2.0)
        used = running.cpu_ticks() - before
    # A daemon that kept polling would use ~2 s of CPU here (200 ticks at 100 Hz).
    assert used <= max(2, TICK // 50), f"{used} ticks of CPU in 2 s of idleness"


def test_the_daemon_names_its_poll_mode(tmp_path: Path) -> None:
    d = RunningDaemon(tmp_path, "off")
    try:
        with UnixClient(d.transport) as link:
            log = LogDriver(link, uuid=UUID, luid=7)
            log.create("131072 clustered-core 1024 nosync")
            write_burst(log, 5)
    finally:
        d.stop()
    assert "(poll off)" in d.log.read_text()


def test_a_bad_poll_flag_is_refused_before_starting(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ulogd", "run", "-f", "--transport", f"unix:{tmp_path}/t.sock",
         "--run-dir", str(tmp_path / "run"), "--poll", "sometimes"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "--poll: 'sometimes' is not 'off', 'adaptive'" in result.stderr
    assert not (tmp_path / "run").exists()
