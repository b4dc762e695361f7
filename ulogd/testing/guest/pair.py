"""Two-guest cluster scenario, run in each of two QEMU guests that share the mirror's legs.

``python3 pair.py --node N --role victim|survivor --uuid UUID [--budget S]``

Theory of operation
-------------------
The host boots two guests joined by a private virtual link and attaches the same two raw
images (serials ``sharedA``/``sharedB``) to both.  In each guest this script:

1. brings up the link (10.77.0.N/24), starts corosync (2 nodes, knet, ``two_node``) and ulogd
   with ``--cluster corosync``, and waits until corosync is quorate with both nodes;
2. creates the same ``clustered-core`` mirror (``nosync``: the fresh images are identical)
   over the shared legs — the victim first, the survivor once the victim's process group
   exists, so the node that dies is the group's first member — and waits until the log's
   group has both nodes;
3. writes to its own half of the mirror: the survivor with one O_DIRECT writer of known data
   (lower half), the victim with fio at queue depth 16 (upper half).  The host throttles the
   victim's second leg, so the victim always has writes that reached the first leg only.

The victim then says ``writing`` on its events port (``/dev/ttyS1``) and waits; the host kills
its QEMU (``kill -9``) and compares the upper halves of the two images at once (torn writes).
The survivor keeps writing, records a timeline (its writer's completions, ``dmsetup status``
sync counts, its ulogd's group members), waits for the departed node's regions to be marked
out of sync and then recovered by its own kernel (ulogd cycles the local mirror), writes on
for a while to measure its rate, and finally checks its data and that the legs are identical.
Its checks and figures go to ``result.json`` like every e2e scenario.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from dmlib import (
    Daemon,
    Loop,
    MiB,
    Mirror,
    Report,
    Scenario,
    Writer,
    compare_legs,
    dmesg,
    kernel_errors,
    kmsg,
    now,
    run,
    userspace_table,
    verify_readback,
    wait_for,
)

LEG_SIZE = 64 * MiB
SECTORS = LEG_SIZE // 512
REGION = 1024  # sectors: 512 KiB regions
REGIONS = SECTORS // REGION  # 128
HALF = LEG_SIZE // 2
NET = "10.77.0"
NODES = (1, 2)
RUN_DIR = Path("/run/ulogd")
ARTEFACTS = Path("/tmp/e2e-artefacts")
COROSYNC_DIR = Path("/run/corosync-e2e")
MIRROR = "pair"
#: How long the survivor keeps writing after the recovery, to measure its rate.
AFTER_SECONDS = 15.0


def event(text: str) -> None:
    """One line to the host on the events port (and a marker in the kernel log)."""
    kmsg(text)
    try:
        with open("/dev/ttyS1", "w") as port:
            port.write(f"{text}\n")
    except OSError as exc:
        print(f"events port: {exc}", flush=True)


def link_up(node: int) -> str:
    """Address the private link: virtio-net's interface gets 10.77.0.<node>/24."""
    run(["modprobe", "virtio_net"])
    iface = ""

    def found() -> bool:
        nonlocal iface
        names = [n for n in os.listdir("/sys/class/net") if n != "lo"]
        iface = names[0] if names else ""
        return bool(iface)

    if not wait_for(found, 30):
        raise RuntimeError("no network interface for the private link")
    run(["ip", "addr", "add", f"{NET}.{node}/24", "dev", iface])
    run(["ip", "link", "set", iface, "up"])
    return iface


def start_corosync() -> subprocess.Popen[bytes]:
    from ulogd.testing.corosync import corosync_conf

    (COROSYNC_DIR / "lib").mkdir(parents=True, exist_ok=True)
    conf = COROSYNC_DIR / "corosync.conf"
    addrs = [f"{NET}.{n}" for n in NODES]
    conf.write_text(corosync_conf("ulogdpair", addrs, COROSYNC_DIR, two_node=True))
    out = open(COROSYNC_DIR / "corosync.out", "wb")  # noqa: SIM115 (lives as long as corosync)
    return subprocess.Popen(["corosync", "-f", "-c", str(conf)], stdout=out, stderr=out)


def quorate_with_both() -> bool:
    """votequorum's wait_for_all (implied by two_node) makes 'Quorate' mean both were seen."""
    proc = subprocess.run(
        ["corosync-quorumtool", "-s"], capture_output=True, text=True, timeout=30, check=False
    )
    return "Quorate:          Yes" in proc.stdout or "Quorate: Yes" in " ".join(proc.stdout.split())


def shared_legs() -> list[Loop]:
    """The shared images, by the serial the host gave them (``Loop`` over a block device)."""
    by_serial = {}
    for dev in Path("/sys/block").glob("vd*"):
        with contextlib.suppress(OSError):
            by_serial[(dev / "serial").read_text().strip()] = f"/dev/{dev.name}"
    return [Loop(Path(by_serial[s]), by_serial[s]) for s in ("sharedA", "sharedB")]


def group_exists(uuid: str) -> bool:
    """Does corosync know a process group named after the log (the other node created it)?"""
    proc = subprocess.run(
        ["corosync-cpgtool", "-e"], capture_output=True, text=True, timeout=30, check=False
    )
    return uuid in proc.stdout


def log_view(uuid: str) -> dict[str, Any] | None:
    """This node's ulogd's status entry for the log (None when unknown or unreachable)."""
    from ulogd.status import StatusError, fetch

    try:
        snapshot = fetch(str(RUN_DIR))
    except (StatusError, OSError):
        return None
    for entry in snapshot.get("logs", []):
        if entry.get("uuid") == uuid:
            return dict(entry)
    return None


class Timeline(threading.Thread):
    """Samples the survivor's state every half second until halted."""

    def __init__(self, mirror: Mirror, uuid: str, writer: Writer) -> None:
        super().__init__(name="timeline", daemon=True)
        self.mirror, self.uuid, self.writer = mirror, uuid, writer
        self.samples: list[dict[str, Any]] = []
        self._halt = threading.Event()

    def halt(self) -> None:
        self._halt.set()
        self.join(timeout=60)

    def run(self) -> None:
        while not self._halt.is_set():
            sample: dict[str, Any] = {"t": round(now(), 2), "done": self.writer.done}
            try:
                st = self.mirror.status(timeout=30)
                sample["in_sync"] = st.in_sync
            except Exception as exc:
                sample["status_error"] = str(exc)[:200]
            view = log_view(self.uuid)
            if view is not None:
                sample["members"] = view.get("members")
                sample["marked"] = view.get("marked")
            self.samples.append(sample)
            self._halt.wait(0.5)

    def first(self, pred: Any, after: float = 0.0) -> dict[str, Any] | None:
        return next((s for s in self.samples if s["t"] >= after and pred(s)), None)


def rate(samples: list[dict[str, Any]], start: float, end: float) -> float | None:
    """Writes per second completed between two sample times."""
    inside = [s for s in samples if start <= s["t"] <= end]
    if len(inside) < 2 or inside[-1]["t"] <= inside[0]["t"]:
        return None
    return (inside[-1]["done"] - inside[0]["done"]) / (inside[-1]["t"] - inside[0]["t"])


def prepare(sc: Scenario, node: int, uuid: str, role: str) -> tuple[Daemon, Mirror, list[Loop]]:
    """Link, corosync, ulogd, the shared mirror created and joined by both nodes."""
    link_up(node)
    sc.mark("link up")
    corosync = start_corosync()
    sc.require("corosync quorate with both nodes", wait_for(quorate_with_both, 180, 0.5),
               (COROSYNC_DIR / "corosync.log").read_text(errors="replace")[-1500:]
               if (COROSYNC_DIR / "corosync.log").exists() else "no corosync log")  # fmt: skip
    sc.info["corosync_pid"] = corosync.pid
    sc.mark("corosync quorate")
    daemon = Daemon(str(RUN_DIR), ARTEFACTS / "ulogd.log", ARTEFACTS,
                    ["--cluster", "corosync", "--log-level", "info"])  # fmt: skip
    daemon.start(timeout=180)
    sc.mark("ulogd ready")
    legs = shared_legs()
    mirror = Mirror(MIRROR, userspace_table(SECTORS, uuid, "clustered-core", legs,
                                            region=REGION, sync="nosync"), SECTORS)  # fmt: skip
    if role == "survivor":
        sc.require("the victim's group appears", wait_for(lambda: group_exists(uuid), 240, 0.5))
    mirror.create()
    sc.mark("mirror created")
    both = wait_for(lambda: (log_view(uuid) or {}).get("members") == list(NODES), 240, 0.5)
    sc.require("the log's group has both nodes", both, log_view(uuid))
    sc.mark("group of two")
    return daemon, mirror, legs


def victim(sc: Scenario, node: int, uuid: str) -> None:
    _daemon, mirror, _legs = prepare(sc, node, uuid, "victim")
    fio = subprocess.Popen(
        ["fio", "--name=victim", f"--filename={mirror.path}", "--rw=randwrite", "--bs=4k",
         "--direct=1", "--ioengine=libaio", "--iodepth=16", f"--offset={HALF}",
         f"--size={HALF}", "--time_based", "--runtime=3600", "--randrepeat=0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    time.sleep(8)
    view = log_view(uuid) or {}
    sc.check("fio runs", fio.poll() is None, fio.returncode)
    sc.info["marked_before_kill"] = view.get("marked")
    event(f"writing marked={view.get('marked')}")
    time.sleep(600)  # the host kills this guest now
    sc.check("the host killed this guest", False, "still alive 600 s after 'writing'")


def survivor(sc: Scenario, node: int, uuid: str) -> None:
    since = len(dmesg().splitlines())
    daemon, mirror, legs = prepare(sc, node, uuid, "survivor")
    expected: dict[int, bytes] = {}
    writer = Writer(mirror.path, HALF, f"n{node}", count=None, expected=expected, seed=node)
    timeline = Timeline(mirror, uuid, writer)
    writer.start()
    timeline.start()
    event("writing")
    t_start = now()
    alone = wait_for(lambda: (log_view(uuid) or {}).get("members") == [node], 420, 0.5)
    sc.require("the victim leaves the log's group (killed by the host)", alone, log_view(uuid))
    departed = timeline.first(lambda s: s.get("members") == [node])
    t_departed = departed["t"] if departed else now()
    sc.mark("victim gone")
    lost = wait_for(lambda: bool(timeline.first(lambda s: s.get("in_sync", REGIONS) < REGIONS,
                                                t_departed - 1)), 120, 0.5)  # fmt: skip
    lost_sample = timeline.first(lambda s: s.get("in_sync", REGIONS) < REGIONS, t_departed - 1)
    sc.check("the victim's marked regions are out of sync after it died", lost, lost_sample)
    recovered = wait_for(
        lambda: bool(timeline.first(lambda s: s.get("in_sync") == REGIONS,
                                    lost_sample["t"] if lost_sample else t_departed)),
        300, 0.5,
    )  # fmt: skip
    sc.require("the survivor's kernel recovers them (sync count back to N/N)", recovered,
               timeline.samples[-3:])  # fmt: skip
    back = timeline.first(lambda s: s.get("in_sync") == REGIONS,
                          lost_sample["t"] if lost_sample else t_departed)  # fmt: skip
    t_recovered = back["t"] if back else now()
    sc.mark("recovered")
    time.sleep(AFTER_SECONDS)
    writer.halt()
    writer.join(timeout=120)
    timeline.halt()
    t_end = now()
    samples = timeline.samples
    min_sync = min((s["in_sync"] for s in samples if "in_sync" in s), default=None)
    sc.info.update(
        regions=REGIONS,
        min_in_sync=min_sync,
        seconds_departure_to_recovered=round(t_recovered - t_departed, 1),
        writes=writer.done,
        max_write_latency_s=round(writer.max_latency, 2),
        rate_before=rate(samples, t_start, t_departed - 3),
        rate_after=rate(samples, t_recovered, t_end),
        timeline=samples,
    )
    sc.equal("no write errors on the survivor", writer.errors, [])
    st = mirror.wait_synced(timeout=120)
    sc.check("mirror in sync at the end", st.synced, st.raw)
    bad = verify_readback(mirror.path, expected)
    sc.equal("the survivor's data reads back", bad[:10], [])
    mirror.remove()
    ok, detail = compare_legs(legs)
    sc.check("legs identical after the recovery", ok, detail)
    sc.equal("ulogd exits 0 on SIGTERM", daemon.stop(), 0)
    sc.equal("no Python tracebacks in the ulogd log", daemon.log_text().count("Traceback"), 0)
    sc.equal("no kernel errors", kernel_errors(dmesg(), since), [])
    event("done")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--node", type=int, required=True, choices=NODES)
    parser.add_argument("--role", required=True, choices=["victim", "survivor"])
    parser.add_argument("--uuid", required=True)
    parser.add_argument("--budget", type=float, default=900)
    args = parser.parse_args()
    run_dir = Path(os.environ.get("ULOGD_RUN", "."))
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    report = Report(run_dir / "result.json")

    def save() -> None:
        report.write()
        (ARTEFACTS / "dmesg.txt").write_text(dmesg())
        for extra in ("corosync.log", "corosync.out"):
            with contextlib.suppress(OSError):
                (ARTEFACTS / extra).write_bytes((COROSYNC_DIR / extra).read_bytes())
        for path in ARTEFACTS.iterdir():
            if path.is_file():
                with contextlib.suppress(OSError):
                    (run_dir / path.name).write_bytes(path.read_bytes())
        os.sync()

    def watchdog() -> None:
        time.sleep(args.budget)
        event("failed: guest watchdog")
        save()
        Path("/proc/sysrq-trigger").write_text("o\n")

    threading.Thread(target=watchdog, daemon=True).start()
    with report.scenario(f"pair-{args.role}") as sc:
        (victim if args.role == "victim" else survivor)(sc, args.node, args.uuid)
    failed = [s.name for s in report.scenarios if not s.ok]
    if failed:
        event(f"failed: {report.scenarios[-1].error or 'checks failed'}")
    save()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
