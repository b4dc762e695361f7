"""CPG agreed-delivery latency and burst throughput on a 1-node and a 3-node corosync cluster.

Run as root: ``.venv/bin/python bench/cpg_latency.py [--quick]``.  Installs corosync when
missing, starts a loopback node and then three nodes in network namespaces
(:mod:`tests.harness.corosync`), drives one ``python -m cpg.member`` process per node and
measures:

* ping: one message in flight, send -> own agreed delivery, in microseconds (p50 / p99);
* burst: N messages queued at once through the handle's outbound queue (TRY_AGAIN absorbed),
  time until every member has delivered all of them; with 3 nodes also all members sending;
* on 3 nodes, the time from SIGKILL of one corosync to the NODEDOWN confchg elsewhere.

Prints the setup and a table and writes everything as JSON to ``bench/results/``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import common  # noqa: E402

from tests.harness import corosync  # noqa: E402
from tests.harness.corosync import MemberClient, member  # noqa: E402


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[index]


def join_all(members: list[MemberClient], group: str) -> None:
    for m in members:
        m.send(f"join {group}")
        m.send("quiet 1")
    for m in members:
        m.wait_for("confchg", pred=lambda e: len(e["members"]) == len(members), timeout=20)


def ping(m: MemberClient, count: int, size: int) -> dict[str, Any]:
    samples = m.request(f"ping {count} {size}", "ping", timeout=300)["us"]
    return {
        "kind": "ping",
        "size": size,
        "count": count,
        "p50_us": percentile(samples, 50),
        "p99_us": percentile(samples, 99),
        "mean_us": statistics.fmean(samples),
    }


def burst(
    members: list[MemberClient], senders: list[MemberClient], count: int, size: int
) -> dict[str, Any]:
    total = count * len(senders)
    marks = [m.mark() for m in members]
    for m in members:
        m.send(f"expect {total}")
    for m in senders:
        m.send(f"burst {count} {size}")
    done = [
        m.wait_for("expected", after=mark, timeout=600)
        for m, mark in zip(members, marks, strict=True)
    ]
    sent = [m.wait_for("burst_sent", after=marks[members.index(m)], timeout=60) for m in senders]
    seconds = max(e["seconds"] for e in done)
    return {
        "kind": "burst",
        "size": size,
        "senders": len(senders),
        "messages": total,
        "seconds": seconds,
        "msgs_per_s": total / seconds,
        "mb_per_s": total * size / seconds / 1e6,
        "try_again": sum(e["try_again"] for e in sent),
    }


def run_cluster(cluster: corosync.Cluster, args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"nodes": cluster.size, "start_seconds": cluster.start_seconds}
    members = [member(cluster, n) for n in range(1, cluster.size + 1)]
    join_all(members, "bench")
    ping(members[0], 200, 64)  # warm-up
    rows = []
    for size in (64, 4096):
        rows.append(ping(members[0], args.pings, size))
        count = args.burst_small if size == 64 else args.burst_large
        rows.append(burst(members, members[:1], count, size))
        if len(members) > 1:
            rows.append(burst(members, members, count // len(members), size))
    result["rows"] = rows
    if cluster.size > 1:
        assert isinstance(cluster, corosync.MultiNode)
        marks = [m.mark() for m in members]
        killed = time.time()
        cluster.kill(cluster.size)
        seen = [
            m.wait_for("confchg", after=mark, timeout=30)["t"] - killed
            for m, mark in zip(members[:-1], marks, strict=False)
        ]
        result["nodedown_seconds"] = seen
    for m in members:
        m.close()
    return result


def setup_info() -> dict[str, Any]:
    return common.corosync_setup(
        token_ms=corosync.TOKEN_MS,
        transport="knet, crypto off, sched_rr no",
        client="python -m cpg.member (cffi ABI mode), one process per node",
    )


def print_report(report: dict[str, Any]) -> None:
    s = report["setup"]
    print(f"# CPG benchmark {s['date']}: {s['corosync']}, kernel {s['kernel']}, {s['nproc']} CPUs")
    print(f"# token {s['token_ms']} ms, {s['transport']}; {s['client']}")
    load = s["loadavg"][0]
    print(f"# install {report['install_seconds']:.1f} s, load average before the run {load:.1f}")
    for cluster in report["clusters"]:
        start, stop = cluster["start_seconds"], cluster.get("stop_seconds")
        stop_text = f"{stop:.2f} s" if stop is not None else "?"
        print(f"\n## {cluster['nodes']} node(s): start {start:.2f} s, graceful stop {stop_text}")
        print(f"{'what':<24}{'size':>6}{'p50 us':>10}{'p99 us':>10}{'msgs/s':>10}{'MB/s':>8}"
              f"{'TRY_AGAIN':>11}")  # fmt: skip
        for row in cluster["rows"]:
            if row["kind"] == "ping":
                print(f"{'ping (1 in flight)':<24}{row['size']:>6}{row['p50_us']:>10.0f}"
                      f"{row['p99_us']:>10.0f}")  # fmt: skip
            else:
                what = f"burst {row['messages']} x{row['senders']} snd"
                print(f"{what:<24}{row['size']:>6}{'':>10}{'':>10}{row['msgs_per_s']:>10.0f}"
                      f"{row['mb_per_s']:>8.1f}{row['try_again']:>11}")  # fmt: skip
        if "nodedown_seconds" in cluster:
            seen = ", ".join(f"{x:.2f}" for x in cluster["nodedown_seconds"])
            print(f"NODEDOWN after SIGKILL of corosync {cluster['nodes']}: {seen} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples (smoke run)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    args.pings = 300 if args.quick else 2000
    args.burst_small = 3000 if args.quick else 30000
    args.burst_large = 1500 if args.quick else 6000

    install = corosync.ensure_installed(dev=False)
    report: dict[str, Any] = {"setup": setup_info(), "install_seconds": install, "clusters": []}
    for cluster in (corosync.SingleNode(), corosync.MultiNode(3)):
        try:
            cluster.start()
            result = run_cluster(cluster, args)
        finally:
            cluster.stop(graceful=True)
        result["stop_seconds"] = cluster.stop_seconds
        report["clusters"].append(result)
    print_report(report)
    common.save_report("cpg_latency", report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
