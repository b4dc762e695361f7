"""MARK+FLUSH latency and throughput of a clustered-core log on 1 and 3 real corosync nodes.

Run as root: ``.venv/bin/python bench/cluster_latency.py [--quick]``.  For each cluster (one
corosync on loopback, then three nodes in network namespaces; :mod:`tests.harness.corosync`)
it starts a ulogd per node in cluster mode (:mod:`tests.harness.cluster`), creates the same
``clustered-core`` log on every node, and a scripted CPG member (``python -m cpg.member``) per
node joined to a group of its own, so that in one run, on the same cluster, alternating
rounds measure (one request in flight, from node 1, microseconds):

* ``cpg ping``: raw agreed delivery of a 64-byte message, send -> own delivery, back to back
  (the baseline; a small probe process in node 1 using :class:`cpg.Handle` in the same group);
* ``cpg ping, gap G``: the same with G ms of idle time before each send, as between the
  kernel's FLUSHes (an idle ring and idle CPUs answer slower: this is part of the story);
* ``IS_CLEAN``: a test-transport round trip answered from the local replica (transport +
  Python, no cluster);
* ``MARK``: acknowledged locally (rides in the next FLUSH's message);
* ``FLUSH``: one ordered delivery of the batched MARKs;
* ``MARK+FLUSH``: what the kernel's write path pays (two round trips, one delivery); the ratio
  to ``cpg ping`` is the issue's target (<= 1.3);
* ``FLUSH(integrated)``: FLUSH carrying its marks (protocol 3): one round trip, one delivery.

Then throughput: one writer per node (3 on three nodes), each looping MARK, FLUSH, CLEAR
on its own regions for a few seconds.  Prints a table and writes JSON to ``bench/results/``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import common  # noqa: E402

from tests.harness import corosync  # noqa: E402
from tests.harness.cluster import UlogdCluster  # noqa: E402
from tests.harness.corosync import MemberClient, member  # noqa: E402
from ulogd.testing.driver import LogDriver  # noqa: E402

UUID = "LVM-bench-cluster-latency"
CTR = "1073741824 clustered-core 1024 nosync"  # 1 M regions


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))]


def summary(samples: list[float]) -> dict[str, float]:
    return {
        "p50_us": percentile(samples, 50),
        "p99_us": percentile(samples, 99),
        "mean_us": statistics.fmean(samples),
        "count": len(samples),
    }


def timed(fn: Any) -> float:
    start = time.perf_counter()
    reply = fn()
    took = (time.perf_counter() - start) * 1e6
    if getattr(reply, "error", 0):
        raise RuntimeError(f"request failed: {reply.error}")
    return took


#: Runs in node 1's namespace: join the members' group, ping with idle gaps, print JSON.
PROBE = r"""
import json, os, selectors, sys, time
import cpg
count, gaps = int(sys.argv[1]), [float(g) for g in sys.argv[2].split(",")]
got = []
me = os.getpid()
h = cpg.Handle(on_deliver=lambda m: got.append(1) if m.pid == me else None,
               on_confchg=lambda c: None)
h.join(b"bench-raw")
sel = selectors.DefaultSelector()
sel.register(h.fileno(), selectors.EVENT_READ)
def one():
    start = time.perf_counter()
    h.send(b"p" * 64)
    while not got:
        for _ in sel.select(5.0):
            h.dispatch()
    got.clear()
    return (time.perf_counter() - start) * 1e6
for _ in range(50):
    one()
out = {}
for gap in gaps:
    samples = []
    for _ in range(count):
        if gap:
            time.sleep(gap / 1000)
        samples.append(one())
    out[str(gap)] = samples
print(json.dumps(out))
"""
GAPS_MS = (0.0, 0.5, 2.0)


def probe(cluster: corosync.Cluster, count: int) -> dict[str, list[float]]:
    proc = cluster.spawn_python(
        1, ["-c", PROBE, str(count), ",".join(str(g) for g in GAPS_MS)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    out, _ = proc.communicate(timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"cpg probe failed ({proc.returncode})")
    return json.loads(out)  # type: ignore[no-any-return]


def request_round(d: LogDriver, count: int, base: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {k: [] for k in ("is_clean", "mark", "flush", "mark_flush",
                                                   "flush_integrated")}  # fmt: skip
    for i in range(count):
        r = base + i % 1000
        out["is_clean"].append(timed(lambda: d.is_clean(r)))  # noqa: B023
        mark = timed(lambda: d.mark([r]))  # noqa: B023
        flush = timed(lambda: d.flush())
        out["mark"].append(mark)
        out["flush"].append(flush)
        out["mark_flush"].append(mark + flush)
        timed(lambda: d.clear([r]))  # noqa: B023
        out["flush_integrated"].append(timed(lambda: d.flush([r + 1000])))  # noqa: B023
        timed(lambda: d.clear([r + 1000]))  # noqa: B023
    return out


def throughput(u: UlogdCluster, nodes: list[int], seconds: float) -> dict[str, Any]:
    counts = dict.fromkeys(nodes, 0)
    errors: list[str] = []
    stop = time.monotonic() + seconds

    def writer(n: int) -> None:
        d = u[n].driver(UUID)
        i = 0
        try:
            while time.monotonic() < stop:
                r = 100_000 * n + i % 1000
                d.mark([r])
                d.flush()
                d.clear([r])
                counts[n] += 1
                i += 1
            d.flush()
        except Exception as exc:
            errors.append(f"node {n}: {exc!r}")

    threads = [threading.Thread(target=writer, args=(n,)) for n in nodes]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=seconds + 30)
    elapsed = time.monotonic() - start
    if errors:
        raise RuntimeError(errors)
    total = sum(counts.values())
    return {
        "writers": len(nodes),
        "seconds": elapsed,
        "writes_per_s": total / elapsed,
        "per_writer": {str(n): c / elapsed for n, c in counts.items()},
    }


def mcast_tx(cluster: corosync.Cluster, n: int) -> int | None:
    out = cluster.exec(n, ["corosync-cmapctl", "-m", "stats", "stats.srp.mcast_tx"], check=False)
    try:
        return int(out.stdout.rsplit("=", 1)[1])
    except (IndexError, ValueError):
        return None


def run_cluster(cluster: corosync.Cluster, args: argparse.Namespace) -> dict[str, Any]:
    nodes = list(range(1, cluster.size + 1))
    result: dict[str, Any] = {"nodes": cluster.size}
    with UlogdCluster(cluster, log_level="warning") as u:
        u.start()
        drivers = {n: u[n].driver(UUID) for n in nodes}
        for d in drivers.values():
            d.create(CTR)
        members: list[MemberClient] = [member(cluster, n) for n in nodes]
        for m in members:
            m.send("join bench-raw")
            m.send("quiet 1")
        for m in members:
            m.wait_for("confchg", pred=lambda e: len(e["members"]) == len(nodes), timeout=20)
        d1 = drivers[1]
        request_round(d1, 200, 0)  # warm-up
        samples: dict[str, list[float]] = {}
        multicasts = 0
        for rnd in range(args.rounds):  # alternate, so that load changes hit both
            for gap, v in probe(cluster, args.count).items():
                key = "cpg_ping" if float(gap) == 0 else f"cpg_ping_gap_{float(gap)}ms"
                samples.setdefault(key, []).extend(v)
            before = mcast_tx(cluster, 1)
            for k, v in request_round(d1, args.count, 2000 * (rnd + 1)).items():
                samples.setdefault(k, []).extend(v)
            after = mcast_tx(cluster, 1)
            if before is not None and after is not None:
                multicasts += after - before
        result["latency"] = {k: summary(v) for k, v in samples.items()}
        requests = args.rounds * args.count * 7  # per request_round iteration: 7 requests
        result["mcast_tx_per_request"] = multicasts / requests
        result["throughput"] = throughput(u, nodes, args.seconds)
        for m in members:
            m.close()
    return result


def setup_info() -> dict[str, Any]:
    return common.corosync_setup(
        token_ms=corosync.TOKEN_MS,
        log=CTR,
        transport="ulogd test transport (unix datagram), one request in flight",
    )


ROWS = [
    ("cpg ping (baseline)", "cpg_ping"),
    ("cpg ping, gap 0.5 ms", "cpg_ping_gap_0.5ms"),
    ("cpg ping, gap 2 ms", "cpg_ping_gap_2.0ms"),
    ("IS_CLEAN (local)", "is_clean"),
    ("MARK (local ack)", "mark"),
    ("FLUSH (1 delivery)", "flush"),
    ("MARK+FLUSH", "mark_flush"),
    ("FLUSH(integrated)", "flush_integrated"),
]


def print_report(report: dict[str, Any]) -> None:
    s = report["setup"]
    print(f"# cluster latency {s['date']}: {s['corosync']}, kernel {s['kernel']}, "
          f"{s['nproc']} CPUs, load {s['loadavg'][0]:.2f}")  # fmt: skip
    print(f"# {s['log']}; token {s['token_ms']} ms; {s['transport']}")
    for c in report["clusters"]:
        lat = c["latency"]
        base = lat["cpg_ping"]["p50_us"]
        print(f"\n## {c['nodes']} node(s)")
        print(f"{'what':<22}{'p50 us':>9}{'p99 us':>9}{'x ping p50':>12}")
        for label, key in ROWS:
            row = lat[key]
            print(f"{label:<22}{row['p50_us']:>9.0f}{row['p99_us']:>9.0f}"
                  f"{row['p50_us'] / base:>12.2f}")  # fmt: skip
        if "mcast_tx_per_request" in c:
            print(f"corosync multicasts per ulogd request: {c['mcast_tx_per_request']:.3f}")
        t = c["throughput"]
        per = ", ".join(f"n{n} {v:.0f}" for n, v in t["per_writer"].items())
        print(f"throughput, {t['writers']} writer(s) MARK+FLUSH+CLEAR: "
              f"{t['writes_per_s']:.0f} writes/s ({per})")  # fmt: skip
        mf, ping = lat["mark_flush"]["p50_us"], base
        gapped = lat["cpg_ping_gap_0.5ms"]["p50_us"]
        print(f"MARK+FLUSH / cpg ping (p50): {mf / ping:.2f} (target <= 1.3); "
              f"/ cpg ping with 0.5 ms gaps: {mf / gapped:.2f}")  # fmt: skip
        print(f"where the time goes (p50): transport + Python round trip (IS_CLEAN) "
              f"{lat['is_clean']['p50_us']:.0f} us; MARK {lat['mark']['p50_us']:.0f} us; "
              f"FLUSH beyond a round trip {lat['flush']['p50_us'] - lat['is_clean']['p50_us']:.0f}"
              f" us vs raw delivery {ping:.0f}-{gapped:.0f} us")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples (smoke run)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    args.count = 100 if args.quick else 500
    args.rounds = 2 if args.quick else 4
    args.seconds = 2.0 if args.quick else 5.0
    corosync.ensure_installed(dev=False)
    report: dict[str, Any] = {"setup": setup_info(), "clusters": []}
    for cluster in (corosync.SingleNode(), corosync.MultiNode(3)):
        try:
            cluster.start()
            report["clusters"].append(run_cluster(cluster, args))
        finally:
            cluster.stop()
    print_report(report)
    common.save_report("cluster_latency", report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
