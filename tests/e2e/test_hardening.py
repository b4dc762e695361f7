"""Hardening against the real kernel (QEMU): forged requests from a root process, a failing
log device, table reloads under I/O (default e2e tier, one boot), and repeated kill -9 of
ulogd under a writer (``--e2e --slow``, its own boot).  The guest side is
``tests/hardening/guest_hardening.py`` (built on the e2e scenario library); every check it
records must pass, and the figures it measured are printed.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import pytest

from tests.harness import qemu

pytestmark = pytest.mark.e2e

SCRIPT = 'exec python3 "$ULOGD_SRC/tests/hardening/guest_hardening.py"'
#: in-guest budgets (the guest's watchdog powers off then) and the scenarios per boot
BOOTS: dict[str, tuple[float, tuple[str, ...]]] = {
    "hardening": (420.0, ("forged", "log-device-bad", "reloads", "shutdown")),
    "hardening-kills": (900.0, ("kill-loop", "shutdown")),
}
BOOT_MARGIN = 120.0
_runs: dict[str, qemu.GuestRun] = {}


def _boot(group: str, extra: str = "") -> qemu.GuestRun:
    if group not in _runs:
        budget, names = BOOTS[group]
        _runs[group] = qemu.run_in_guest(
            f"{SCRIPT} --budget {budget:.0f} {extra} {' '.join(names)}",
            name=group,
            timeout=budget + BOOT_MARGIN,
        )
    return _runs[group]


def _scenario(group: str, name: str, extra: str = "") -> dict[str, Any]:
    run = _boot(group, extra)
    scenarios = (run.result or {}).get("scenarios", {})
    data = scenarios.get(name)
    if data is None or not data["ok"]:
        failed = [f"{c['name']}: {c['detail']}" for c in (data or {}).get("checks", [])
                  if not c["ok"]]  # fmt: skip
        pytest.fail(
            f"guest scenario {name} failed: error={None if data is None else data['error']}\n"
            f"failed checks: {failed}\n{run.describe(80)}\n--- ulogd.log ---\n"
            + "\n".join(run.artefact("ulogd.log").splitlines()[-60:]),
            pytrace=False,
        )
    print(f"\n{name}: {data['seconds']} s, info {json.dumps(data['info'])}")
    return data  # type: ignore[no-any-return]


def test_forged_requests_from_a_root_process_change_nothing() -> None:
    data = _scenario("hardening", "forged")
    names = {c["name"] for c in data["checks"]}
    assert "forged requests changed nothing (dm-ulogd status)" in names
    assert data["info"]["forged_datagrams"] >= 8


def test_log_device_errors_under_io() -> None:
    data = _scenario("hardening", "log-device-bad")
    assert data["info"]["writes"] > 45
    assert "no application I/O error" in {c["name"] for c in data["checks"]}


def test_table_reloads_under_io() -> None:
    data = _scenario("hardening", "reloads")
    # Each reload made a new instance next to the live one (the guest checks consecutive luids
    # differ); the kernel may hand a freed context address out again, so distinct luids >= 2.
    assert "every reload made a new log instance" in {c["name"] for c in data["checks"]}
    assert data["info"]["luids"] >= 2
    assert data["info"]["writes"] > 0


def test_hardening_boot_shuts_down_cleanly() -> None:
    _scenario("hardening", "shutdown")
    run = _runs["hardening"]
    if not os.environ.get("ULOGD_E2E_KEEP"):
        shutil.rmtree(run.run_dir, ignore_errors=True)


@pytest.mark.slow
def test_repeated_kill9_of_ulogd_under_writes() -> None:
    kills = int(os.environ.get("ULOGD_E2E_KILLS", "6"))
    data = _scenario("hardening-kills", "kill-loop", f"--kills {kills}")
    assert data["info"]["kills"] == kills
    _scenario("hardening-kills", "shutdown")
