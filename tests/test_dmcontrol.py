"""The local device-mapper edge: which mirrors use a log, what a failed dmsetup does, and when
libdevmapper is told to work without udev."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ulogd.edges import dmcontrol
from ulogd.edges.daemon import Daemon
from ulogd.edges.transport.unixsock import UnixServerTransport
from ulogd.engine.server import Server
from ulogd.ops import metrics
from ulogd.testing.driver import InProcess, LogDriver

LEGS = "2 7:0 0 7:1 0"


def test_parse_finds_every_mirror_naming_the_uuid() -> None:
    table = (
        f"m0: 0 131072 mirror userspace 3 LVM-bus clustered-core 1024 {LEGS} 1 handle_errors\n"
        f"m1: 0 131072 mirror core 1 1024 {LEGS}\n"
        "lin: 0 8 linear 7:4 0\n"
        f"m2: 0 131072 mirror userspace 4 LVM-bus integrated_flush clustered-core 1024 {LEGS}\n"
        "No devices found\n"
    )
    assert dmcontrol.parse_mirrors("LVM-bus", table) == ["m0", "m2"]
    assert dmcontrol.parse_mirrors("LVM-other", table) == []


@pytest.fixture
def broken_dmsetup(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """A dmsetup that cannot be run (the exec fails for real)."""
    missing = str(tmp_path / "no-such-dir" / "dmsetup")
    monkeypatch.setattr(dmcontrol, "DMSETUP", missing)
    return missing


def test_a_dmsetup_that_cannot_run_is_an_error_not_an_empty_list(broken_dmsetup: str) -> None:
    with pytest.raises(dmcontrol.DmsetupError, match=r"cannot run .*dmsetup table"):
        dmcontrol.mirrors_using("LVM-bus")


def test_a_failing_dmsetup_is_an_error_with_its_own_words(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    script = tmp_path / "dmsetup"  # stands for a dmsetup refused /dev/mapper/control
    script.write_text(
        "#!/bin/sh\necho '/dev/mapper/control: open failed: Operation not permitted' >&2\nexit 1\n"
    )
    script.chmod(0o755)
    monkeypatch.setattr(dmcontrol, "DMSETUP", str(script))
    with pytest.raises(dmcontrol.DmsetupError) as caught:
        dmcontrol.mirrors_using("LVM-bus")
    assert "status 1" in str(caught.value)
    assert "/dev/mapper/control: open failed: Operation not permitted" in str(caught.value)


def test_udev_is_used_where_it_runs(tmp_path: Path) -> None:
    control = tmp_path / "control"
    control.touch()  # udevd's control socket exists
    env = dmcontrol.dm_environment({"PATH": "/usr/bin"}, control=control)
    assert "DM_DISABLE_UDEV" not in env
    assert env["PATH"] == "/usr/bin"


def test_no_udev_mode_only_where_udev_is_absent(tmp_path: Path) -> None:
    env = dmcontrol.dm_environment({"PATH": "/usr/bin"}, control=tmp_path / "control")
    assert env["DM_DISABLE_UDEV"] == "1"


UUID = "LVM-cycleCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCC0001"


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    """A daemon whose server has one log (created as the kernel creates it)."""
    server = Server()
    LogDriver(InProcess(server), uuid=UUID, luid=1).create("131072 clustered-core 1024")
    transport = UnixServerTransport(str(tmp_path / "t.sock"))
    d = Daemon(server, transport, run_dir=None)
    yield d
    transport.close()


def test_a_cycle_that_cannot_list_mirrors_logs_one_error_and_counts_it(
    daemon: Daemon, broken_dmsetup: str, caplog: pytest.LogCaptureFixture
) -> None:
    entry = daemon.server.logs[(UUID, 1)]
    entry.cycling = True  # as the server sets it when it asks for the cycle
    with caplog.at_level(logging.ERROR):
        daemon._cycle((UUID, 1))
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    assert "recovery cycle of the local mirror failed" in errors[0]
    assert f"cannot run {broken_dmsetup} table" in errors[0]
    assert not entry.cycling  # the server knows it is over (the next RESUME recovers)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(metrics.render(daemon).decode())
        for s in f.samples
    }
    assert samples[("ulogd_dmsetup_failures_total", ())] == 1
    assert samples[("ulogd_recovery_cycles_total", (("result", "failed"),))] == 1
    assert samples[("ulogd_recovery_cycles_total", (("result", "ok"),))] == 0
