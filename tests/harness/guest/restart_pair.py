"""Two-guest cluster scenario: the *daemon* of a node that keeps writing is killed and restarted.

``python3 restart_pair.py --node N --uuid UUID [--budget S]``

Theory of operation
-------------------
The host boots two guests joined by a private link and attaches the same raw images to both
(see ``pair.py``: legs ``sharedA``/``sharedB`` of mirror ``pair`` with a ``clustered-core``
log, legs ``sharedC``/``sharedD`` of ``pairdisk`` with a ``clustered-disk`` log on
``sharedL``).  Both guests run corosync and ulogd ``--cluster corosync``.  Node 1 creates the
mirrors first, so it is each group's first member and the disk log's server (the lowest node
holding state serves it).  On node 1 each mirror's **primary leg** (leg 0, the one the kernel
copies *from* when it recovers a region) is a ``dm-delay`` device that holds writes for 2 s:
node 1's writes reach leg 1 at once and leg 0 two seconds later.

Both nodes write disjoint 4 KiB blocks of every region (node 1 the odd ones, node 2 the even
ones; each of a node's writer threads owns its own blocks), node 1 with 32 O_DIRECT writers
per mirror.  Node 1, with at least 32 writes in flight, ``kill -9``\\ s its own ulogd — the
machine, its kernel and its mirrors stay up — and starts it again 3 s later with the same
command.  Both write on for 30 s, then stop.  A survivor that took the daemon's death for the
node's death would make the held regions lose sync and have its kernel copy leg 0 over leg 1
while node 1's delayed writes still land on leg 0: the legs would differ at the end while both
report N/N.

Node 2 stops 30 s after it saw node 1's daemon come back, waits for N/N and removes its
mirrors; node 1 waits for N/N and for node 2 to leave, removes its mirrors and compares the
legs.  The host compares the images again after both guests have powered off.  Kernel facts
(dm-log-userspace-transfer.c, -base.c): node 1's kernel re-sends a request that got no answer
after 15 s, and a send that finds no daemon makes it reconnect (CTR, RESUME) every 2 s until the
new daemon answers — its "timed out" and "server not found" lines are expected there.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
import time
from pathlib import Path

from dmlib import (
    ARTEFACTS,
    LOG_MAGIC,
    Daemon,
    Loop,
    Mirror,
    Scenario,
    Writer,
    compare_legs,
    dmesg,
    kernel_errors,
    now,
    read_disk_log,
    run,
    userspace_table,
    verify_readback,
    wait_for,
)
from pair import (
    MIRRORS,
    NODES,
    REGION,
    REGIONS,
    RUN_DIR,
    SECTORS,
    Shared,
    Timeline,
    event,
    group_exists,
    link_up,
    log_view,
    quorate_with_both,
    run_scenario,
    shared_devices,
    start_corosync,
)

RESTARTER = 1  # the node whose daemon is killed: the groups' first member, the disk server
WRITERS = {1: 32, 2: 4}  # writer threads per mirror and node
DELAY_MS = 2000  # node 1's writes to each mirror's primary leg
GONE_SECONDS = 3.0
WRITE_ON_SECONDS = 30.0
ALL_CLEAN = [LOG_MAGIC, 2, REGIONS, REGIONS]
#: what node 1's kernel says while its log server is away (expected, not errors)
RECONNECT_LINES = re.compile(r"timed out|server not found|Attempting to contact", re.IGNORECASE)


def delayed(name: str, dev: str) -> Loop:
    """A dm-delay device over ``dev``: reads at once, writes (and flushes) after DELAY_MS."""
    table = f"0 {SECTORS} delay {dev} 0 0 {dev} 0 {DELAY_MS}"
    run(["dmsetup", "create", name, "--table", table])
    return Loop(Path(dev), f"/dev/mapper/{name}")


def mirrors_for(node: int, uuid: str) -> list[Shared]:
    devs = shared_devices()
    out = []
    for name, (kind, legs, log_serial) in MIRRORS.items():
        loops = [Loop(Path(devs[s]), devs[s]) for s in legs]
        if node == RESTARTER:
            loops[0] = delayed(f"{name}-slow0", devs[legs[0]])
        log_dev = devs[log_serial] if log_serial else None
        log_uuid = f"{uuid}-{name}"
        table = userspace_table(SECTORS, log_uuid, kind, loops, region=REGION, sync="nosync",
                                log_dev=log_dev)  # fmt: skip
        out.append(Shared(name, log_uuid, kind, loops, log_dev, Mirror(name, table, SECTORS)))
    return out


def members(m: Shared) -> list[int] | None:
    view = log_view(m.uuid)
    return None if view is None else view.get("members")


def scenario(sc: Scenario, node: int, uuid: str) -> None:
    since = len(dmesg().splitlines())
    run(["modprobe", "dm_delay"])
    link_up(node)
    corosync = start_corosync()
    sc.require("corosync quorate with both nodes", wait_for(quorate_with_both, 180, 0.5))
    sc.info["corosync_pid"] = corosync.pid
    daemon = Daemon(str(RUN_DIR), ARTEFACTS / "ulogd.log", ARTEFACTS,
                    ["--cluster", "corosync", "--log-level", "info"])  # fmt: skip
    daemon.start(timeout=180)
    mirrors = mirrors_for(node, uuid)
    for m in mirrors:
        if node != RESTARTER:
            sc.require(f"{m.name}: node 1's group appears",
                       wait_for(lambda m=m: group_exists(m.uuid), 240, 0.5))  # fmt: skip
        m.mirror.create()
    for m in mirrors:
        both = wait_for(lambda m=m: members(m) == list(NODES), 240, 0.5)
        sc.require(f"{m.name}: the log's group has both nodes", both, log_view(m.uuid))
    sc.mark("groups of two")

    count = WRITERS[node]
    stride = 2 * count  # node 1: odd blocks, node 2: even ones; one block set per thread
    expected: dict[str, dict[int, bytes]] = {m.name: {} for m in mirrors}
    writers = []
    for m in mirrors:
        for i in range(count):
            writers.append(Writer(m.mirror.path, SECTORS * 512, f"n{node}-{m.name}-{i}",
                                  count=None, expected=expected[m.name], seed=100 * node + i,
                                  stride=stride, phase=2 * i + (node % 2)))  # fmt: skip
    timeline = Timeline(mirrors, writers)
    for w in writers:
        w.start()
    timeline.start()
    event("writing")
    if node == RESTARTER:
        restarter(sc, daemon, mirrors, writers)
    else:
        peer(sc, daemon, mirrors)
    for w in writers:
        w.halt()
    for w in writers:
        w.join(timeout=180)
    timeline.halt()
    sc.equal("no writer hangs", [w.name for w in writers if w.is_alive()], [])
    sc.equal("no write errors", sorted({e for w in writers for e in w.errors})[:5], [])
    sc.info["writes"] = sum(w.done for w in writers)
    sc.info["max_write_latency_s"] = round(max(w.max_latency for w in writers), 2)
    for m in mirrors:
        counts = [s[f"{m.name}.in_sync"] for s in timeline.samples if f"{m.name}.in_sync" in s]
        sc.info[f"{m.name}.min_in_sync"] = min(counts, default=None)
        sc.equal(f"{m.name}: never out of sync while both nodes lived", min(counts, default=0),
                 REGIONS)  # fmt: skip
        st = m.mirror.wait_synced(timeout=300)
        sc.check(f"{m.name}: {REGIONS}/{REGIONS} in sync after the writes", st.synced, st.raw)
        bad = verify_readback(m.mirror.path, expected[m.name])
        sc.equal(f"{m.name}: this node's data reads back", bad[:10], [])
    if node == RESTARTER:
        for m in mirrors:
            alone = wait_for(lambda m=m: members(m) == [node], 600, 0.5)
            sc.require(f"{m.name}: node 2 removed its mirror", alone, log_view(m.uuid))
    for m in mirrors:
        m.mirror.remove()
        if node == RESTARTER:
            ok, detail = compare_legs(m.legs)
            sc.check(f"{m.name}: legs identical", ok, detail)
            with contextlib.suppress(Exception):
                run(["dmsetup", "remove", f"{m.name}-slow0"])
            if m.log_dev is not None:
                sc.equal(f"{m.name}: the shared disk log says all clean after remove",
                         read_disk_log(m.log_dev, REGIONS), ALL_CLEAN)  # fmt: skip
    log_text = daemon.log_text()
    sc.equal("ulogd exits 0 on SIGTERM", daemon.stop(), 0)
    sc.equal("no Python tracebacks in the ulogd log", log_text.count("Traceback"), 0)
    lost = re.findall(r".*(?:lose sync|must be recovered).*", log_text)
    sc.equal("no region lost sync on this node", lost[:3], [])
    errors = kernel_errors(dmesg(), since)
    if node == RESTARTER:
        sc.info["kernel_reconnect_lines"] = [e for e in errors if RECONNECT_LINES.search(e)][:6]
        errors = [e for e in errors if not RECONNECT_LINES.search(e)]
    sc.equal("no kernel errors", errors, [])
    event("done")


def restarter(sc: Scenario, daemon: Daemon, mirrors: list[Shared], writers: list[Writer]) -> None:
    def in_flight() -> int:
        return sum(w.in_flight for w in writers)

    time.sleep(10)
    busy = wait_for(lambda: in_flight() >= 32, 60, 0.01)
    sc.info["in_flight_at_kill"] = in_flight()
    sc.info["marked_before_kill"] = {m.name: (log_view(m.uuid) or {}).get("marked")
                                     for m in mirrors}  # fmt: skip
    sc.check("at least 32 writes in flight at the kill", busy, sc.info["in_flight_at_kill"])
    servers = {m.name: (log_view(m.uuid) or {}).get("server") for m in mirrors if m.log_dev}
    sc.equal("this node serves the disk log when its daemon is killed", servers, {"pairdisk": 1})
    daemon.kill9()
    event("daemon killed")
    time.sleep(GONE_SECONDS)
    t0 = now()
    daemon.start(timeout=180)
    sc.info["restart_ready_s"] = round(now() - t0, 2)
    log_text = daemon.log_text()
    sc.check("the restarted daemon rejoins before it answers",
             "rejoins its process group before it answers" in log_text)  # fmt: skip
    for m in mirrors:
        back = wait_for(lambda m=m: members(m) == list(NODES), 120, 0.5)
        sc.require(f"{m.name}: the restarted daemon is back in the group", back, log_view(m.uuid))
    sc.info["rejoined_s"] = round(now() - t0, 2)
    event("daemon restarted")
    sc.mark("restarted")
    time.sleep(WRITE_ON_SECONDS)


def peer(sc: Scenario, daemon: Daemon, mirrors: list[Shared]) -> None:
    gone = wait_for(lambda: all(members(m) == [2] for m in mirrors), 300, 0.2)
    sc.require("node 1's daemon leaves the groups", gone, [log_view(m.uuid) for m in mirrors])
    t_gone = now()
    views = [log_view(m.uuid) or {} for m in mirrors]
    sc.info["orphans_seen"] = [v.get("orphans") for v in views]
    sc.check("node 1's marks are held as an orphan's", all(v.get("orphans") for v in views),
             views)  # fmt: skip
    back = wait_for(lambda: all(members(m) == list(NODES) for m in mirrors), 300, 0.5)
    sc.require("node 1's daemon rejoins the groups", back, [log_view(m.uuid) for m in mirrors])
    sc.info["seconds_away"] = round(now() - t_gone, 2)
    text = daemon.log_text()
    sc.check("the departure was seen as a dead daemon, not a dead node",
             "daemon left while its node stays in the ring" in text)  # fmt: skip
    sc.mark("node 1 back")
    time.sleep(WRITE_ON_SECONDS)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--node", type=int, required=True, choices=NODES)
    parser.add_argument("--uuid", required=True)
    parser.add_argument("--budget", type=float, default=900)
    args = parser.parse_args()
    return run_scenario(
        f"restart-pair-node{args.node}", lambda sc: scenario(sc, args.node, args.uuid), args.budget
    )


if __name__ == "__main__":
    sys.exit(main())
