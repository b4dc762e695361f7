"""Shared helpers of the ``bench/`` scripts: the machine, statistics, tables, JSON results.

Every benchmark measures its baseline in the same run, alternating rounds with the thing
measured, and reports medians and ratios: on a shared, noisy machine only the ratio means
something.  Results are written as JSON to ``bench/results/`` (git-ignored), together with
:func:`machine` (CPU, cores, load average at the start and the end).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def loadavg() -> tuple[float, float, float]:
    return os.getloadavg()


def machine() -> dict[str, Any]:
    """What the figures were measured on (the load average says how noisy it was)."""
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpu": cpu_model(),
        "loadavg": [round(x, 2) for x in loadavg()],
        "python": platform.python_version(),
        "kernel": platform.release(),
        "mem_total_gib": round(_mem_total() / (1 << 30), 1),
    }


def _mem_total() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def mem_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (``p`` in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[index]


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def pin_to_one_cpu() -> int | None:
    """Keep this process on one CPU (the one it runs on now); returns it, or None."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
        cpu = os.sched_getcpu() if hasattr(os, "sched_getcpu") else cpus[-1]
        os.sched_setaffinity(0, {cpu})
        return cpu
    except (AttributeError, OSError):
        return None


def alternate(variants: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Run every variant once per round, in a rotating order; each returns one figure."""
    names = list(variants)
    out: dict[str, list[float]] = {name: [] for name in names}
    for i in range(rounds):
        order = names[i % len(names) :] + names[: i % len(names)]
        for name in order:
            out[name].append(variants[name]())
    return out


class Timer:
    """Wall-clock and CPU time of a block (``with Timer() as t: ...``; ``t.wall``, ``t.cpu``).

    On a shared machine the process is often descheduled: its CPU time (``process_time``)
    is the cost of the work on one core, the wall time what a client would have seen."""

    wall = 0.0
    cpu = 0.0

    def __enter__(self) -> Timer:
        self._w = time.perf_counter()
        self._c = time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cpu = time.process_time() - self._c
        self.wall = time.perf_counter() - self._w


def rates(count: int, timer: Timer) -> dict[str, float]:
    """Operations per second of wall time and per second of CPU time."""
    return {
        "per_cpu_s": count / timer.cpu if timer.cpu > 0 else float("inf"),
        "per_wall_s": count / timer.wall if timer.wall > 0 else float("inf"),
    }


def ratios(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """Per-round ratios a[i] / b[i] (rounds are paired: measured back to back)."""
    return [x / y for x, y in zip(a, b, strict=True) if y]


def table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain text table, the first column left-aligned, the others right-aligned."""
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    lines = []
    for row in [head, *rows]:
        lines.append(
            "  ".join(
                str(c).ljust(w) if i == 0 else str(c).rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    return "\n".join(lines)


def write_results(name: str, payload: dict[str, Any], out: Path | None = None) -> Path:
    """Write ``payload`` (plus the machine) as ``bench/results/<name>-<stamp>.json``."""
    payload = {"benchmark": name, "machine": machine(), **payload}
    if out is None:
        RESULTS.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out = RESULTS / f"{name}-{stamp}.json"
    out.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    return out


def corosync_setup(**extra: Any) -> dict[str, Any]:
    """:func:`machine` plus the installed corosync's version: the cluster benchmarks' setup."""
    try:
        out = subprocess.run(["corosync", "-v"], capture_output=True, text=True).stdout
    except OSError:
        out = ""
    return {**machine(), "corosync": out.splitlines()[0] if out else "?", **extra}


def save_report(name: str, report: dict[str, Any], directory: Path) -> Path:
    """Write ``report`` as ``<directory>/<name>-<stamp>.json`` and say where."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"\nwritten: {shown(path)}")
    return path


def shown(path: Path) -> str:
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return str(path)
