"""``dm-ulogd status`` against a real daemon process serving real requests (unix transport), and
the renderers on their own."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_control import DaemonProcess
from ulogd.edges.transport.unixsock import UnixClient
from ulogd.ops import status
from ulogd.protocol.spec import RequestType as T
from ulogd.testing.driver import LogDriver

UUID_A = "LVM-statusAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA0001"
UUID_B = "LVM-statusBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB0002"
IN_SYNC = 37


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ulogd", *args], capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def served(tmp_path: Path):
    """A daemon with two logs: A (128 regions, 37 in sync, 3 marked, one recovering) and B
    (suspended, nosync: 64/64 in sync)."""
    with DaemonProcess(tmp_path) as d, UnixClient(d.transport) as link:
        a = LogDriver(link, uuid=UUID_A, luid=0x1000)
        a.create("131072 clustered-core 1024")  # 128 regions of 512 KiB
        for region in range(IN_SYNC):
            assert a.set_region_sync(region, True).error == 0
        assert a.mark([100, 101, 102]).error == 0
        assert a.flush().error == 0
        active, recovering = a.resync_work()
        assert active == 1 and recovering == IN_SYNC
        b = LogDriver(link, uuid=UUID_B, luid=0x2000)
        b.create("65536 core 1024 nosync")
        b.ok(T.PRESUSPEND)
        b.ok(T.POSTSUSPEND)
        yield d


def test_json_matches_what_was_driven(served: DaemonProcess) -> None:
    result = cli("status", "--json", "--run-dir", str(served.run_dir))
    assert result.returncode == 0, result.stderr
    snap = json.loads(result.stdout)
    assert snap["ok"] is True
    assert snap["daemon"]["logs"] == 2
    assert snap["daemon"]["pid"] == served.proc.pid
    # 2 creates (3 requests each) + 37 syncs + mark + flush + resync work + 2 suspends
    assert snap["daemon"]["datagrams"] == 6 + IN_SYNC + 3 + 2
    logs = {entry["uuid"]: entry for entry in snap["logs"]}
    a, b = logs[UUID_A], logs[UUID_B]
    assert a["luid"] == 0x1000
    assert a["type"] == "clustered-core"
    assert a["regions"] == 128
    assert a["region_size"] == 1024
    assert a["in_sync"] == IN_SYNC
    assert a["in_sync_percent"] == round(100 * IN_SYNC / 128, 2)
    assert a["marked"] == 3
    assert a["recovering"] == IN_SYNC and a["recoverer"] == 0
    assert a["state"] == "active"
    assert a["log_device"] is None and a["health"] is None
    assert a["server"] == 0 and a["members"] == [0]
    assert a["last_error"] is None
    assert b["regions"] == 64 and b["in_sync"] == 64 and b["in_sync_percent"] == 100.0
    assert b["state"] == "suspended" and b["type"] == "core" and b["sync_mode"] == "nosync"
    assert b["recovering"] is None


def test_table_shows_every_log(served: DaemonProcess) -> None:
    result = cli("status", "--run-dir", str(served.run_dir))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("ulogd ")
    assert "2 log(s)" in lines[0]
    header = next(line for line in lines if line.startswith("UUID"))
    for column in ("LUID", "TYPE", "REGIONS", "IN SYNC", "MARKED", "RECOVERING", "MEMBERS"):
        assert column in header
    # LVM's 72-character uuids are shown as prefix and last eight characters; no dm device
    # uses these logs ("-", or "?" where dmsetup cannot be asked).
    row_a = next(line for line in lines if line.startswith("LVM-...AAAA0001 "))
    assert re.search(
        r"^LVM-\.\.\.AAAA0001\s+[-?]\s+0x1000\s+clustered-core\s+128\s+512KiB"
        r"\s+37/128 \(28\.9%\)\s+3\s+37@0\s+active\s+-\s+0\s+0$",
        row_a,
    ), row_a
    row_b = next(line for line in lines if line.startswith("LVM-...BBBB0002 "))
    assert "64/64 (100.0%)" in row_b and "suspended" in row_b
    assert UUID_A not in result.stdout


def test_wide_table_shows_whole_uuids(served: DaemonProcess) -> None:
    result = cli("status", "--wide", "--run-dir", str(served.run_dir))
    assert result.returncode == 0, result.stderr
    assert any(line.startswith(UUID_A + " ") for line in result.stdout.splitlines())
    assert "LVM-...AAAA0001" not in result.stdout


@pytest.mark.parametrize("count", ["0", "-1"])
def test_watch_count_must_be_positive(served: DaemonProcess, count: str) -> None:
    result = cli("status", "-w", "--count", count, "--run-dir", str(served.run_dir))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == "dm-ulogd status: --count must be at least 1\n"


def test_watch_draws_a_progress_bar(served: DaemonProcess) -> None:
    result = cli(
        "status", "--watch", "--count", "2", "--interval", "0.1", "--run-dir", str(served.run_dir)
    )
    assert result.returncode == 0, result.stderr
    bars = re.findall(r"\[([#.]+)\]\s+(\d+\.\d)% (\d+)/(\d+)", result.stdout)
    assert ("28.9", "37", "128") in [b[1:] for b in bars]
    assert ("100.0", "64", "64") in [b[1:] for b in bars]
    assert len(bars) == 4  # two logs, two screens
    bar = next(b[0] for b in bars if b[2] == "37")
    assert bar.count("#") == round(37 / 128 * len(bar))


def test_status_follows_progress(served: DaemonProcess) -> None:
    with UnixClient(served.transport) as link:
        a = LogDriver(link, uuid=UUID_A, luid=0x1000)
        assert a.resync_all() == 128 - IN_SYNC
    snap = json.loads(cli("status", "--json", "--run-dir", str(served.run_dir)).stdout)
    entry = next(e for e in snap["logs"] if e["uuid"] == UUID_A)
    assert entry["in_sync"] == 128 and entry["in_sync_percent"] == 100.0
    assert entry["recovering"] is None


def test_no_daemon_is_a_clear_error(tmp_path: Path) -> None:
    result = cli("status", "--run-dir", str(tmp_path))
    assert result.returncode == status.EXIT_NO_DAEMON
    assert "no ulogd control socket" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_dir_from_config(served: DaemonProcess, tmp_path: Path) -> None:
    conf = tmp_path / "dm-ulogd.toml"
    conf.write_text(f'run_dir = "{served.run_dir}"\n')
    result = cli("status", "--json", "--config", str(conf))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["daemon"]["logs"] == 2


def _loop_device(backing: Path) -> str | None:
    if shutil.which("losetup") is None:
        return None
    result = subprocess.run(
        ["losetup", "--find", "--show", str(backing)], capture_output=True, text=True
    )
    return result.stdout.strip() if result.returncode == 0 else None


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a loop device")
def test_disk_log_health_and_last_error(tmp_path: Path) -> None:
    """A disk log whose device vanished across a restart: health D and the error, per log."""
    backing = tmp_path / "log.img"
    backing.write_bytes(b"\0" * (1 << 20))
    loop = _loop_device(backing)
    if loop is None:
        pytest.skip("no loop device available")
    detached = False
    try:
        with DaemonProcess(tmp_path) as d, UnixClient(d.transport) as link:
            log = LogDriver(link, uuid=UUID_A, luid=0x3000)
            log.create(f"131072 clustered-disk {loop} 1024")
            assert log.mark([5]).error == 0
            assert log.flush().error == 0
            entry = d.request("status")["logs"][0]
            assert entry["health"] == "A"
            assert entry["log_device"] == loop
            assert re.fullmatch(r"\d+:\d+", entry["device_id"])
        subprocess.run(["losetup", "-d", loop], check=True)
        detached = True
        os.unlink(backing)
        with DaemonProcess(tmp_path) as d:  # same run dir: restores the log, device gone
            result = cli("status", "--json", "--run-dir", str(d.run_dir))
            entry = json.loads(result.stdout)["logs"][0]
            assert entry["uuid"] == UUID_A
            assert entry["health"] == "D"
            assert entry["last_error"]["level"] == "error"
            assert "unavailable" in entry["last_error"]["message"]
            table = cli("status", "--run-dir", str(d.run_dir)).stdout
            assert "(D)" in table
            assert f"{status.short_uuid(UUID_A)}: last error" in table
    finally:
        if not detached:
            subprocess.run(["losetup", "-d", loop], check=False)


# ---------------------------------------------------------------------- renderers alone
def _snapshot(in_sync: int, regions: int = 200) -> dict:
    return {
        "ok": True,
        "daemon": {
            "version": "x",
            "pid": 1,
            "uptime": 3700,
            "transport": "netlink",
            "node": 2,
            "logs": 1,
            "datagrams": 5,
        },
        "logs": [
            {
                "uuid": "u1",
                "luid": 1,
                "type": "clustered-disk",
                "regions": regions,
                "region_size": 2048,
                "in_sync": in_sync,
                "in_sync_percent": round(100 * in_sync / regions, 2),
                "marked": 0,
                "recovering": None,
                "recoverer": None,
                "recovery_halted": False,
                "state": "active",
                "log_device": "253:4",
                "device_id": "253:4",
                "health": "A",
                "server": 2,
                "members": [1, 2, 3],
                "last_error": None,
            }
        ],
    }


def test_progress_bar() -> None:
    assert status.progress_bar(0.0, 10) == "[..........]"
    assert status.progress_bar(0.5, 10) == "[#####.....]"
    assert status.progress_bar(1.0, 4) == "[####]"
    assert status.progress_bar(7.0, 4) == "[####]"


def test_watch_rate_and_time_left() -> None:
    screen = status.render_watch(_snapshot(150), _snapshot(100), elapsed=10.0, width=100)
    assert "5.0 regions/s, 10s left" in screen
    assert "253:4 (A)" in screen
    assert "up 1h01m" in screen
    assert "regions/s" not in status.render_watch(_snapshot(150), None, 1.0)


def test_table_of_a_cluster_log() -> None:
    text = status.render_table(_snapshot(50))
    row = text.splitlines()[-1]
    assert "50/200 (25.0%)" in row and "1MiB" in row and "253:4 (A)" in row
    assert row.endswith("2       1,2,3")


def test_empty_daemon() -> None:
    snap = _snapshot(0)
    snap["logs"] = []
    assert "no logs" in status.render_table(snap)


def test_cluster_group_shown() -> None:
    from types import SimpleNamespace

    from ulogd.engine.view import GroupView
    from ulogd.ops.control import _group_info

    group = SimpleNamespace(
        members=((3, 100), (1, 200), (3, 101)),
        phase=SimpleNamespace(name="VALID"),
        disk_server=1,
        quorate=True,
        in_flight=2,
        outbox=[object()],
        dropped=0,
    )
    info = _group_info(GroupView.of(group))  # type: ignore[arg-type]
    assert info["server"] == 1 and info["members"] == [1, 3]
    assert info["cluster"]["phase"] == "valid" and info["cluster"]["unsent"] == 1
    snap = _snapshot(10)
    snap["logs"][0].update(info)
    assert "group valid" in status.render_watch(snap, None, 1.0)
    assert status.render_table(snap).splitlines()[-1].endswith("1       1,3")


def test_short_uuids() -> None:
    assert status.short_uuid("LVM-" + "x" * 56 + "a1b2c3d4") == "LVM-...a1b2c3d4"
    assert status.short_uuid("ulogd-" + "0" * 24 + "deadbeef") == "ulogd-...deadbeef"
    assert status.short_uuid("0123456789abcdef0123456789") == "0123...23456789"
    assert status.short_uuid("ulogd-mirr0") == "ulogd-mirr0"  # short: whole


DMSETUP_TABLE = """\
vg-lv_mlog: 0 8192 linear 8:16 2048
mirr0: 0 131072 mirror userspace 4 LVM-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa11111111 clustered-core \
1024 nosync 2 7:0 0 7:1 0 1 handle_errors
mirr1: 0 131072 mirror userspace 4 LVM-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa11111111 integrated_flush \
clustered-core 1024 2 7:2 0 7:3 0
other: 0 2048 mirror core 1 1024 2 7:4 0 7:5 0
""".replace("\\\n", "")


def test_device_names_from_dmsetup_tables() -> None:
    uuid = "LVM-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa11111111"
    devices = status.parse_dm_tables(DMSETUP_TABLE)
    assert devices == {uuid: ["mirr0", "mirr1"]}
    snap = _snapshot(50)
    snap["logs"][0]["uuid"] = uuid
    row = status.render_table(snap, devices).splitlines()[-1]
    assert row.startswith("LVM-...11111111  mirr0,mirr1  0x1 ")
    wide = status.render_table(snap, devices, wide=True).splitlines()[-1]
    assert wide.startswith(uuid + " ")
    assert len(wide) - len(row) == len(uuid) - len("LVM-...11111111")
    assert status.render_table(snap, {}).splitlines()[-1].split()[1] == "-"
    assert status.render_table(snap, None).splitlines()[-1].split()[1] == "?"
    screen = status.render_watch(snap, None, 1.0, devices=devices)
    assert "LVM-...11111111 0x1  dev mirr0,mirr1" in screen
