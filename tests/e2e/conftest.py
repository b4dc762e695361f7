"""Real-kernel end-to-end tier: dm-mirror devices in a QEMU guest, their dirty log served by ulogd.

Running the tier alone::

    .venv/bin/pytest --e2e tests/e2e            # add -v to see one line per scenario

Needs root and the Debian archive (apt): the first run installs qemu-system-x86, debootstrap,
busybox-static and kmod on the host when missing, downloads the kernel package and builds the
guest image under ``.cache/qemu/`` (2-3 minutes); later runs reuse it and only boot.  Prepare
the cache ahead of time with ``.venv/bin/python -m tests.harness.qemu prepare``.  The guest
runs under TCG emulation, so the whole tier takes several minutes (two boots, each running a
group of scenarios with one shared ulogd).

Each boot's run directory ``.cache/qemu/runs/<group>-<time>-*/`` (``.e2e-runs/`` when
``.cache`` is a symlink out of the checkout, which the guest could not follow) holds
``console.log``, ``result.json`` (the guest's checks), ``ulogd.log``, the daemon's
``capture-*.pcapng`` files and ``dmesg.txt``.  It is deleted when every scenario of the boot
passed, kept otherwise (set ``ULOGD_E2E_KEEP=1`` to keep it always).  A failing test prints
the failed checks, the tail of the guest console and of the ulogd log.  ``tools/e2e-shell``
boots the same guest with a shell for debugging.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import qemu

# The guest scripts import their library as ``dmlib`` (their directory is sys.path[0]); the host
# reads their messages with the same module, under the same one name.
if str(qemu.GUEST_DIR) not in sys.path:
    sys.path.insert(0, str(qemu.GUEST_DIR))
from dmlib import Message, read_messages

#: Scenarios run per boot, in order.  Each boot shares one ulogd; "shutdown" stops it.
GROUPS: dict[str, tuple[str, ...]] = {
    "basic": (
        "kernel-logs",
        "clustered-core",
        "integrated-flush",
        "clustered-disk",
        "two-mirrors",
        "log-failure",
        "shutdown",
    ),
    "restart": ("sigstop", "kill9-writer", "restart-idle", "wiped-rundir", "shutdown"),
}
#: In-guest budget per boot (the guest's watchdog saves its artefacts and powers off then).
#: A boot normally needs 4-8 minutes; the budget only matters for a hang, and must leave room
#: for a host shared with other emulators (TCG speed then halves).
BUDGET = {"basic": 900.0, "restart": 900.0}
BOOT_MARGIN = 120.0  # boot + power-off, on top of the budget, before the host kills QEMU


@dataclasses.dataclass
class ScenarioResult:
    """One scenario's record from the guest plus access to the daemon's captures."""

    group: str
    data: dict[str, Any]
    run: qemu.GuestRun

    @property
    def info(self) -> dict[str, Any]:
        info: dict[str, Any] = self.data["info"]
        return info

    def uuid(self, role: str = "mirror") -> str:
        uuid: str = self.info["uuids"][role]
        return uuid

    def messages(self, capture: str | None = None, uuid: str | None = None) -> list[Message]:
        """Decoded datagrams of one capture file (default: the one current at the start)."""
        name = capture or self.info["capture_at_start"]
        msgs = _read_capture(self.run.run_dir / name)
        if uuid is not None:
            msgs = [m for m in msgs if m.uuid == uuid]
        return msgs


@functools.lru_cache(maxsize=16)
def _read_capture(path: Path) -> list[Message]:
    assert path.exists(), f"capture {path} missing"
    return read_messages(path)


def requests(msgs: list[Message]) -> list[Message]:
    return [m for m in msgs if m.to_daemon]


def error_replies(msgs: list[Message]) -> list[tuple[str, int]]:
    return [(m.rtype, m.error) for m in msgs if not m.to_daemon and m.error != 0]


def unanswered(all_msgs: list[Message], uuid: str) -> list[tuple[str, int]]:
    """Requests for ``uuid`` with no reply (full or ack-only) carrying their seq."""
    answered = {m.seq for m in all_msgs if not m.to_daemon}
    return [(m.rtype, m.seq) for m in all_msgs if m.to_daemon and m.uuid == uuid
            and m.seq not in answered]  # fmt: skip


def request_counts(msgs: list[Message]) -> collections.Counter[str]:
    return collections.Counter(m.rtype for m in msgs if m.to_daemon)


class E2E:
    """Boots each group once per session (on first use) and hands out scenario results."""

    def __init__(self) -> None:
        self._art: qemu.Artefacts | None = None
        self.runs: dict[str, qemu.GuestRun] = {}
        self.failed_groups: set[str] = set()

    def artefacts(self) -> qemu.Artefacts:
        if self._art is None:
            self._art = qemu.prepare()
        return self._art

    def boot(self, group: str) -> qemu.GuestRun:
        if group not in self.runs:
            names = " ".join(GROUPS[group])
            script = (
                f'exec python3 "$ULOGD_GUEST/scenarios.py" --budget {BUDGET[group]:.0f} {names}'
            )
            self.runs[group] = qemu.run_in_guest(
                script,
                name=group,
                timeout=BUDGET[group] + BOOT_MARGIN,
                art=self.artefacts(),
            )
        return self.runs[group]

    def scenario(self, group: str, name: str) -> ScenarioResult:
        """The guest's record of a scenario; fails the test unless every guest check passed."""
        run = self.boot(group)
        result = run.result
        scenarios: dict[str, Any] = (result or {}).get("scenarios", {})
        data = scenarios.get(name)
        if data is None or not data["ok"]:
            self.failed_groups.add(group)
            pytest.fail(_failure_text(run, name, data), pytrace=False)
        return ScenarioResult(group, data, run)

    def cleanup(self) -> None:
        if os.environ.get("ULOGD_E2E_KEEP"):
            return
        for group, run in self.runs.items():
            scenarios: dict[str, Any] = (run.result or {}).get("scenarios", {})
            all_ok = all(s.get("ok") for s in scenarios.values())
            complete = len(scenarios) == len(GROUPS.get(group, ()))
            if all_ok and complete and group not in self.failed_groups:
                shutil.rmtree(run.run_dir, ignore_errors=True)


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _failure_text(run: qemu.GuestRun, name: str, data: dict[str, Any] | None) -> str:
    parts = [f"e2e scenario {name!r} failed (run dir {run.run_dir})"]
    if data is None:
        parts.append(
            f"the scenario has no result (guest rc={run.returncode}, "
            f"timed_out={run.timed_out}, wall={run.wall_seconds:.0f}s)"
        )
    else:
        if data.get("error"):
            parts.append(f"error: {data['error']}")
        failed = [c for c in data["checks"] if not c["ok"]]
        parts += [f"FAILED CHECK {c['name']}: {c['detail']}" for c in failed]
        parts.append(f"timings: {data.get('timings')} info: {data.get('info')}")
    parts.append("---- console (tail) ----\n" + _tail(run.console, 80))
    parts.append("---- ulogd.log (tail) ----\n" + _tail(run.artefact("ulogd.log"), 60))
    return "\n".join(parts)


_SESSION = E2E()


@pytest.fixture(scope="session")
def e2e() -> Iterator[E2E]:
    yield _SESSION
    _SESSION.cleanup()


# hookwrapper (not wrapper=True): Debian 12's pytest 7.2 runs the unit tier of the packages.
@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failed e2e test keeps the run directories of every boot (host-side checks too)."""
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if report.failed and item.get_closest_marker("e2e"):
        _SESSION.failed_groups.update(GROUPS)
        for group, run in _SESSION.runs.items():
            report.sections.append(
                (f"e2e boot {group!r}", f"{run.describe(40)}\n---- ulogd.log (tail) ----\n"
                 + _tail(run.artefact("ulogd.log"), 40))
            )  # fmt: skip
