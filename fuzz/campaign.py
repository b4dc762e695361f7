"""The long fuzzing campaign: per target an instrumented (coverage-guided) exploration, then a
bulk run of ``--runs`` inputs mutating the corpus it built (see fuzz/README.rst).

    .venv/bin/python fuzz/campaign.py --work /var/tmp/ulogd-fuzz --explore 120 --runs 10000000

Results go to ``<work>/results.jsonl`` (one line per phase and target: inputs executed,
seconds, inputs per second, corpus size, crash artifacts) and libFuzzer logs to
``<work>/logs``; a crash stops that target and leaves its input in ``<work>/crashes``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

MAX_LEN = {"wire": 1024, "server": 2048, "capture": 8192, "statefile": 8192}
ORDER = ("wire", "ctr", "disklog", "capture", "messages", "checkpoint", "config", "group",
         "server", "statefile")  # fmt: skip


def _stats(log: str) -> dict[str, int]:
    return {k: int(v) for k, v in re.findall(r"stat::(\w+):\s+(\d+)", log)}


def run_phase(
    name: str, work: Path, bulk: bool, seconds: int, runs: int, cap: int = 0
) -> dict[str, object]:
    corpus = work / "corpus" / name
    crashes = work / "crashes"
    logs = work / "logs"
    crashes.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    args = [
        "nice", "-n", "10", sys.executable, str(HERE / f"fuzz_{name}.py"), str(corpus),
        f"-max_len={MAX_LEN.get(name, 4096)}", "-timeout=20", "-print_final_stats=1",
        f"-artifact_prefix={crashes}/{name}-",
    ]  # fmt: skip
    if bulk:
        # keep_seed: without coverage feedback libFuzzer would otherwise drop every corpus
        # input but one and mutate a single byte; cap: stop (with stats) after that long
        args += [f"-runs={runs}", "-keep_seed=1", *([f"-max_total_time={cap}"] if cap else [])]
    else:
        args.append(f"-max_total_time={seconds}")
    scratch = tempfile.mkdtemp(prefix=f"ulogd-fuzz-{name}-", dir="/dev/shm")
    env = dict(os.environ, ULOGD_FUZZ_SCRATCH=scratch)
    if bulk:
        env["ULOGD_FUZZ_BULK"] = "1"
    else:
        env.pop("ULOGD_FUZZ_BULK", None)
    start = time.monotonic()
    try:
        proc = subprocess.run(args, env=env, capture_output=True, text=True, check=False)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    elapsed = time.monotonic() - start
    phase = "bulk" if bulk else "explore"
    (logs / f"{name}-{phase}.log").write_text(proc.stderr + proc.stdout)
    stats = _stats(proc.stderr)
    units = stats.get("number_of_executed_units", 0)
    result = {
        "target": name,
        "phase": phase,
        "inputs": units,
        "seconds": round(elapsed, 1),
        "per_second": round(units / elapsed) if elapsed else 0,
        "exit": proc.returncode,
        "corpus": len(list(corpus.iterdir())),
        "crashes": sorted(p.name for p in crashes.glob(f"{name}-*")),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    with (work / "results.jsonl").open("a") as out:
        out.write(json.dumps(result) + "\n")
    print(json.dumps(result), flush=True)
    return result


def campaign(name: str, work: Path, explore: int, runs: int, cap: int = 0) -> None:
    from fuzz import seeds

    corpus = work / "corpus" / name
    if not corpus.exists():
        corpus.mkdir(parents=True)
        for i, item in enumerate(seeds.seeds()[name]):
            (corpus / f"seed-{i:03d}").write_bytes(item)
    if explore:
        result = run_phase(name, work, False, explore, 0)
        if result["exit"]:
            return
    if runs:
        run_phase(name, work, True, 0, runs, cap)


def report(work: Path, since: str = "") -> str:
    """An RST table of ``results.jsonl``: per target the last exploration and the sum of the
    bulk runs finished at or after ``since`` ("YYYY-MM-DD HH:MM"; explorations: any time)."""
    rows: dict[str, dict[str, dict[str, object]]] = {}
    for line in (work / "results.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["phase"] == "bulk" and r["finished"] < since:
            continue
        phases = rows.setdefault(r["target"], {})
        if r["phase"] == "bulk" and "bulk" in phases:
            b = phases["bulk"]
            total = {k: b[k] + r[k] for k in ("inputs", "seconds")}  # type: ignore[operator]
            r = {**r, **total, "crashes": [*b["crashes"], *r["crashes"]]}  # type: ignore[misc]
            r["per_second"] = round(r["inputs"] / r["seconds"])  # type: ignore[operator]
        phases[r["phase"]] = r
    head = ("target", "explore inputs", "s", "corpus", "bulk inputs", "s", "per s", "crashes")
    out = [head]
    for name in ORDER:
        e, b = rows.get(name, {}).get("explore", {}), rows.get(name, {}).get("bulk", {})
        crashes = len(e.get("crashes", [])) + len(b.get("crashes", []))  # type: ignore[arg-type]
        out.append((name, f"{e.get('inputs', 0):,}", str(round(e.get("seconds", 0), 1)),  # type: ignore[call-overload]
                    str(e.get("corpus", "-")), f"{b.get('inputs', 0):,}",
                    str(round(b.get("seconds", 0), 1)), str(b.get("per_second", "-")),  # type: ignore[call-overload]
                    str(crashes)))  # fmt: skip
    widths = [max(len(row[i]) for row in out) for i in range(len(head))]
    rule = "  ".join("=" * w for w in widths)
    cells = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in out]  # fmt: skip
    lines = [rule, cells[0], rule, *cells[1:]]
    return "\n".join([*lines, rule])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work", type=Path, default=Path("/var/tmp/ulogd-fuzz"))
    parser.add_argument("--targets", default=",".join(ORDER))
    parser.add_argument("--explore", type=int, default=120, help="seconds instrumented")
    parser.add_argument("--runs", type=int, default=10_000_000, help="bulk inputs")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--bulk-cap", type=int, default=0, help="bulk seconds at most (0: none)")
    parser.add_argument("--report", action="store_true", help="print the results table")
    parser.add_argument("--since", default="", help="report runs finished from this time on")
    args = parser.parse_args()
    if args.report:
        print(report(args.work, args.since))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    names = args.targets.split(",")
    with ThreadPoolExecutor(args.jobs) as pool:
        jobs = [
            pool.submit(campaign, n, args.work, args.explore, args.runs, args.bulk_cap)
            for n in names
        ]
        for future in jobs:
            future.result()


if __name__ == "__main__":
    main()
