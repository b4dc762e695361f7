"""What a disk log's FLUSH costs beyond a core log's, piece by piece (issue 17, the durable path).

Run (root for the loop device): ``.venv/bin/python bench/durable_path.py [--quick]
[--writes N] [--rounds R]``.

Three measurements, each alternating with its baseline every round (medians over rounds):

1. **the device write** of one 512-byte block on a loop device over ``/dev/shm`` opened as the
   daemon opens it (``disklog.DiskLogDevice``: ``O_DIRECT``): ``pwritev`` + ``fdatasync``
   (two system calls: the durable write), ``pwritev(RWF_DSYNC)`` (one call: tried and not
   kept, slower), ``DiskLogDevice.write_extents`` (the durable write as the worker does it)
   and a plain ``pwritev`` (``flush=False``: a FLUSH that only records clears);
2. **the hand-off** to the disk worker thread (``daemon.DiskWorker``: queue, thread wake-up,
   completion through the ``eventfd``) for the same write on a memory device, vs calling the
   device inline;
3. **the whole cycle** through a running ``dm-ulogd run --transport unix:PATH`` (``--poll off``
   and ``adaptive``):
   MARK, FLUSH, CLEAR, FLUSH per write (one request in flight) on a ``clustered-disk`` log
   on the loop device vs the same on a ``clustered-core`` log of the same daemon: the disk
   log's cost ratio (the kernel's ``disk`` / ``core`` ratio is measured in QEMU by
   ``fio_qemu.py``).

Loop legs are skipped (saying so) when ``losetup`` does not work here.  Prints a table and
writes JSON to ``bench/results/``.
"""

from __future__ import annotations

import argparse
import os
import queue
import random
import select
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import disk_flush
import transport_latency

from ulogd.edges import daemon
from ulogd.edges.transport.unixsock import UnixClient
from ulogd.engine.actions import DiskWrite
from ulogd.protocol import wire
from ulogd.protocol.spec import RequestType as T
from ulogd.state import disklog

BLOCK = 512


def device_writes(path: str, writes: int, rounds: int) -> dict[str, Any]:
    """Seconds per durable/cached write of one block, three ways, alternating."""
    dev = disklog.DiskLogDevice.open(path)
    data = [(BLOCK * 4, bytes([i % 251]) * BLOCK) for i in range(writes)]
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    buf = disklog.DiskLogDevice(fd, path, rdev=None, block_size=BLOCK, size_bytes=1 << 20,
                                direct=True)._buffer(BLOCK)  # fmt: skip
    view = memoryview(buf)

    def timed(one: Any) -> float:
        t0 = time.perf_counter()
        for extent in data:
            one(extent)
        return (time.perf_counter() - t0) / writes

    def write_then_fdatasync(extent: tuple[int, bytes]) -> None:
        view[:BLOCK] = extent[1]
        os.pwritev(fd, [view[:BLOCK]], extent[0])
        os.fdatasync(fd)

    def write_dsync(extent: tuple[int, bytes]) -> None:
        view[:BLOCK] = extent[1]
        os.pwritev(fd, [view[:BLOCK]], extent[0], os.RWF_DSYNC)

    try:
        rounds_out = common.alternate(
            {
                "pwritev+fdatasync": lambda: timed(write_then_fdatasync),
                "pwritev(RWF_DSYNC)": lambda: timed(write_dsync),
                "durable write_extents": lambda: timed(lambda e: dev.write_extents([e])),
                "cached pwritev": lambda: timed(lambda e: dev.write_extents([e], flush=False)),
            },
            rounds,
        )
    finally:
        view.release()
        os.close(fd)
        dev.close()
    out: dict[str, Any] = {"rounds": rounds_out}
    out["us"] = {k: common.median(v) * 1e6 for k, v in rounds_out.items()}
    base = rounds_out["pwritev+fdatasync"]
    out["to_two_syscalls"] = {
        k: common.median(common.ratios(v, base)) for k, v in rounds_out.items()
    }
    return out


def hand_off(writes: int, rounds: int) -> dict[str, Any]:
    """Seconds per write through a DiskWorker (wait on its eventfd) vs inline."""
    dev = disklog.MemoryDiskLog(1 << 20)
    done: queue.SimpleQueue[Any] = queue.SimpleQueue()
    wake = os.eventfd(0, os.EFD_CLOEXEC)
    worker = daemon.DiskWorker(dev, done, wake)
    extent = [(0, bytes(BLOCK))]
    poller = select.epoll()
    poller.register(wake, select.EPOLLIN)

    def through_worker() -> float:
        t0 = time.perf_counter()
        for token in range(writes):
            worker.submit(DiskWrite(token, dev, extent, "bench", False))
            poller.poll()
            os.eventfd_read(wake)
            while not done.empty():
                done.get_nowait()
        return (time.perf_counter() - t0) / writes

    def inline() -> float:
        t0 = time.perf_counter()
        for _ in range(writes):
            dev.write_extents(extent, False)
        return (time.perf_counter() - t0) / writes

    try:
        r = common.alternate({"worker": through_worker, "inline": inline}, rounds)
    finally:
        worker.stop()
        poller.close()
        os.close(wake)
    return {
        "rounds": r,
        "us": {k: common.median(v) * 1e6 for k, v in r.items()},
        "worker_to_inline": common.median(common.ratios(r["worker"], r["inline"])),
    }


def cycles(loop_dev: str, writes: int, rounds: int, poll: str = "off") -> dict[str, Any]:
    """Seconds per MARK+FLUSH+CLEAR+FLUSH through a daemon, clustered-disk vs -core."""
    shm = "/dev/shm" if Path("/dev/shm").is_dir() else None
    workdir = Path(tempfile.mkdtemp(prefix="ulogd-bench-durable-", dir=shm))
    regions = 4096
    rng = random.Random(3)
    seq = [1000]

    def request(client: UnixClient, luid: int, rtype: int, data: bytes = b"") -> None:
        seq[0] += 1
        reply = wire.decode_reply(
            client.request(
                wire.encode_request(rtype, uuid=f"LVM-bench-durable-{luid}", luid=luid,
                                    seq=seq[0], data=data)
            )
        )  # fmt: skip
        assert reply.error == 0, (rtype, reply)

    try:
        with transport_latency.daemon(workdir, None, poll) as (path, _pid):
            client = UnixClient(path)
            tables = {
                1: f"{regions * 1024} clustered-core 1024 nosync",
                2: f"{regions * 1024} clustered-disk {loop_dev} 1024 nosync",
            }
            for luid, table in tables.items():
                for rtype, data in ((T.CTR, table.encode()), (T.RESUME, b"")):
                    request(client, luid, rtype, data)

            def cycle(luid: int) -> float:
                t0 = time.perf_counter()
                for _ in range(writes):
                    region = struct.pack("=Q", rng.randrange(regions))
                    request(client, luid, T.MARK_REGION, region)
                    request(client, luid, T.FLUSH)
                    request(client, luid, T.CLEAR_REGION, region)
                    request(client, luid, T.FLUSH)
                return (time.perf_counter() - t0) / writes

            r = common.alternate({"core": lambda: cycle(1), "disk": lambda: cycle(2)}, rounds)
            request(client, 2, T.PRESUSPEND)
            request(client, 2, T.POSTSUSPEND)
            request(client, 2, T.DTR)
            client.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "rounds": r,
        "us": {k: common.median(v) * 1e6 for k, v in r.items()},
        "disk_to_core": common.median(common.ratios(r["disk"], r["core"])),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--writes", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="tiny run (the smoke test)")
    parser.add_argument("--out", type=Path, help="JSON file (default bench/results/...)")
    args = parser.parse_args(argv)
    if args.quick:
        args.writes, args.rounds = 50, 1
    load_before = common.loadavg()
    result: dict[str, Any] = {"writes": args.writes, "loadavg_before": load_before}
    result["hand_off"] = hand_off(args.writes, args.rounds)
    loop_ok = disk_flush.loop_works()
    if loop_ok:
        with disk_flush.loop_device(BLOCK, 1 << 20) as dev:
            result["device"] = device_writes(dev, args.writes, args.rounds)
        for poll in ("off", "adaptive"):
            with disk_flush.loop_device(BLOCK, 1 << 20) as dev:
                result[f"cycle-{poll}"] = cycles(dev, max(args.writes // 4, 10), args.rounds, poll)
    else:
        result["loop_skipped"] = "losetup --sector-size does not work here"
    print(
        f"the durable path, {args.writes} writes x {args.rounds} alternating rounds; medians; "
        f"load {load_before[0]:.2f}"
    )
    rows = []
    h = result["hand_off"]
    rows.append(("hand-off to the disk worker (memory device)", f"{h['us']['worker']:.1f}",
                 f"inline {h['us']['inline']:.1f}", f"{h['worker_to_inline']:.1f}"))  # fmt: skip
    if loop_ok:
        d = result["device"]
        base = d["us"]["pwritev+fdatasync"]
        for k in ("pwritev(RWF_DSYNC)", "durable write_extents", "cached pwritev"):
            ratio = d["to_two_syscalls"][k]
            rows.append((f"512 B loop write: {k}", f"{d['us'][k]:.1f}",
                         f"pwritev+fdatasync {base:.1f}", f"{ratio:.2f}"))  # fmt: skip
        for poll in ("off", "adaptive"):
            c = result[f"cycle-{poll}"]
            core, disk = c["us"]["core"], c["us"]["disk"]
            rows.append((f"MARK+FLUSH+CLEAR+FLUSH, clustered-disk, --poll {poll}", f"{disk:.1f}",
                         f"clustered-core {core:.1f}", f"{c['disk_to_core']:.2f}"))  # fmt: skip
    else:
        print(f"loop device legs skipped: {result['loop_skipped']}")
    print(common.table(("", "us", "baseline (same run) us", "ratio"), rows))
    out = common.write_results("durable_path", result, args.out)
    print(f"written {common.shown(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
