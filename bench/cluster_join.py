"""Join (checkpoint) time of a 16 M-region clustered-core log on 3 real corosync nodes.

Run as root: ``.venv/bin/python bench/cluster_join.py [--quick] [--regions N]``.  Starts three
corosync nodes in network namespaces and a ulogd per node (:mod:`tests.harness.cluster`), then
for each state of the log:

* ``in sync``: ``nosync`` log with a few thousand marks held (bitmaps are runs: compress well);
* ``resyncing``: default log (nothing in sync yet) with the same marks;

node 1 creates the log first (its RESUME needs no transfer: that time is the baseline), nodes 2
and 3 join (their RESUME waits for the checkpoint), and then node 3 and node 1 (the lowest
node id) leave (POSTSUSPEND) and join again, several times.  The figure is the time from
sending RESUME to its answer, measured by the kernel stand-in on the test transport; the
target is 2 s.  The worst case for the transfer, bitmaps that do not compress, cannot be
produced through the kernel interface cheaply, so the script also times the checkpoint's CPU
part in process (:func:`ulogd.cluster.checkpoint.snapshot` + ``restore``) for random bitmaps
and reports its size in chunks.  Prints a table and writes JSON to ``bench/results/``.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import common  # noqa: E402
from bitarray import bitarray  # noqa: E402

from tests.harness import corosync  # noqa: E402
from tests.harness.cluster import UlogdCluster, wait_until  # noqa: E402
from ulogd.cluster import checkpoint as ck  # noqa: E402
from ulogd.cluster.group import CHUNK_SIZE  # noqa: E402
from ulogd.protocol import ctr  # noqa: E402
from ulogd.protocol.spec import RequestType as T  # noqa: E402
from ulogd.state.regionlog import RegionLog, new_bitmaps  # noqa: E402
from ulogd.testing.driver import LogDriver  # noqa: E402

REGION_SIZE = 1024


def ctr_text(regions: int, nosync: bool) -> str:
    return f"{regions * REGION_SIZE} clustered-core {REGION_SIZE}" + (" nosync" if nosync else "")


def timed_resume(d: LogDriver) -> float:
    start = time.perf_counter()
    reply = d.call(T.RESUME)
    took = time.perf_counter() - start
    if reply.error:
        raise RuntimeError(f"RESUME failed: {reply.error}")
    return took


def suspend(d: LogDriver) -> None:
    for rtype in (T.PRESUSPEND, T.POSTSUSPEND):
        reply = d.call(rtype)
        if reply.error:
            raise RuntimeError(f"{T(rtype).name} failed: {reply.error}")


def run_case(
    u: UlogdCluster, name: str, regions: int, nosync: bool, rejoins: int
) -> dict[str, Any]:
    uuid = f"LVM-bench-join-{name}"
    text = ctr_text(regions, nosync)
    drivers = {n: u[n].driver(uuid, timeout=60) for n in (1, 2, 3)}
    for d in drivers.values():
        if d.ctr(text).error:
            raise RuntimeError("CTR failed")
        d.ok(T.GET_REGION_SIZE)
    result: dict[str, Any] = {"case": name, "regions": regions, "ctr": text}
    result["first_member_s"] = timed_resume(drivers[1])
    rng = random.Random(1)
    marks = sorted(rng.sample(range(regions), 4096))
    for i in range(0, len(marks), 512):
        drivers[1].mark(marks[i : i + 512])
    drivers[1].flush()
    joins = {"node 2 joins": [timed_resume(drivers[2])], "node 3 joins": [timed_resume(drivers[3])]}
    for d in drivers.values():
        assert d.is_clean(marks[0]) == 0, "a joiner lost a mark"
    joins["node 3 rejoins"] = []
    joins["node 1 (lowest id) rejoins"] = []
    for _ in range(rejoins):
        for n, key in ((3, "node 3 rejoins"), (1, "node 1 (lowest id) rejoins")):
            suspend(drivers[n])
            other = u[n % 3 + 1]
            rest = sorted({1, 2, 3} - {n})
            wait_until(lambda o=other, r=rest: o.log_status(uuid)["members"] == r,
                       10.0, f"node {n} out of the group")  # fmt: skip
            joins[key].append(timed_resume(drivers[n]))
    result["joins_s"] = joins
    result["sync_count"] = {n: d.sync_count() for n, d in drivers.items()}
    for d in drivers.values():
        suspend(d)
        d.ok(T.DTR)
    return result


def cpu_worst_case(regions: int) -> dict[str, Any]:
    """snapshot + restore of random (incompressible) bitmaps with 4096 marks, in process."""
    config = ctr.parse(ctr_text(regions, True).encode())
    clean, sync = new_bitmaps(config)
    rng = random.Random(2)
    noise = bitarray()
    noise.frombytes(rng.randbytes((regions + 7) // 8))
    sync[:regions] = noise[:regions]
    clean[:regions] = noise[:regions]  # clean only where in sync
    rl = RegionLog(config, clean, sync, local_node=1)
    for r in rng.sample(range(regions), 4096):
        rl.mark(1 + r % 3, [r])
    book = ck.GroupBook(7, ((1, 100), (2, 200)), ((3, 300, 7),))
    start = time.perf_counter()
    blob = ck.snapshot(rl, book)
    parts = ck.split(blob, CHUNK_SIZE)
    snap = time.perf_counter() - start
    clean2, sync2 = new_bitmaps(config)
    target = RegionLog(config, clean2, sync2, local_node=3)
    start = time.perf_counter()
    ck.restore(target, b"".join(parts))
    restore = time.perf_counter() - start
    assert target.sync_count == rl.sync_count
    return {"bytes": len(blob), "chunks": len(parts), "snapshot_s": snap, "restore_s": restore}


def setup_info() -> dict[str, Any]:
    return common.corosync_setup(
        token_ms=corosync.TOKEN_MS,
        chunk_bytes=CHUNK_SIZE,
    )


def print_report(report: dict[str, Any]) -> None:
    s = report["setup"]
    print(f"# cluster join {s['date']}: {s['corosync']}, kernel {s['kernel']}, {s['nproc']} CPUs, "
          f"load {s['loadavg'][0]:.2f}; checkpoint chunks of {s['chunk_bytes']} bytes")  # fmt: skip
    for case in report["cases"]:
        base = case["first_member_s"]
        print(f"\n## {case['case']}: {case['regions']} regions ({case['ctr']})")
        print(f"first member's RESUME (no transfer, baseline): {base * 1000:.0f} ms")
        print(f"{'join':<30}{'median ms':>10}{'max ms':>9}{'x target 2 s':>14}{'x baseline':>12}")
        for what, values in case["joins_s"].items():
            med, top = statistics.median(values), max(values)
            print(f"{what:<30}{med * 1000:>10.0f}{top * 1000:>9.0f}{top / 2.0:>14.2f}"
                  f"{med / base:>12.1f}")  # fmt: skip
    w = report["cpu_worst_case"]
    print(f"\nincompressible bitmaps, in process: checkpoint {w['bytes'] / 1e6:.1f} MB in "
          f"{w['chunks']} chunks; snapshot {w['snapshot_s'] * 1000:.0f} ms, restore "
          f"{w['restore_s'] * 1000:.0f} ms (CPU only, add the chunks' delivery)")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rejoins (smoke run)")
    parser.add_argument("--regions", type=int, default=16 * 1024 * 1024)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    rejoins = 1 if args.quick else 3
    corosync.ensure_installed(dev=False)
    report: dict[str, Any] = {"setup": setup_info(), "cases": []}
    cluster = corosync.MultiNode(3)
    try:
        cluster.start()
        with UlogdCluster(cluster, log_level="info") as u:
            u.start()
            for name, nosync in (("in-sync", True), ("resyncing", False)):
                report["cases"].append(run_case(u, name, args.regions, nosync, rejoins))
    finally:
        cluster.stop()
    report["cpu_worst_case"] = cpu_worst_case(args.regions)
    print_report(report)
    common.save_report("cluster_join", report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
