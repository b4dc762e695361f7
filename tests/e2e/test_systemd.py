"""The shipped unit under real systemd (QEMU): the guest boots with systemd as PID 1 and udev
running (the image's "systemd" flavour), installs ulogd, its unit, tmpfiles.d and
modules-load.d files the way the package does, and drives the daemon with ``systemctl`` only
(guest side: ``tests/harness/guest/systemd_unit.py``).  Every check the guest recorded must
pass; the timings it measured are printed.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import pytest

from tests.harness import qemu

pytestmark = pytest.mark.e2e

SCENARIOS = ("install", "mirror-restart", "shutdown")
BUDGET = 900.0  # in-guest (the guest's watchdog powers off then); a boot needs ~3-6 min
BOOT_MARGIN = 120.0
_runs: list[qemu.GuestRun] = []


def _boot() -> qemu.GuestRun:
    if not _runs:
        _runs.append(
            qemu.run_in_guest(
                f'exec python3 "$ULOGD_GUEST/systemd_unit.py" --budget {BUDGET:.0f} '
                + " ".join(SCENARIOS),
                name="systemd",
                timeout=BUDGET + BOOT_MARGIN,
                art=qemu.prepare("systemd"),
            )
        )
    return _runs[0]


def _scenario(name: str) -> dict[str, Any]:
    run = _boot()
    data = (run.result or {}).get("scenarios", {}).get(name)
    if data is None or not data["ok"]:
        failed = [f"{c['name']}: {c['detail']}" for c in (data or {}).get("checks", [])
                  if not c["ok"]]  # fmt: skip
        pytest.fail(
            f"guest scenario {name} failed: error={None if data is None else data['error']}\n"
            f"failed checks: {failed}\n{run.describe(80)}\n--- unit journal ---\n"
            + "\n".join(run.artefact("unit-journal.txt").splitlines()[-60:]),
            pytrace=False,
        )
    print(f"\n{name}: {data['seconds']} s (boot wall {run.wall_seconds:.0f} s), "
          f"info {json.dumps(data['info'])}")  # fmt: skip
    return data  # type: ignore[no-any-return]


def test_installed_unit_starts_in_its_sandbox_with_early_ordering() -> None:
    data = _scenario("install")
    names = {c["name"] for c in data["checks"]}
    assert "dmsetup table works inside the unit's cgroup (/dev/mapper/control allowed)" in names
    assert "modules-load.d loaded dm-log-userspace" in names
    assert data["info"]["dependencies"]["DefaultDependencies"] == "no"


def test_mirror_survives_systemctl_restart_stop_and_start() -> None:
    data = _scenario("mirror-restart")
    names = {c["name"] for c in data["checks"]}
    assert "no application I/O error across systemctl restart" in names
    assert "after systemctl restart: legs identical" in names
    assert "after systemctl stop/start: legs identical" in names


def test_systemctl_stop_is_clean() -> None:
    _scenario("shutdown")
    if not os.environ.get("ULOGD_E2E_KEEP"):
        shutil.rmtree(_runs[0].run_dir, ignore_errors=True)
