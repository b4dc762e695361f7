"""How fast ``dm-ulogd replay`` goes: captured requests replayed per second.

Run: ``.venv/bin/python bench/replay_speed.py [--requests N] [--rounds R] [FILE ...]``.

Measures, in one process and one run:

* every shipped capture in ``captures/`` (or the FILEs given), replayed ``--rounds`` times;
* a larger synthetic capture recorded in-process (a mirror of 4096 regions: create, full
  resync, then marks/flushes/clears and status calls until ``--requests`` requests), so the
  rate is not dominated by start-up costs;

and for each input the time of a bare ``read_capture`` loop over the same file (one pass),
so the replay's cost can be read relative to just parsing the file (the replay reads each
file twice: once to index the recorded replies, once to replay the requests).  Prints a
table and writes the numbers as JSON to ``bench/results/`` (git-ignored).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ulogd.edges.capture import CaptureWriter, Direction  # noqa: E402
from ulogd.edges.capture_reader import read_capture  # noqa: E402
from ulogd.engine.server import Server  # noqa: E402
from ulogd.ops import replay  # noqa: E402
from ulogd.protocol.spec import RequestType as T  # noqa: E402
from ulogd.testing.driver import InProcess, LogDriver  # noqa: E402


class _Recorder:
    def __init__(self, server: Server, writer: CaptureWriter) -> None:
        self.inner = InProcess(server)
        self.writer = writer
        self.requests = 0

    def request(self, datagram: bytes) -> bytes:
        self.requests += 1
        self.writer.record(Direction.TO_DAEMON, datagram)
        (reply,) = self.inner.exchange(datagram)
        self.writer.record(Direction.FROM_DAEMON, reply)
        return reply


def synthetic_capture(path: Path, requests: int) -> int:
    writer = CaptureWriter(path, background=False)
    link = _Recorder(Server(), writer)
    d = LogDriver(link, uuid="LVM-bench-replay", luid=1)
    d.create("4194304 clustered-core 1024")  # 4096 regions
    while link.requests < requests // 2:
        if not d.resync_all():
            break
    region = 0
    while link.requests < requests:
        d.ok(T.IN_SYNC, struct.pack("=Q", region))
        d.mark([region])
        d.flush()
        d.clear([region])
        d.flush()
        if region % 64 == 0:
            d.sync_count()
            d.status_info()
        region = (region + 1) % 4096
    writer.close()
    return link.requests


def bare_read(path: Path) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = 0
    for _ in read_capture(path):
        n += 1
    return time.perf_counter() - t0, n


def measure(name: str, paths: list[Path], rounds: int) -> dict[str, Any]:
    replay_times: list[float] = []
    read_times: list[float] = []
    report = None
    for _ in range(rounds):
        read_times.append(sum(bare_read(p)[0] for p in paths))
        t0 = time.perf_counter()
        report = replay.replay(paths)
        replay_times.append(time.perf_counter() - t0)
    assert report is not None
    best_replay = min(replay_times)
    best_read = min(read_times)
    return {
        "name": name,
        "files": [str(p.relative_to(REPO)) if p.is_relative_to(REPO) else p.name for p in paths],
        "bytes": sum(p.stat().st_size for p in paths),
        "packets": report.packets,
        "requests": report.replayed,
        "mismatches": report.total(replay.MISMATCH),
        "rounds": rounds,
        "replay_seconds_best": best_replay,
        "replay_seconds_median": statistics.median(replay_times),
        "requests_per_second": report.replayed / best_replay if best_replay else None,
        "bare_read_seconds_best": best_read,
        "packets_per_second_bare_read": report.packets / best_read if best_read else None,
        "replay_vs_bare_read": best_replay / best_read if best_read else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", type=Path, help="captures (default: captures/)")
    parser.add_argument("--requests", type=int, default=50_000, help="synthetic capture size")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    inputs: list[tuple[str, list[Path]]] = []
    if args.files:
        inputs += [(p.name, [p]) for p in args.files]
    else:
        shipped = REPO / "captures"
        for name in ("lifecycle", "integrated-flush", "clustered-disk"):
            path = shipped / f"{name}.pcapng"
            if path.exists():
                inputs.append((name, [path]))
        pair = [shipped / "restart-1.pcapng", shipped / "restart-2.pcapng"]
        if all(p.exists() for p in pair):
            inputs.append(("restart (2 files)", pair))

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        synthetic = Path(tmp) / "synthetic.pcapng"
        t0 = time.perf_counter()
        made = synthetic_capture(synthetic, args.requests)
        record_seconds = time.perf_counter() - t0
        for name, paths in inputs:
            results.append(measure(name, paths, args.rounds))
        synth = measure(f"synthetic ({made} requests)", [synthetic], args.rounds)
        synth["record_seconds"] = record_seconds
        results.append(synth)

    head = ("capture", "requests", "replay s", "req/s", "bare read s", "replay/read")
    rows = [
        (
            r["name"],
            str(r["requests"]),
            f"{r['replay_seconds_best']:.4f}",
            f"{r['requests_per_second']:,.0f}",
            f"{r['bare_read_seconds_best']:.4f}",
            f"{r['replay_vs_bare_read']:.1f}x",
        )
        for r in results
    ]
    widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head))]
    print(f"dm-ulogd replay speed (best of {args.rounds}; python {platform.python_version()})")
    for row in [head, *rows]:
        print(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    if any(r["mismatches"] for r in results):
        print("WARNING: mismatches found; the timing includes reporting them")

    out_dir = REPO / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = out_dir / f"replay_speed-{stamp}.json"
    out.write_text(
        json.dumps(
            {
                "benchmark": "replay_speed",
                "when": stamp,
                "python": platform.python_version(),
                "machine": platform.machine(),
                "rounds": args.rounds,
                "results": results,
            },
            indent=1,
        )
    )
    print(f"written {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
