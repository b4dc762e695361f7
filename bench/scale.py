"""Scale: memory per region for large logs, and GET_RESYNC_WORK cost as a log fills.

Run: ``.venv/bin/python bench/scale.py [--quick] [--sizes N ...] [--no-huge]``.

**Memory.**  For each size (2^20, 2^24 and 2^32 regions by default) a fresh child process
creates a ``clustered-core`` log the way the daemon does (``Server`` with its state directory
on ``/dev/shm``: the bitmaps live in a memory-mapped tmpfs file), sends CTR, GET_REGION_SIZE
and RESUME, and reports the growth of its resident set (``VmRSS``, which counts the mapped
tmpfs pages it touched) and the size of the state file.  The floor is 2 bits per region (the
clean and the sync bitmap); the target is <= 2.2 bits/region plus the marks.  Marks (regions
with a write in flight) cost extra: measured separately as the growth per marked region for
100 000 marks.  2^32 regions need 2 x 512 MiB: skipped when ``MemAvailable`` or ``/dev/shm``
has less than 3 GiB free (or with ``--no-huge``).

**GET_RESYNC_WORK.**  On a 2^24-region log with 0 %, 50 %, 99 % and 100 % of the regions in
sync (the in-sync ones first, as a resync leaves them), after a suspend/resume (which restarts
the search from region 0): the first call's time (it scans the in-sync prefix; median of 7
suspend/resume cycles) and the median of the next calls (each followed, untimed, by
SET_REGION_SYNC as kmirrord does), all through ``Server.receive``; the baseline is
GET_SYNC_COUNT, a request that does no work, timed the same way in the same run.

Prints tables and writes JSON to ``bench/results/``.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

from ulogd.engine.actions import Send
from ulogd.engine.server import Server
from ulogd.protocol import wire
from ulogd.protocol.spec import RequestType as T
from ulogd.state.statefile import StateDir, file_name

UUID = "LVM-benchscale"
LUID = 3
REGION_SIZE = 2  # sectors: the smallest legal region, so 2^32 regions fit any device size
TARGET_BITS = 2.2
MARKS = 100_000
FIRST_REPEATS = 7  # first calls after a resume, per fill (the median is reported)
_U64 = struct.Struct("=Q")


def dg(rtype: int, data: bytes = b"", luid: int = LUID) -> bytes:
    return wire.encode_request(rtype, uuid=UUID, luid=luid, data=data)


def call(server: Server, rtype: int, data: bytes = b"", luid: int = LUID) -> wire.Reply:
    (action,) = server.receive(dg(rtype, data, luid))
    assert isinstance(action, Send)
    reply = wire.decode_reply(action.data)
    assert reply.error == 0, (T(rtype).name, reply)
    return reply


def create(server: Server, regions: int, sync_word: str = "", luid: int = LUID) -> None:
    text = f"{regions * REGION_SIZE} clustered-core {REGION_SIZE}"
    if sync_word:
        text += f" {sync_word}"
    call(server, T.CTR, text.encode(), luid)
    call(server, T.GET_REGION_SIZE, luid=luid)
    call(server, T.RESUME, luid=luid)


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


# ----------------------------------------------------------------------------- memory
def child_memory(regions: int, marks: int) -> dict[str, Any]:
    """Runs in a fresh process: RSS growth for one log of ``regions`` regions."""
    root = Path(tempfile.mkdtemp(prefix="ulogd-bench-scale-", dir="/dev/shm"))
    try:
        server = Server(state_dir=StateDir(root / "logs"))
        # A small log first, so that the first request's one-off costs (lazy imports, caches:
        # 64 KiB more under Debian's python3 than under a pyenv build) are not counted per region.
        create(server, 64, luid=LUID + 1)
        gc.collect()
        before = rss()
        t0 = time.perf_counter()
        create(server, regions)
        create_s = time.perf_counter() - t0
        gc.collect()
        after = rss()
        state_file = (root / "logs" / file_name(UUID, LUID)).stat().st_size
        result: dict[str, Any] = {
            "regions": regions,
            "rss_delta_bytes": after - before,
            "bits_per_region": (after - before) * 8 / regions,
            "state_file_bytes": state_file,
            "state_file_bits_per_region": state_file * 8 / regions,
            "create_seconds": create_s,
        }
        if marks:
            marks = min(marks, regions)
            spread = list(range(0, regions, max(1, regions // marks)))[:marks]
            batches = [
                struct.pack(f"={len(b)}Q", *b)
                for b in (spread[i : i + 512] for i in range(0, marks, 512))
            ]
            gc.collect()
            before = rss()
            for payload in batches:  # the u16 connector length limits a request's size
                call(server, T.MARK_REGION, payload)
            del batches
            gc.collect()
            result["marks"] = marks
            result["bytes_per_mark"] = (rss() - before) / marks
        server.close()
        return result
    finally:
        shutil.rmtree(root, ignore_errors=True)


def memory(sizes: list[int], marks: int) -> list[dict[str, Any]]:
    out = []
    for regions in sizes:
        need = 2 * regions // 8 + (256 << 20)
        if need > min(common.mem_available(), shutil.disk_usage("/dev/shm").free) - (2 << 30):
            out.append({"regions": regions, "skipped": "not enough free memory or /dev/shm"})
            continue
        proc = subprocess.run(
            [sys.executable, __file__, "--child-memory", str(regions), "--marks", str(marks)],
            capture_output=True,
            text=True,
            check=True,
        )
        out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return out


# ----------------------------------------------------------------------------- resync work
def resync_cost(regions: int, fills: list[float], calls: int) -> list[dict[str, Any]]:
    root = Path(tempfile.mkdtemp(prefix="ulogd-bench-scale-", dir="/dev/shm"))
    clock = time.perf_counter_ns
    out = []
    try:
        server = Server(state_dir=StateDir(root / "logs"))
        work = dg(T.GET_RESYNC_WORK)
        count = dg(T.GET_SYNC_COUNT)
        for fill in fills:
            create(server, regions)
            rl = server.logs[(UUID, LUID)].log
            in_sync = min(regions, round(regions * fill))
            rl.sync[:in_sync] = 1
            rl.clean[:in_sync] = 1
            rl.sync_count = in_sync  # the bits were set behind the log's back
            firsts: list[int] = []
            for _ in range(FIRST_REPEATS):
                # suspend + resume: the search starts again at region 0 (past the end when
                # all is in sync), a recovery handed out before is forgotten
                for rtype in (T.PRESUSPEND, T.POSTSUSPEND, T.RESUME):
                    call(server, rtype)
                assert rl.sync_count == in_sync
                t0 = clock()
                (first,) = server.receive(work)
                firsts.append(clock() - t0)
                assert isinstance(first, Send)
            first_ns = common.median(firsts)
            samples: list[int] = []
            baseline: list[int] = []
            got = struct.unpack("=qQ", wire.decode_reply(first.data).data)
            for _ in range(calls):
                if got[0]:
                    call(server, T.SET_REGION_SYNC, struct.pack("=Qq", got[1], 1))
                t0 = clock()
                (reply,) = server.receive(work)
                samples.append(clock() - t0)
                t0 = clock()
                server.receive(count)
                baseline.append(clock() - t0)
                assert isinstance(reply, Send)
                got = struct.unpack("=qQ", wire.decode_reply(reply.data).data)
            call(server, T.DTR)
            steady = common.median(samples) / 1000
            base = common.median(baseline) / 1000
            out.append(
                {
                    "regions": regions,
                    "fill": fill,
                    "in_sync": in_sync,
                    "first_call_us": first_ns / 1000,
                    "next_calls_median_us": steady,
                    "get_sync_count_median_us": base,
                    "first_to_baseline": first_ns / 1000 / base,
                    "next_to_baseline": steady / base,
                    "calls": calls,
                }
            )
        server.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1 << 20, 1 << 24, 1 << 32])
    parser.add_argument("--resync-regions", type=int, default=1 << 24)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--marks", type=int, default=MARKS)
    parser.add_argument("--no-huge", action="store_true", help="skip 2^32 regions")
    parser.add_argument("--quick", action="store_true", help="tiny run (the smoke test)")
    parser.add_argument("--child-memory", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help="JSON file (default bench/results/...)")
    args = parser.parse_args(argv)
    if args.child_memory:
        print(json.dumps(child_memory(args.child_memory, args.marks)))
        return 0
    if args.quick:
        args.sizes, args.resync_regions, args.calls, args.marks = [1 << 16], 1 << 16, 50, 1000
    if args.no_huge:
        args.sizes = [s for s in args.sizes if s < 1 << 32]
    load_before = common.loadavg()
    mem = memory(args.sizes, args.marks)
    resync = resync_cost(args.resync_regions, [0.0, 0.5, 0.99, 1.0], args.calls)
    print(f"memory per region (state on /dev/shm, as the daemon runs); load {load_before[0]:.2f}")
    rows = []
    for m in mem:
        if "skipped" in m:
            rows.append((f"{m['regions']:,}", "skipped", "", "", "", m["skipped"]))
            continue
        rows.append(
            (
                f"{m['regions']:,}",
                f"{m['rss_delta_bytes'] / (1 << 20):,.1f}",
                f"{m['bits_per_region']:.3f}",
                f"{m['state_file_bits_per_region']:.3f}",
                f"{m.get('bytes_per_mark', 0):.0f}",
                f"{m['create_seconds']:.2f}",
            )
        )
    head = ("regions", "RSS delta MiB", "bits/region", "file bits/region", "B/mark", "create s")
    print(common.table(head, rows))
    measured = [m for m in mem if "skipped" not in m]
    worst = max((m["bits_per_region"] for m in measured), default=float("nan"))
    print(
        f"worst {worst:.3f} bits/region (floor 2.0; ratio {worst / 2:.3f}); target <= "
        f"{TARGET_BITS} + marks: {'met' if worst <= TARGET_BITS else 'NOT met'}"
    )
    print(f"\nGET_RESYNC_WORK on {args.resync_regions:,} regions (after suspend/resume)")
    rows = [
        (
            f"{r['fill'] * 100:g} %",
            f"{r['first_call_us']:,.1f}",
            f"{r['next_calls_median_us']:.2f}",
            f"{r['get_sync_count_median_us']:.2f}",
            f"{r['first_to_baseline']:,.1f}",
            f"{r['next_to_baseline']:.2f}",
        )
        for r in resync
    ]
    head = ("in sync", "first us", "next us", "GET_SYNC_COUNT us", "first/base", "next/base")
    print(common.table(head, rows))
    out = common.write_results(
        "scale",
        {
            "loadavg_before": load_before,
            "target_bits": TARGET_BITS,
            "memory": mem,
            "resync": resync,
        },
        args.out,
    )
    print(f"written {common.shown(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
