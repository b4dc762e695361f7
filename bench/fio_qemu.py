"""Real kernel, one QEMU boot: fio 4 KiB random writes on dm-mirror with each dirty log.

Run (root; builds or reuses the QEMU artefacts of ``tests.harness.qemu``):
``.venv/bin/python bench/fio_qemu.py [--rounds 3] [--runtime 10] [--depths 1 16]``.

Boots Debian's kernel under QEMU (TCG) once and runs ``bench/guest/fio_guest.py`` in it: on
loop devices over guest-tmpfs files (128 MiB legs, 256 regions, nosync) it measures, in
alternating order every round, fio ``randwrite`` 4 KiB ``direct`` (libaio) at each iodepth on

* a linear device (no mirror),
* a mirror with the kernel's own ``core`` log (the baseline every ratio refers to),
* a mirror with ``userspace`` + ulogd (``clustered-core``),
* the same with ``integrated_flush``,
* the ``clustered-core`` mirror served by ``bench/guest/naive_responder.py``: a stateless
  blocking stdlib loop that answers every request (second baseline: what any Python server
  pays for the kernel's round trips; ulogd is stopped while it runs).

Figures are medians over the rounds; ratios are the median of the per-round ratios to the
``core`` log (and to the naive responder) at the same iodepth.  For the ulogd legs the daemon
(run through ``bench/guest/ulogd_timed.py``) reports the number of requests per write and its
service time (``Server.receive``: decode -> apply -> encode, and the whole event-loop turn per
datagram, socket calls included); a final leg runs it under cProfile.  Targets: ulogd >= 0.35
/ >= 0.5 of the core log at iodepth 1 / 16.  Prints a table and writes JSON (and the profile) to
``bench/results/``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

from tests.harness.qemu import run_in_guest

TARGETS = {1: 0.35, 16: 0.5}
DEVICES = ("linear", "core", "ulogd", "ulogd-if", "naive")


def analyse(result: dict[str, Any], depths: list[int]) -> dict[str, Any]:
    legs = result["legs"]
    out: dict[str, Any] = {}
    for depth in depths:
        per_round: dict[str, dict[int, float]] = {d: {} for d in DEVICES}
        for leg in legs:
            if leg["depth"] == depth:
                per_round[leg["device"]][leg["round"]] = leg["iops"]
        rounds = sorted(per_round["core"])
        entry: dict[str, Any] = {}
        for dev in DEVICES:
            values = [per_round[dev][r] for r in rounds if r in per_round[dev]]
            ratios = [
                per_round[dev][r] / per_round["core"][r]
                for r in rounds
                if r in per_round[dev] and per_round["core"][r]
            ]
            to_naive = [
                per_round[dev][r] / per_round["naive"][r]
                for r in rounds
                if r in per_round[dev] and per_round["naive"].get(r)
            ]
            entry[dev] = {
                "iops": common.median(values) if values else None,
                "iops_rounds": values,
                "to_core": common.median(ratios) if ratios else None,
                "to_naive": common.median(to_naive) if to_naive else None,
            }
        for dev in ("ulogd", "ulogd-if"):
            stats = [leg["ulogd"] for leg in legs if leg["depth"] == depth and leg["device"] == dev]
            if stats:
                entry[dev]["requests_per_write"] = common.median(
                    [s["requests_per_write"] for s in stats]
                )
                entry[dev]["receive_us"] = common.median([s["receive_us_mean"] for s in stats])
                entry[dev]["loop_us_per_datagram"] = common.median(
                    [s["loop_us_per_datagram"] for s in stats]
                )
                entry[dev]["by_type"] = stats[-1]["by_type"]
                # the daemon's share of wall time: requests x loop service time per second
                entry[dev]["daemon_busy_fraction"] = common.median(
                    [s["requests"] * s["loop_us_per_datagram"] / 1e6 / s["wall_s"] for s in stats]
                )
        out[str(depth)] = entry
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runtime", type=int, default=10, help="seconds per fio leg")
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--memory", type=int, default=3072, help="guest MiB")
    parser.add_argument("--out", type=Path, help="JSON file (default bench/results/...)")
    args = parser.parse_args(argv)
    load_before = common.loadavg()
    guest = common.REPO / "bench" / "guest" / "fio_guest.py"
    script = (
        f'python3 {shlex.quote(str(guest))} "$ULOGD_RUN" --rounds {args.rounds} '
        f"--runtime {args.runtime} --depths {' '.join(map(str, args.depths))}"
        ' > "$ULOGD_RUN/fio_guest.out" 2>&1\n'
    )
    legs = args.rounds * len(args.depths) * (len(DEVICES) + 0.25) + 1
    timeout = 300 + legs * (args.runtime + 15) * 2
    t0 = time.monotonic()
    run = run_in_guest(script, name="bench-fio", timeout=timeout, memory_mb=args.memory, smp=2)
    wall = time.monotonic() - t0
    result = run.result
    if run.returncode != 0 or result is None or not result.get("legs"):
        print(run.describe(60))
        print(run.artefact("fio_guest.out")[-4000:])
        return 1
    analysis = analyse(result, args.depths)
    info = common.machine()
    print(
        f"fio 4k randwrite direct, {args.runtime} s legs, median of {args.rounds} alternating "
        f"rounds, one QEMU boot (TCG, 2 vCPU), {wall:.0f} s wall; host load "
        f"{load_before[0]:.2f} -> {info['loadavg'][0]:.2f}"
    )
    rows = []
    for dev in DEVICES:
        row = [dev]
        for depth in args.depths:
            e = analysis[str(depth)][dev]
            row += [f"{e['iops']:,.0f}", f"{e['to_core']:.2f}"]
        rows.append(tuple(row))
    head: list[str] = ["device"]
    for depth in args.depths:
        head += [f"IOPS qd{depth}", "/core"]
    print(common.table(head, rows))
    for dev in ("ulogd", "ulogd-if"):
        for depth in args.depths:
            e = analysis[str(depth)][dev]
            target = TARGETS.get(depth)
            verdict = (
                f"; target >= {target}: {'met' if e['to_core'] >= target else 'NOT met'}"
                if target
                else ""
            )
            print(
                f"{dev} qd{depth}: {e['to_naive']:.2f} of the naive responder, "
                f"{e.get('requests_per_write', 0):.2f} requests/write, "
                f"Server.receive {e.get('receive_us', 0):.0f} us, loop turn "
                f"{e.get('loop_us_per_datagram', 0):.0f} us/datagram, daemon busy "
                f"{e.get('daemon_busy_fraction', 0) * 100:.0f} %{verdict}"
            )
    profile = run.artefact("profile.txt")
    out = common.write_results(
        "fio_qemu",
        {
            "loadavg_before": load_before,
            "wall_seconds": wall,
            "run_dir": str(run.run_dir),
            "targets": TARGETS,
            "analysis": analysis,
            "guest": result,
        },
        args.out,
    )
    if profile:
        prof_path = out.with_suffix(".profile.txt")
        prof_path.write_text(profile)
        print(f"daemon profile (qd{max(args.depths)} ulogd leg): {common.shown(prof_path)}")
    print(f"written {common.shown(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
