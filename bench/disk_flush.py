"""Disk log: bytes written per FLUSH for sparse marks vs writing the whole bitmap (cmirrord).

Run (root for the loop devices): ``.venv/bin/python bench/disk_flush.py [--quick]
[--writes N] [--rounds R] [--no-loop]``.

A ``clustered-disk`` log of 2^20 regions (nosync) is driven in process
(:class:`ulogd.testing.driver.InProcess` performs the disk actions synchronously, as the
daemon's disk worker would) with the kernel's request sequence for single 4 KiB writes to
random regions: MARK_REGION, FLUSH, CLEAR_REGION, FLUSH.  A wrapper around the log device
counts the bytes and extents each FLUSH writes and times each write (including its
``fdatasync``), and whether it waited for stable storage (the MARK's FLUSH does, the CLEAR's
does not: ``durable_per_flush`` is 0.5).  The baseline is what cmirrord does on every flush:
write the whole on-disk unit (header + the full bitmap,
``disklog.plan_write(..., chunks=None)``), issued on the same device and timed the same way,
alternating with the ulogd rounds.

Devices: ``disklog.MemoryDiskLog`` with 512-byte blocks (bytes only, no real I/O), and, when
``losetup --sector-size`` works here, loop devices over files on ``/dev/shm`` with 512 and
4096-byte logical blocks opened by ``disklog.DiskLogDevice`` (``O_DIRECT`` + ``fdatasync``,
as the daemon opens them).  Target: bytes per FLUSH <= 1/100 of the whole bitmap.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

from ulogd.engine.server import Server
from ulogd.protocol.spec import RequestType as T
from ulogd.state import disklog
from ulogd.testing.driver import InProcess, LogDriver

REGIONS = 1 << 20
REGION_SIZE = 1024
TARGET = 1 / 100


class Counting:
    """A log device wrapper that records what each write costs."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.block_size: int = inner.block_size
        self.size_bytes: int = inner.size_bytes
        self.rdev: tuple[int, int] | None = inner.rdev
        self.writes: list[tuple[int, int, float]] = []  # (bytes, extents, seconds)
        self.durable: list[bool] = []  # per write: waited for stable storage

    def read(self, nbytes: int) -> bytes:
        data: bytes = self.inner.read(nbytes)
        return data

    def write_extents(self, extents: list[tuple[int, bytes]], flush: bool = True) -> None:
        t0 = time.perf_counter()
        self.inner.write_extents(extents, flush)
        self.writes.append(
            (sum(len(d) for _, d in extents), len(extents), time.perf_counter() - t0)
        )
        self.durable.append(flush)

    def close(self) -> None:
        pass  # the benchmark closes the real device itself


@contextlib.contextmanager
def loop_device(block: int, size: int) -> Iterator[str]:
    d = Path(tempfile.mkdtemp(prefix="ulogd-bench-disk-", dir="/dev/shm"))
    image = d / "log.img"
    image.write_bytes(b"")
    with open(image, "r+b") as fh:
        fh.truncate(size)
    dev = subprocess.run(
        ["losetup", "--sector-size", str(block), "-f", "--show", str(image)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)
        shutil.rmtree(d, ignore_errors=True)


def loop_works() -> bool:
    try:
        with loop_device(4096, 1 << 20):
            return True
    except (OSError, subprocess.CalledProcessError):
        return False


def drive(device: Counting, writes: int, rounds: int, seed: int = 5) -> dict[str, Any]:
    server = Server(open_device=lambda _arg: device)  # type: ignore[arg-type, return-value]
    link = InProcess(server)
    d = LogDriver(link, uuid="LVM-bench-disk-flush", luid=9)
    d.create(f"{REGIONS * REGION_SIZE} clustered-disk /dev/benchlog {REGION_SIZE} nosync")
    d.flush()  # anything left from the resume
    rng = random.Random(seed)
    full_plan = lambda: disklog.plan_write(  # noqa: E731
        server.logs[("LVM-bench-disk-flush", 9)].log.clean, REGIONS, None, device.block_size
    )
    ulogd_rounds: list[dict[str, float]] = []
    full_rounds: list[dict[str, float]] = []
    for _ in range(rounds):
        start = len(device.writes)
        flushes = 0
        for _ in range(writes):
            r = rng.randrange(REGIONS)
            assert d.mark([r]).error == 0
            assert d.flush().error == 0
            assert d.clear([r]).error == 0
            assert d.flush().error == 0
            flushes += 2
        done = device.writes[start:]
        durable = device.durable[start:]
        ulogd_rounds.append(
            {
                "durable_per_flush": sum(durable) / flushes,
                "bytes_per_flush": sum(w[0] for w in done) / flushes,
                "extents_per_flush": sum(w[1] for w in done) / flushes,
                "seconds_per_flush": common.median([w[2] for w in done]) if done else 0.0,
                "writes_per_flush": len(done) / flushes,
            }
        )
        # cmirrord: the whole unit on every flush, on the same device
        start = len(device.writes)
        for _ in range(min(writes, 200)):
            device.write_extents(full_plan())
        done = device.writes[start:]
        full_rounds.append(
            {
                "bytes_per_flush": sum(w[0] for w in done) / len(done),
                "seconds_per_flush": common.median([w[2] for w in done]),
            }
        )
    d.ok(T.PRESUSPEND)
    d.ok(T.POSTSUSPEND)
    d.ok(T.DTR)
    server.close()
    out: dict[str, Any] = {
        "block_size": device.block_size,
        "io_size": disklog.io_size(REGIONS, device.block_size),
        "ulogd": {k: common.median([r[k] for r in ulogd_rounds]) for k in ulogd_rounds[0]},
        "whole_bitmap": {k: common.median([r[k] for r in full_rounds]) for k in full_rounds[0]},
        "rounds": {"ulogd": ulogd_rounds, "whole_bitmap": full_rounds},
    }
    out["bytes_ratio"] = common.median(
        common.ratios(
            [r["bytes_per_flush"] for r in ulogd_rounds],
            [r["bytes_per_flush"] for r in full_rounds],
        )
    )
    out["time_ratio"] = common.median(
        common.ratios(
            [r["seconds_per_flush"] for r in ulogd_rounds],
            [r["seconds_per_flush"] for r in full_rounds],
        )
    )
    return out


def _size(block: int) -> int:
    return disklog.io_size(REGIONS, block) + (1 << 20)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--writes", type=int, default=1000, help="writes per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-loop", action="store_true", help="memory device only")
    parser.add_argument("--quick", action="store_true", help="tiny run (the smoke test)")
    parser.add_argument("--out", type=Path, help="JSON file (default bench/results/...)")
    args = parser.parse_args(argv)
    if args.quick:
        args.writes, args.rounds, args.no_loop = 20, 1, True
    load_before = common.loadavg()
    results: dict[str, Any] = {}
    results["memory-512"] = drive(
        Counting(disklog.MemoryDiskLog(_size(512), block_size=512, rdev=(7, 99))),
        args.writes,
        args.rounds,
    )
    skipped = None
    if args.no_loop:
        skipped = "--no-loop"
    elif not loop_works():
        skipped = "losetup --sector-size does not work here"
    else:
        for block in (512, 4096):
            with loop_device(block, _size(block)) as dev:
                real = disklog.DiskLogDevice.open(dev)
                try:
                    results[f"loop-{block}"] = drive(Counting(real), args.writes, args.rounds)
                    results[f"loop-{block}"]["device"] = dev
                    results[f"loop-{block}"]["direct"] = real.direct
                finally:
                    real.close()
    print(
        f"bytes written per FLUSH, {REGIONS:,}-region clustered-disk log, single-region writes "
        f"(MARK, FLUSH, CLEAR, FLUSH) x {args.writes} x {args.rounds} rounds; load "
        f"{load_before[0]:.2f}"
    )
    rows = []
    for name, r in results.items():
        rows.append(
            (
                name,
                f"{r['ulogd']['bytes_per_flush']:,.0f}",
                f"{r['whole_bitmap']['bytes_per_flush']:,.0f}",
                f"1/{1 / r['bytes_ratio']:,.0f}",
                f"{r['ulogd']['seconds_per_flush'] * 1e6:,.0f}",
                f"{r['whole_bitmap']['seconds_per_flush'] * 1e6:,.0f}",
                f"{r['time_ratio']:.3f}",
            )
        )
    head = ("device", "ulogd B/flush", "whole bitmap B", "ratio", "ulogd us", "whole us",
            "time ratio")  # fmt: skip
    print(common.table(head, rows))
    if skipped:
        print(f"loop devices skipped: {skipped}")
    met = {name: r["bytes_ratio"] <= TARGET for name, r in results.items()}
    verdicts = ", ".join(f"{name} {'met' if ok else 'NOT met'}" for name, ok in met.items())
    print(f"target <= 1/100 of the whole bitmap: {verdicts}")
    payload = {
        "regions": REGIONS,
        "writes": args.writes,
        "rounds": args.rounds,
        "loadavg_before": load_before,
        "loop_skipped": skipped,
        "target": TARGET,
        "devices": results,
    }
    out = common.write_results("disk_flush", payload, args.out)
    print(f"written {common.shown(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
