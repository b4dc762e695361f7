"""Hardening scenarios run inside the QEMU guest (``tests/e2e/test_hardening.py`` boots them):
``python3 guest_hardening.py [--budget S] [--kills N] NAME...``.

Built on the e2e scenario library (``tests/harness/guest``): real dm-mirror devices over loop
devices, their log served by one shared ulogd, O_DIRECT writers with known data, named checks
recorded in ``$ULOGD_RUN/result.json``.

* ``forged`` — a root process sends forged dm-log-userspace requests (valid uuid and luid of a
  live mirror: SET_REGION_SYNC out of sync, CLEAR, PRESUSPEND, POSTSUSPEND, DTR, a CTR) to
  connector group 7 (multicast, as the kernel does) and straight to the daemon's netlink
  port: nothing changes (sync count, state, daemon alive), the daemon logs them as not the
  kernel's, and the kernel's own traffic keeps working (writes, legs identical).
* ``log-device-bad`` — a clustered-disk mirror whose log device is a dm device switched by
  table reload to dm-flakey (errors half the time) and to dm-error while a writer runs, then
  back to linear: zero application I/O errors, data reads back, legs identical at the end.
* ``reloads`` — table reloads (new log instance, state carried over) under a running writer:
  zero application I/O errors, legs identical at the end.
* ``kill-loop`` — ``--kills`` times: kill -9 of ulogd under a running writer, restart once the
  kernel is in its reconnect loop: zero application I/O errors, legs identical at the end.
"""

from __future__ import annotations

import argparse
import itertools
import os
import socket
import struct
import sys
import time
from pathlib import Path

GUEST = Path(__file__).resolve().parents[2] / "ulogd" / "testing" / "guest"
sys.path.insert(0, os.environ.get("ULOGD_GUEST", str(GUEST)))

from dmlib import (  # noqa: E402
    Loop,
    Mirror,
    Scenario,
    Writer,
    kmsg,
    verify_readback,
    wait_for,
)
from scenarios import (  # noqa: E402
    LEG_SIZE,
    LOGDEV_SIZE,
    SCENARIOS,
    SECTORS,
    Env,
    _restart_mirror,
    _writer_until,
    daemon_alive,
    dmesg_lines,
    dmesg_since,
    legs_pair,
    new_uuid,
    note_uuid,
    run_scenarios,
    synced_and_identical,
    userspace_table,
)

from ulogd.ops import control  # noqa: E402
from ulogd.protocol import spec as p  # noqa: E402
from ulogd.protocol import wire  # noqa: E402


def _log_status(d_run_dir: Path, uuid: str) -> dict | None:
    answer = control.request(d_run_dir / control.SOCKET_NAME, "status", timeout=10)
    for entry in answer.get("logs", []):
        if entry["uuid"] == uuid:
            return entry
    return None


def _daemon_ports() -> list[int]:
    """Netlink ports of connector sockets subscribed to group 7 (/proc/net/netlink)."""
    ports = []
    for line in Path("/proc/net/netlink").read_text().splitlines()[1:]:
        f = line.split()
        if int(f[1]) == p.NETLINK_CONNECTOR and int(f[2]) != 0 and int(f[3], 16) & (1 << 6):
            ports.append(int(f[2]))
    return ports


def sc_forged(sc: Scenario, env: Env) -> None:
    d = env.ulogd(sc)
    legs = legs_pair("fg")
    uuid = note_uuid(sc, "mirror", new_uuid("fg"))
    # legs start identical (zero-filled): nosync skips a resync that costs a minute under TCG
    table = userspace_table(SECTORS, uuid, "clustered-core", legs, sync="nosync")
    m = Mirror("e2e-fg", table, SECTORS)
    m.create()
    st = m.wait_synced(180)
    sc.require("mirror synced", st.synced, st.raw)
    before = _log_status(d.run_dir, uuid)
    sc.require("the daemon shows the log", before is not None, before)
    assert before is not None
    luid = before["luid"]
    log_size = d.log_file.stat().st_size
    ports = _daemon_ports()
    sc.check("the daemon's connector socket found", bool(ports), ports)
    forged = [
        (p.RequestType.SET_REGION_SYNC, struct.pack("=Qq", 5, 0)),
        (p.RequestType.SET_REGION_SYNC, struct.pack("=Qq", 6, 0)),
        (p.RequestType.CLEAR_REGION, struct.pack("=Q", 7)),
        (p.RequestType.MARK_REGION, struct.pack("=Q", 8)),
        (p.RequestType.PRESUSPEND, b""),
        (p.RequestType.POSTSUSPEND, b""),
        (p.RequestType.DTR, b""),
        (p.RequestType.CTR, f"{SECTORS} clustered-core 2048 sync".encode()),
    ]
    attacker = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, p.NETLINK_CONNECTOR)
    attacker.bind((0, 0))
    sent = 0
    try:
        for i, (rtype, data) in enumerate(forged):
            # nlmsg_pid 0 in the header, as the kernel's: only the real sender port tells
            dg = wire.encode_request(rtype, uuid=uuid, luid=luid, seq=0x7E570000 + i, data=data)
            attacker.sendto(dg, (0, 1 << (p.CN_IDX_DM - 1)))  # multicast to group 7
            sent += 1
            for port in ports:
                attacker.sendto(dg, (port, 0))  # unicast to the daemon
                sent += 1
    finally:
        attacker.close()
    sc.info["forged_datagrams"] = sent
    time.sleep(2)
    after = _log_status(d.run_dir, uuid)
    sc.check("log still there after forged DTR", after is not None, after)
    keys = ("luid", "in_sync", "marked", "state", "regions", "region_size")
    sc.equal(
        "forged requests changed nothing (dm-ulogd status)",
        {k: (after or {}).get(k) for k in keys},
        {k: before.get(k) for k in keys},
    )
    st = m.status()
    sc.check("kernel: still N/N in sync", st.synced, st.raw)
    with open(d.log_file, "rb") as fh:
        fh.seek(log_size)
        text = fh.read().decode(errors="replace")
    rejected = [ln for ln in text.splitlines() if "not the kernel" in ln]
    sc.check("daemon logged the forged datagrams as not the kernel's", len(rejected) >= len(forged),
             f"{len(rejected)} lines: {rejected[:2]}")  # fmt: skip
    daemon_alive(sc, d)
    expected: dict[int, bytes] = {}
    w = Writer(m.path, LEG_SIZE, "fg", count=40, expected=expected, seed=81)
    w.start()
    w.join(240)
    sc.check("kernel traffic keeps working: 40 writes, no I/O error",
             w.done == 40 and not w.errors, f"done={w.done} errors={w.errors[:3]}")  # fmt: skip
    sc.check("data reads back", not verify_readback(m.path, expected), len(expected))
    synced_and_identical(sc, m, legs, "after the forged requests")
    m.remove()


def sc_log_device_bad(sc: Scenario, env: Env) -> None:
    d = env.ulogd(sc)
    back = Loop.create("lb-logback", LOGDEV_SIZE)
    n = LOGDEV_SIZE // 512
    linear = f"0 {n} linear {back.dev} 0"
    logdm = Mirror("e2e-lblog", linear, n)
    logdm.create()
    legs = legs_pair("lb")
    uuid = note_uuid(sc, "mirror", new_uuid("lb"))
    table = userspace_table(SECTORS, uuid, "clustered-disk", legs, log_dev=logdm.majmin,
                            sync="nosync", handle_errors=False)  # fmt: skip
    m = Mirror("e2e-lb", table, SECTORS)
    m.create()
    st = m.wait_synced(180)
    sc.require("mirror synced", st.synced, st.raw)
    expected: dict[int, bytes] = {}
    w = Writer(m.path, LEG_SIZE, "lb", count=None, expected=expected, seed=91, delay=0.01)
    w.start()
    sc.require("writer running", _writer_until(w, 10, 60), w.done)
    phases = [
        ("flakey", f"0 {n} flakey {back.dev} 0 1 1"),  # 1 s up, 1 s erroring
        ("error", f"0 {n} error"),
        ("linear", linear),
    ]
    health = {}
    for name, log_table in phases:
        logdm.reload(log_table)
        sc.mark(f"log device {name}")
        start = w.done
        progressed = _writer_until(w, start + 15, 60)
        sc.check(f"writes go on with the log device {name}", progressed, w.done - start)
        health[name] = m.status().log
    sc.info["log_status_per_phase"] = health
    w.halt()
    w.join(120)
    sc.equal("no application I/O error", w.errors, [])
    sc.info["writes"] = w.done
    sc.info["max_write_latency_s"] = round(w.max_latency, 1)
    m.suspend()
    m.resume()
    sc.check("data reads back", not verify_readback(m.path, expected), len(expected))
    synced_and_identical(sc, m, legs, "after the log device came back")
    daemon_alive(sc, d)
    m.remove()
    logdm.remove()


def sc_reloads(sc: Scenario, env: Env) -> None:
    d = env.ulogd(sc)
    legs = legs_pair("rl")
    uuid = note_uuid(sc, "mirror", new_uuid("rl"))
    table = userspace_table(SECTORS, uuid, "clustered-core", legs, sync="nosync")
    m = Mirror("e2e-rl", table, SECTORS)
    m.create()
    st = m.wait_synced(180)
    sc.require("mirror synced", st.synced, st.raw)
    expected: dict[int, bytes] = {}
    w = Writer(m.path, LEG_SIZE, "rl", count=None, expected=expected, seed=101, delay=0.005)
    w.start()
    sc.require("writer running", _writer_until(w, 10, 60), w.done)
    first = _log_status(d.run_dir, uuid)
    luids = [first["luid"] if first else None]
    for i in range(4):
        m.reload(table)
        entry = _log_status(d.run_dir, uuid)
        luids.append(entry["luid"] if entry else None)
        start = w.done
        sc.check(f"reload {i + 1}: writes go on", _writer_until(w, start + 10, 60), w.done - start)
    sc.info["luids"] = len(set(luids))
    w.halt()
    w.join(120)
    sc.equal("no application I/O error", w.errors, [])
    sc.info["writes"] = w.done
    # The kernel's luid is the address of its log context: a freed one may come back in a later
    # reload, but each reload's instance is new while the previous one is still alive.
    fresh = None not in luids and all(a != b for a, b in itertools.pairwise(luids))
    sc.check("every reload made a new log instance", fresh, luids)
    sc.check("data reads back", not verify_readback(m.path, expected), len(expected))
    synced_and_identical(sc, m, legs, "after the reloads")
    daemon_alive(sc, d)
    m.remove()


def sc_kill_loop(sc: Scenario, env: Env, kills: int) -> None:
    d, m, legs = _restart_mirror(sc, env, "kl")
    expected: dict[int, bytes] = {}
    w = Writer(m.path, LEG_SIZE, "kl", count=None, expected=expected, seed=111)
    w.start()
    sc.require("writer running", _writer_until(w, 20, 60), w.done)
    resumed_all = True
    for i in range(kills):
        since = dmesg_lines()
        d.kill9()
        sc.mark(f"kill {i + 1}")
        lost = wait_for(lambda since=since: "server not found" in dmesg_since(since), 40, 1.0)
        sc.check(f"kill {i + 1}: kernel lost the server", lost, "")
        d.start()
        resumed = _writer_until(w, w.done + 20, 120)
        resumed_all &= resumed
        sc.check(f"kill {i + 1}: writes resumed after the restart", resumed, w.done)
        if not resumed:
            break
    w.halt()
    w.join(120)
    sc.equal("no application I/O error", w.errors, [])
    sc.info["kills"] = kills
    sc.info["writes"] = w.done
    sc.info["max_write_latency_s"] = round(w.max_latency, 1)
    sc.check("data reads back", not verify_readback(m.path, expected), len(expected))
    synced_and_identical(sc, m, legs, f"after {kills} kills")
    m.remove()
    daemon_alive(sc, d)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", type=float, default=600)
    parser.add_argument("--kills", type=int, default=5)
    names = ["forged", "log-device-bad", "reloads", "kill-loop", "shutdown"]
    parser.add_argument("names", nargs="+", choices=names)
    args = parser.parse_args()
    own = {
        "forged": sc_forged,
        "log-device-bad": sc_log_device_bad,
        "reloads": sc_reloads,
        "kill-loop": lambda sc, env: sc_kill_loop(sc, env, args.kills),
        "shutdown": SCENARIOS["shutdown"],
    }
    failed = run_scenarios(args.names, own, args.budget)
    kmsg(f"hardening: {len(args.names) - len(failed)} passed, failed: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
