"""Real kernel, one QEMU boot: fio 4 KiB random writes on dm-mirror with each dirty log.

Run (root; builds or reuses the QEMU artefacts of ``tests.harness.qemu``):
``.venv/bin/python bench/fio_qemu.py [--rounds 3] [--runtime 10] [--depths 1 16]``.

Builds the stateless C responder (``c_responder.c``) statically with the host's compiler
when one is installed (else says so and skips only those legs), boots Debian's kernel under
QEMU (TCG) once and runs ``bench/guest/fio_guest.py`` in it: on loop devices over guest-tmpfs
files (128 MiB legs, 256 regions, nosync) it measures, every round in a rotating order, fio
``randwrite`` 4 KiB ``direct`` (libaio) at each iodepth on

* a linear device (no mirror),
* mirrors with the kernel's own ``core`` and ``disk`` logs (``core`` is the first baseline),
* ``c`` / ``c-if``: ``clustered-core`` mirrors (plain / ``integrated_flush``) served by the
  stateless C responder, blocking ``recv``/``sendto`` (the floor of a blocking userspace hop),
* ``py``: the same served by ``guest/naive_responder.py`` (the stateless Python responder),
* ulogd with adaptive polling: ``ulogd`` (``clustered-core``), ``ulogd-if``
  (``integrated_flush``), ``ulogd-disk`` (``clustered-disk`` on a loop log device), and each
  with polling off (``-off``: the same daemon and mirror, switched by signal).

Figures are medians over the rounds; ratios are medians of per-round ratios (same round,
same iodepth).  For every served leg the server's CPU time (utime + stime) is turned into
CPU-seconds per 1000 writes.  For the ulogd legs the daemon (``guest/ulogd_timed.py``) also
reports requests per write and its service times; a final leg runs it under cProfile.
Targets (issue 17): ``ulogd`` >= 1.0x ``c`` at iodepth 1 and >= 0.8x at iodepth 16;
``ulogd-if`` >= 1.0x ``c-if`` at iodepth 1; ``ulogd-disk`` / ``ulogd`` >= ``disk`` / ``core``.
Prints a table and writes JSON (and the profile) to ``bench/results/``.
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
import responders

from tests.harness.qemu import run_in_guest

DEVICES = (
    "linear", "core", "disk", "c", "c-if", "py",
    "ulogd-off", "ulogd", "ulogd-if-off", "ulogd-if", "ulogd-disk-off", "ulogd-disk",
)  # fmt: skip
#: (device, baseline, iodepth, target ratio)
TARGETS = (("ulogd", "c", 1, 1.0), ("ulogd", "c", 16, 0.8), ("ulogd-if", "c-if", 1, 1.0))


def _ratio(per_round: dict[str, dict[int, float]], a: str, b: str) -> float | None:
    values = [
        per_round[a][r] / per_round[b][r]
        for r in per_round[a]
        if r in per_round[b] and per_round[b][r]
    ]
    return common.median(values) if values else None


def analyse(result: dict[str, Any], depths: list[int]) -> dict[str, Any]:
    legs = result["legs"]
    out: dict[str, Any] = {}
    for depth in depths:
        per_round: dict[str, dict[int, float]] = {d: {} for d in DEVICES}
        cpu: dict[str, list[float]] = {d: [] for d in DEVICES}
        for leg in legs:
            if leg["depth"] == depth and leg["device"] in per_round:
                per_round[leg["device"]][leg["round"]] = leg["iops"]
                if "server_cpu_s" in leg and leg.get("ios"):
                    cpu[leg["device"]].append(leg["server_cpu_s"] / leg["ios"] * 1000)
        entry: dict[str, Any] = {}
        for dev in DEVICES:
            if not per_round[dev]:
                continue
            values = [per_round[dev][r] for r in sorted(per_round[dev])]
            entry[dev] = {
                "iops": common.median(values),
                "iops_rounds": values,
                "to_core": _ratio(per_round, dev, "core"),
                "to_c": _ratio(per_round, dev, "c" if "-if" not in dev else "c-if"),
                "to_py": _ratio(per_round, dev, "py"),
                "cpu_s_per_1000_writes": common.median(cpu[dev]) if cpu[dev] else None,
            }
            if dev.startswith("ulogd") and dev.endswith("-off"):
                entry[dev]["adaptive_to_off"] = None
            elif dev.startswith("ulogd"):
                entry[dev]["adaptive_to_off"] = _ratio(per_round, dev, f"{dev}-off")
            stats = [leg["ulogd"] for leg in legs if leg["depth"] == depth and leg["device"] == dev
                     and "ulogd" in leg]  # fmt: skip
            if stats:
                entry[dev]["requests_per_write"] = common.median(
                    [s["requests_per_write"] for s in stats]
                )
                entry[dev]["receive_us"] = common.median([s["receive_us_mean"] or 0 for s in stats])
                entry[dev]["loop_us_per_datagram"] = common.median(
                    [s["loop_us_per_datagram"] or 0 for s in stats]
                )
                entry[dev]["by_type"] = stats[-1]["by_type"]
                busy = [
                    s["requests"] * (s["loop_us_per_datagram"] or 0) / 1e6 / s["wall_s"]
                    for s in stats
                    if s["wall_s"]
                ]
                entry[dev]["daemon_busy_fraction"] = common.median(busy) if busy else 0.0
        if "ulogd-disk" in entry and "disk" in entry:
            ud = _ratio(per_round, "ulogd-disk", "ulogd")
            kd = _ratio(per_round, "disk", "core")
            entry["disk_to_core"] = {"ulogd": ud, "kernel": kd}
        out[str(depth)] = entry
    return out


def _f(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


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
    binary = responders.build_c_responder()
    if binary is None:
        print(f"C responder baseline skipped: {responders.WHY_NO_C[0]}")
    else:
        script = script.replace(
            "--runtime", f"--c-responder {shlex.quote(str(binary))} --runtime", 1
        )
    legs = args.rounds * len(args.depths) * (len(DEVICES) + 0.25) + 4 * args.rounds + 1
    timeout = 300 + legs * (args.runtime + 20) * 2
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
        if dev not in analysis[str(args.depths[0])]:
            continue
        row = [dev]
        for depth in args.depths:
            e = analysis[str(depth)].get(dev, {})
            row += [
                _f(e.get("iops"), ",.0f"),
                _f(e.get("to_core"), ".2f"),
                _f(e.get("to_c"), ".2f"),
                _f(e.get("to_py"), ".2f"),
                _f(e.get("cpu_s_per_1000_writes"), ".3f"),
            ]
        rows.append(tuple(row))
    head: list[str] = ["device"]
    for depth in args.depths:
        head += [f"IOPS qd{depth}", "/core", "/C", "/py", "CPU s/1k wr"]
    print(common.table(head, rows))
    print("(/C: to the C responder with the same flush mode; CPU: the serving process)")
    verdicts = []
    for dev, base, depth, target in TARGETS:
        e = analysis.get(str(depth), {}).get(dev)
        if e is None or e.get("to_c") is None:
            verdicts.append(f"{dev} / {base} qd{depth} >= {target}: not measured")
            continue
        ok = e["to_c"] >= target
        verdicts.append(
            f"{dev} / {base} qd{depth}: {e['to_c']:.2f} (target >= {target}: "
            f"{'met' if ok else 'NOT met'})"
        )
    for depth in args.depths:
        dc = analysis[str(depth)].get("disk_to_core")
        if dc and dc["ulogd"] is not None and dc["kernel"] is not None:
            ok = dc["ulogd"] >= dc["kernel"]
            verdicts.append(
                f"qd{depth} clustered-disk / clustered-core {dc['ulogd']:.2f} vs kernel disk / "
                f"core {dc['kernel']:.2f}: {'met' if ok else 'NOT met'}"
            )
    for dev in ("ulogd", "ulogd-if", "ulogd-disk"):
        for depth in args.depths:
            e = analysis[str(depth)].get(dev)
            if e is None:
                continue
            verdicts.append(
                f"{dev} qd{depth}: adaptive / off {_f(e.get('adaptive_to_off'), '.2f')}, "
                f"{e.get('requests_per_write', 0):.2f} requests/write, Server.receive "
                f"{e.get('receive_us', 0):.0f} us, loop turn "
                f"{e.get('loop_us_per_datagram', 0):.0f} us/datagram, daemon busy "
                f"{e.get('daemon_busy_fraction', 0) * 100:.0f} %"
            )
    print("\n".join(verdicts))
    profile = run.artefact("profile.txt")
    out = common.write_results(
        "fio_qemu",
        {
            "loadavg_before": load_before,
            "wall_seconds": wall,
            "run_dir": str(run.run_dir),
            "targets": TARGETS,
            "c_responder": str(binary) if binary else responders.WHY_NO_C[0],
            "analysis": analysis,
            "verdicts": verdicts,
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
