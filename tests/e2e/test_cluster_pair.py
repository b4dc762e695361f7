"""Two real kernels, one shared mirror, one cluster: kill -9 of a node with writes in flight.

Two QEMU guests share two mirrors' legs and a disk log (raw images attached to both) and a
private link; each runs corosync and ulogd ``--cluster corosync`` (``tests/harness/guest/pair.py``
says what each guest does): one mirror with a ``clustered-core`` log, one with a
``clustered-disk`` log.  Node 1, each log group's first member and the disk log's server,
writes the upper half of each mirror at queue depth 16 while QEMU throttles its writes to the
second legs, so it always has writes that reached the first leg only; node 2 writes the lower
halves.  The host kills node 1's QEMU, counts the torn blocks by comparing the legs' images at
once, and lets node 2 finish: its ulogd must mark node 1's regions out of sync and get its own
kernel to copy them (nothing else ever writes the upper halves again), while node 2 keeps
writing and takes over the disk log.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.shared_images import IMAGES, LEG_SIZE, LEGS, differing_blocks, make_images
from tests.harness import qemu

pytestmark = pytest.mark.e2e

HALF = LEG_SIZE // 2
REGION_BYTES = 512 << 10
#: The victim's writes to the second leg: few enough that queue depth 16 always waits there.
VICTIM_LEG_B_IOPS = 4
BUDGET = 900.0
#: Corosync's failure detection in the guests: token 1000 ms + consensus 1200 ms.
TOKEN_PLUS_CONSENSUS = 2.2
KERNEL_TIMEOUT = 15.0  # dm-log-userspace gives up on a request after 15 s
#: Seconds the survivor writes before the host kills the victim (its rate before is measured
#: from then until 3 s before the departure is seen).
SURVIVOR_WRITES_BEFORE_KILL = 8.0


@dataclasses.dataclass
class PairRun:
    victim: qemu.GuestRun
    survivor: qemu.GuestRun
    victim_event: str
    torn_blocks: dict[str, list[int]]  # per mirror: upper-half offsets differing at the kill
    final_differing_blocks: dict[str, list[int]]
    disks: Path  # the shared images and the host's findings (host.json)

    def torn_regions(self, mirror: str) -> list[int]:
        return sorted({t // REGION_BYTES for t in self.torn_blocks[mirror]})

    @property
    def survivor_result(self) -> dict[str, Any]:
        result = self.survivor.result or {}
        scenario: dict[str, Any] = result.get("scenarios", {}).get("pair-survivor", {})
        return scenario

    def describe(self) -> str:
        parts = [f"shared images and host findings: {self.disks}"]
        for name, run in (("victim", self.victim), ("survivor", self.survivor)):
            parts.append(f"==== {name}: {run.describe(60)}")
            parts.append("---- ulogd.log (tail) ----\n" + _tail(run.artefact("ulogd.log"), 40))
        return "\n".join(parts)


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _boot_pair(flavour: str = "init") -> PairRun:
    """Boot the pair; flavour "systemd": systemd is PID 1 in both guests and corosync and ulogd
    run under their units (``pair.py --systemd``)."""
    art = qemu.prepare(flavour)
    base = qemu.new_run_dir("pair-disks")
    images = make_images(base)
    socks = [base / "n1.sock", base / "n2.sock"]
    uuid = f"e2e-pair-{uuidlib.uuid4().hex[:12]}"
    guests = {}
    for node, role in ((1, "victim"), (2, "survivor")):
        other = 3 - node
        devices = qemu.link_args(socks[node - 1], socks[other - 1], f"52:54:00:77:00:0{node}")
        for index, (serial, (_, throttled)) in enumerate(IMAGES.items()):
            iops = VICTIM_LEG_B_IOPS if throttled and role == "victim" else None
            devices += qemu.shared_disk_args(index, images[serial], serial, write_iops=iops)
        script = (
            f'exec python3 "$ULOGD_GUEST/pair.py" --node {node} --role {role} --uuid {uuid} '
            f"--budget {BUDGET:.0f}" + (" --systemd" if flavour == "systemd" else "")
        )
        guests[role] = qemu.start_guest(
            script, name=f"pair-{flavour}-{role}", timeout=BUDGET + 120, art=art, smp=1,
            memory_mb=1024,
            extra=devices,
        )  # fmt: skip
    victim, survivor = guests["victim"], guests["survivor"]

    def compare(start: int) -> dict[str, list[int]]:
        return {
            name: differing_blocks(images[a], images[b], start, LEG_SIZE)
            for name, (a, b) in LEGS.items()
        }

    try:
        line = victim.wait_event("writing", BUDGET)
        # The survivor's rate before the kill is measured too: let it write for a while first
        # (the victim's throttled second legs keep it with torn writes all along).
        survivor.wait_event("writing", BUDGET)
        time.sleep(SURVIVOR_WRITES_BEFORE_KILL)
        victim.kill()
        torn = compare(HALF)
        victim_run = victim.wait()
        survivor_run = survivor.wait()
    except BaseException:
        victim.kill()
        survivor.kill()
        raise
    final = compare(0)
    (base / "host.json").write_text(json.dumps({"torn": torn, "final": final, "event": line}))
    return PairRun(victim_run, survivor_run, line, torn, final, base)


def _pair_fixture(flavour: str) -> Iterator[PairRun]:
    run = _boot_pair(flavour)
    yield run
    ok = run.survivor_result.get("ok") and not any(run.final_differing_blocks.values())
    if ok and not os.environ.get("ULOGD_E2E_KEEP"):
        for path in (run.victim.run_dir, run.survivor.run_dir, run.disks):
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def pair() -> Iterator[PairRun]:
    yield from _pair_fixture("init")


def test_survivor_checks_pass(pair: PairRun) -> None:
    """Quorum with both, one group of two, the victim's regions lost and recovered, the
    survivor's data intact, legs identical, ulogd clean exit, no kernel errors."""
    sc = pair.survivor_result
    failed = [c for c in sc.get("checks", []) if not c["ok"]]
    assert sc.get("ok"), f"error={sc.get('error')} failed={failed}\n{pair.describe()}"


@pytest.mark.parametrize("mirror", sorted(LEGS))
def test_the_kill_left_torn_writes(pair: PairRun, mirror: str) -> None:
    """The test exercises what it claims: blocks the victim wrote to one leg only."""
    assert pair.torn_blocks[mirror], f"no torn blocks right after the kill\n{pair.describe()}"


@pytest.mark.parametrize("mirror", sorted(LEGS))
def test_every_torn_region_was_among_those_recovered(pair: PairRun, mirror: str) -> None:
    """The survivor's ulogd made at least as many regions lose sync as the host found torn
    (the victim marks a region before writing it, and may hold marks on untorn ones)."""
    lost = pair.survivor_result.get("info", {}).get(f"{mirror}.lost_regions", 0)
    assert lost >= len(pair.torn_regions(mirror)) > 0, (lost, pair.torn_regions(mirror))


@pytest.mark.parametrize("mirror", sorted(LEGS))
def test_legs_identical_on_the_host_afterwards(pair: PairRun, mirror: str) -> None:
    """Only the survivor's recovery can have repaired the torn blocks: nothing else writes
    the upper half after the kill."""
    final = pair.final_differing_blocks[mirror]
    assert final == [], (
        f"{len(final)} blocks differ (torn at the kill: {len(pair.torn_blocks[mirror])}, "
        f"regions {pair.torn_regions(mirror)})"
    )


def test_survivor_io_resumes_and_keeps_its_rate(pair: PairRun) -> None:
    info = pair.survivor_result.get("info", {})
    stall = info.get("max_write_latency_s")
    before, after = info.get("rate_before"), info.get("rate_after")
    figures = (
        f"longest survivor write {stall} s (token+consensus {TOKEN_PLUS_CONSENSUS} s), "
        f"rate before {before}/s after {after}/s, sync low "
        f"{info.get('pair.min_in_sync')}, {info.get('pairdisk.min_in_sync')} of "
        f"{info.get('regions')}, torn regions "
        f"{ {m: len(pair.torn_regions(m)) for m in LEGS} }, departure to recovered "
        f"{info.get('seconds_departure_to_recovered')} s"
    )
    print(figures)
    assert stall is not None and stall < KERNEL_TIMEOUT, figures
    assert before and after and after >= 0.5 * before, figures
