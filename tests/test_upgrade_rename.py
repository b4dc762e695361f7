"""Upgrading across the rename (ulogd 0.1.0 → dm-ulogd) with mirrors loaded: the first daemon
under the new name continues from the old run directory's state, as a restart would.

The two run directories are scratch directories standing in for ``/run/ulogd`` and
``/run/dm-ulogd`` (the new daemon is told they are its defaults); both daemons are real
processes serving real requests over the unix test transport.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.test_control import DaemonProcess
from ulogd.edges.transport.unixsock import UnixClient
from ulogd.ops import control
from ulogd.testing.driver import LogDriver

UUID = "LVM-renameRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRR0001"
IN_SYNC = 21

# The new daemon, with the run directories of both names pointed at scratch ones.
NEW_DAEMON = """
import sys
from pathlib import Path
from ulogd.ops import cli, config
config.DEFAULT_RUN_DIR = Path(sys.argv[1])
config.PREVIOUS_RUN_DIR = Path(sys.argv[2])
config.DEFAULT_PATH = config.PREVIOUS_PATH = Path(sys.argv[1]) / "absent.toml"
raise SystemExit(cli.main(["run", "-f", "--run-dir", sys.argv[1], "--transport", sys.argv[3]]))
"""


def start_new(new_run: Path, old_run: Path, transport: str, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", NEW_DAEMON, str(new_run), str(old_run), f"unix:{transport}"],
            stdout=out, stderr=out, env=env,
        )  # fmt: skip
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return proc
        with contextlib.suppress(OSError, ValueError):
            if control.request(new_run / control.SOCKET_NAME, "ping", timeout=2)["ok"]:
                return proc
        time.sleep(0.05)
    raise AssertionError(f"new daemon did not answer: {log.read_text()}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)


def test_first_start_under_the_new_name_continues_from_the_old_state(tmp_path: Path) -> None:
    old_run, new_run = tmp_path / "run-ulogd", tmp_path / "run-dm-ulogd"
    with DaemonProcess(tmp_path, run_dir=old_run) as old, UnixClient(old.transport) as link:
        log = LogDriver(link, uuid=UUID, luid=0x77)
        log.create("131072 clustered-core 1024")  # 128 regions
        for region in range(IN_SYNC):
            assert log.set_region_sync(region, True).error == 0
        assert log.mark([100, 101]).error == 0
        assert log.flush().error == 0
        transport = old.transport
    # The old daemon stopped (the old package's removal); its state stays in run-ulogd.
    daemon_log = tmp_path / "new-daemon.log"
    proc = start_new(new_run, old_run, transport, daemon_log)
    try:
        assert proc.poll() is None, daemon_log.read_text()
        snapshot = control.request(new_run / control.SOCKET_NAME, "status")
        (entry,) = snapshot["logs"]
        assert entry["uuid"] == UUID and entry["luid"] == 0x77
        assert entry["in_sync"] == IN_SYNC  # nothing to resynchronise again
        assert entry["marked"] == 2  # the kernel never re-sends its MARKs
        assert "imported 1 log state file(s)" in daemon_log.read_text()
        with UnixClient(transport) as link:  # and it answers as the old daemon would have
            again = LogDriver(link, uuid=UUID, luid=0x77)
            assert again.mark([5]).error == 0 and again.flush().error == 0
    finally:
        stop(proc)
    assert (old_run / "logs").is_dir()  # only read
    # A later start under the new name never looks at the old directory again.
    (old_run / "logs" / "stray.state").write_bytes(b"not a state file")
    proc = start_new(new_run, old_run, transport, daemon_log)
    try:
        status = json.dumps(control.request(new_run / control.SOCKET_NAME, "status"))
        assert "stray" not in status and daemon_log.read_text().count("imported") == 1
    finally:
        stop(proc)


def test_refused_while_the_old_daemon_still_runs(tmp_path: Path) -> None:
    old_run, new_run = tmp_path / "run-ulogd", tmp_path / "run-dm-ulogd"
    with DaemonProcess(tmp_path, run_dir=old_run) as old, UnixClient(old.transport) as link:
        LogDriver(link, uuid=UUID, luid=0x77).create("131072 core 1024")
        daemon_log = tmp_path / "new-daemon.log"
        proc = start_new(new_run, old_run, str(tmp_path / "other.sock"), daemon_log)
        proc.wait(timeout=20)
        assert proc.returncode == 3
        assert "still serves from" in daemon_log.read_text()
        assert not (new_run / "logs").exists()
