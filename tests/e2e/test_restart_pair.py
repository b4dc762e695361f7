"""Two real kernels, one cluster: kill -9 of a *daemon* whose node and kernel write on.

A dead daemon is not a dead node.  Two QEMU guests share the legs of a ``clustered-core`` and
a ``clustered-disk`` mirror (``tests/harness/guest/restart_pair.py`` says what each guest
does).  Node 1 — each group's first member and the disk log's server — has each mirror's
primary leg behind a 2 s ``dm-delay`` for writes; with 32 writes in flight it kills its own ulogd
(``kill -9``) and starts it again 3 s later, both nodes writing on disjoint blocks of every
region.  The host then compares the legs: if node 2 had recovered node 1's held regions while
node 1's delayed writes were still landing on leg 0, they would differ while both nodes say
N/N (silent corruption).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid as uuidlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.shared_images import IMAGES, LEG_SIZE, LEGS, differing_blocks, make_images
from tests.harness import qemu

pytestmark = pytest.mark.e2e

BUDGET = 900.0


@dataclass
class RestartRun:
    runs: dict[int, qemu.GuestRun]
    differing: dict[str, list[int]]  # per mirror: 4 KiB blocks whose legs differ at the end
    disks: Path

    def scenario(self, node: int) -> dict[str, Any]:
        result = self.runs[node].result or {}
        sc: dict[str, Any] = result.get("scenarios", {}).get(f"restart-pair-node{node}", {})
        return sc

    def describe(self) -> str:
        parts = [f"shared images and host findings: {self.disks}"]
        for node, run in self.runs.items():
            log = "\n".join(run.artefact("ulogd.log").splitlines()[-40:])
            parts += [f"==== node {node}: {run.describe(60)}", f"---- ulogd.log ----\n{log}"]
        return "\n".join(parts)


def _boot() -> RestartRun:
    art = qemu.prepare()
    base = qemu.new_run_dir("restart-pair-disks")
    images = make_images(base)
    socks = [base / "n1.sock", base / "n2.sock"]
    uuid = f"e2e-restart-{uuidlib.uuid4().hex[:12]}"
    guests = {}
    for node in (1, 2):
        devices = qemu.link_args(socks[node - 1], socks[2 - node], f"52:54:00:78:00:0{node}")
        for index, serial in enumerate(IMAGES):
            devices += qemu.shared_disk_args(index, images[serial], serial)
        script = (
            f'exec python3 "$ULOGD_GUEST/restart_pair.py" --node {node} --uuid {uuid} '
            f"--budget {BUDGET:.0f}"
        )
        guests[node] = qemu.start_guest(
            script, name=f"restart-pair-{node}", timeout=BUDGET + 120, art=art, smp=1,
            memory_mb=1024, extra=devices,
        )  # fmt: skip
    try:
        runs = {node: g.wait() for node, g in guests.items()}
    except BaseException:
        for g in guests.values():
            g.kill()
        raise
    differing = {
        name: differing_blocks(images[a], images[b], 0, LEG_SIZE) for name, (a, b) in LEGS.items()
    }
    (base / "host.json").write_text(json.dumps({"differing": differing}))
    return RestartRun(runs, differing, base)


@pytest.fixture(scope="module")
def restart_pair() -> Iterator[RestartRun]:
    run = _boot()
    yield run
    ok = all(run.scenario(n).get("ok") for n in run.runs) and not any(run.differing.values())
    if ok and not os.environ.get("ULOGD_E2E_KEEP"):
        for path in (*(r.run_dir for r in run.runs.values()), run.disks):
            shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("node", [1, 2])
def test_each_nodes_checks_pass(restart_pair: RestartRun, node: int) -> None:
    """Node 1: 32 writes in flight at the kill, the restarted daemon rejoins before it answers,
    no write error, N/N, its data reads back, legs identical in the guest, the shared disk log
    all clean.  Node 2: node 1's marks held as an orphan's, never out of sync, no region lost
    sync; both: ulogd exits 0, no traceback, no kernel error."""
    sc = restart_pair.scenario(node)
    failed = [c for c in sc.get("checks", []) if not c["ok"]]
    assert sc.get("ok"), f"error={sc.get('error')} failed={failed}\n{restart_pair.describe()}"


@pytest.mark.parametrize("mirror", sorted(LEGS))
def test_legs_identical_on_the_host(restart_pair: RestartRun, mirror: str) -> None:
    info = restart_pair.scenario(1).get("info", {})
    differing = restart_pair.differing[mirror]
    print(
        f"{mirror}: {len(differing)} differing blocks; node 1 in flight at the kill "
        f"{info.get('in_flight_at_kill')}, marked {info.get('marked_before_kill')}, "
        f"ready after {info.get('restart_ready_s')} s, rejoined after {info.get('rejoined_s')} s, "
        f"longest write {info.get('max_write_latency_s')} s; node 2 saw node 1 away for "
        f"{restart_pair.scenario(2).get('info', {}).get('seconds_away')} s"
    )
    assert differing == [], f"{len(differing)} blocks differ: {differing[:8]}"
