"""Two-guest cluster scenario, run in each of two QEMU guests that share the mirror's legs.

``python3 pair.py --node N --role victim|survivor --uuid UUID [--budget S] [--systemd]``

With ``--systemd`` (the guest booted with systemd as PID 1): corosync and ulogd run under
their units — ulogd installed the way its package installs it, with ``cluster = "corosync"``
in its configuration file and the shipped cluster drop-in, so that ``systemctl start``
pulls corosync in — and the survivor's recovery cycle (dmsetup suspend/resume of its mirrors)
runs inside ulogd's unit, under its device policy and capability set.

Theory of operation
-------------------
The host boots two guests joined by a private virtual link and attaches the same two raw
images (serials ``sharedA``/``sharedB``) to both.  In each guest this script:

1. brings up the link (10.77.0.N/24), starts corosync (2 nodes, knet, ``two_node``) and ulogd
   with ``--cluster corosync``, and waits until corosync is quorate with both nodes;
2. creates the same two mirrors (``nosync``: the fresh images are identical) over the shared
   images: ``pair`` with a ``clustered-core`` log (legs ``sharedA``/``sharedB``) and
   ``pairdisk`` with a ``clustered-disk`` log on ``sharedL`` (legs ``sharedC``/``sharedD``) —
   the victim first, the survivor once the victim's process groups exist, so the node that
   dies is each group's first member and the disk log's server — and waits until both logs'
   groups have both nodes;
3. writes to its own half of each mirror: the survivor with one O_DIRECT writer of known
   data per mirror (lower halves), the victim with fio at queue depth 16 per mirror (upper
   halves).  The host throttles the victim's writes to the second legs, so the victim always
   has writes that reached the first leg only.

The victim then says ``writing`` on its events port (``/dev/ttyS1``) and waits; the host kills
its QEMU (``kill -9``) and compares the upper halves of the two images at once (torn writes).
The survivor keeps writing, records a timeline (its writers' completions, ``dmsetup status``
sync counts, its ulogd's group members), waits for the departed node's regions to be marked
out of sync and then recovered by its own kernel (ulogd cycles the local mirrors), writes on
for a while to measure its rate, and finally checks its data, that the legs are identical and
that the shared disk log, now written by the survivor, says every region is clean.
Its checks and figures go to ``result.json`` like every e2e scenario.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dmlib import (
    ARTEFACTS,
    LOG_MAGIC,
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
    read_disk_log,
    run,
    save_artefacts,
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
RUN_DIR = Path("/run/dm-ulogd")
#: --systemd: corosync and ulogd are run by their units (see the module docstring)
SYSTEMD = False
COROSYNC_DIR = Path("/run/corosync-e2e")
#: The mirrors: name -> (log type, serials of the legs, serial of the log device).
MIRRORS: dict[str, tuple[str, tuple[str, str], str | None]] = {
    "pair": ("clustered-core", ("sharedA", "sharedB"), None),
    "pairdisk": ("clustered-disk", ("sharedC", "sharedD"), "sharedL"),
}
#: How long the survivor keeps writing after the recovery, to measure its rate.
AFTER_SECONDS = 15.0
ALL_CLEAN = [LOG_MAGIC, 2, REGIONS, REGIONS]  # (magic, version, nr_regions, clean regions)


@dataclasses.dataclass
class Shared:
    """One mirror over the shared images, as this node sees it."""

    name: str
    uuid: str
    kind: str
    legs: list[Loop]
    log_dev: str | None
    mirror: Mirror


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


def corosync_config() -> str:
    from tests.harness.corosync import corosync_conf

    (COROSYNC_DIR / "lib").mkdir(parents=True, exist_ok=True)
    addrs = [f"{NET}.{n}" for n in NODES]
    return corosync_conf("ulogdpair", addrs, COROSYNC_DIR, two_node=True)


def start_corosync() -> subprocess.Popen[bytes]:
    conf = COROSYNC_DIR / "corosync.conf"
    conf.write_text(corosync_config())
    out = open(COROSYNC_DIR / "corosync.out", "wb")  # noqa: SIM115 (lives as long as corosync)
    return subprocess.Popen(["corosync", "-f", "-c", str(conf)], stdout=out, stderr=out)


class UnitDaemon:
    """ulogd run by its shipped unit (``--systemd``), with what this scenario asks of
    :class:`dmlib.Daemon`: its log (the unit's journal) and a stop with its exit status."""

    def __init__(self) -> None:
        from systemd_unit import Unit

        self.unit = Unit()

    def start(self, timeout: float) -> None:
        from systemd_unit import systemctl

        r = systemctl("start", self.unit.name, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"systemctl start {self.unit.name}: {r.stderr} {self.log_text()}")

    def log_text(self) -> str:
        return run(["journalctl", "-b", "-u", self.unit.name, "--no-pager", "-o", "cat"],
                   check=False)  # fmt: skip

    def stop(self) -> int | None:
        from systemd_unit import systemctl

        systemctl("stop", self.unit.name)
        props = self.unit.show("Result", "ExecMainStatus")
        return int(props["ExecMainStatus"]) if props.get("Result") == "success" else None


def start_under_systemd(sc: Scenario) -> UnitDaemon:
    """corosync's and ulogd's units, configured for the pair; ``systemctl start dm-ulogd``
    brings corosync up first (the cluster drop-in)."""
    global RUN_DIR
    from systemd_unit import PACKAGING, install_like_the_package, save_journal, systemctl

    from ulogd.ops.config import DEFAULT_PATH

    daemon = UnitDaemon()
    unit = daemon.unit
    RUN_DIR = unit.run_dir
    Path("/etc/corosync/corosync.conf").write_text(corosync_config())
    Path("/etc/systemd/system/corosync.service").unlink(missing_ok=True)  # masked at boot
    install_like_the_package(unit)
    DEFAULT_PATH.parent.mkdir(parents=True, exist_ok=True)
    DEFAULT_PATH.write_text('cluster = "corosync"\nlog_level = "info"\n')
    dropin = Path("/etc/systemd/system") / f"{unit.name}.d"
    dropin.mkdir(parents=True, exist_ok=True)
    (dropin / "cluster.conf").write_bytes((PACKAGING / "cluster.conf").read_bytes())
    systemctl("daemon-reload")
    try:
        daemon.start(timeout=240)
    finally:
        save_journal(unit)
    sc.equal("corosync started with ulogd (the cluster drop-in)",
             systemctl("is-active", "corosync").stdout.strip(), "active")  # fmt: skip
    sc.equal("ulogd's unit is active", unit.prop("ActiveState"), "active")
    return daemon


def quorate_with_both() -> bool:
    """votequorum's wait_for_all (implied by two_node) makes 'Quorate' mean both were seen."""
    proc = subprocess.run(
        ["corosync-quorumtool", "-s"], capture_output=True, text=True, timeout=30, check=False
    )
    return "Quorate:          Yes" in proc.stdout or "Quorate: Yes" in " ".join(proc.stdout.split())


def shared_devices() -> dict[str, str]:
    """The shared images by the serial the host gave them: serial -> /dev/vdX."""
    by_serial = {}
    for dev in Path("/sys/block").glob("vd*"):
        with contextlib.suppress(OSError):
            by_serial[(dev / "serial").read_text().strip()] = f"/dev/{dev.name}"
    return by_serial


def shared_mirrors(uuid: str) -> list[Shared]:
    devs = shared_devices()
    out = []
    for name, (kind, legs, log_serial) in MIRRORS.items():
        loops = [Loop(Path(devs[s]), devs[s]) for s in legs]  # Loop: any block device works
        log_dev = devs[log_serial] if log_serial else None
        log_uuid = f"{uuid}-{name}"
        table = userspace_table(SECTORS, log_uuid, kind, loops, region=REGION, sync="nosync",
                                log_dev=log_dev)  # fmt: skip
        out.append(Shared(name, log_uuid, kind, loops, log_dev, Mirror(name, table, SECTORS)))
    return out


def group_exists(uuid: str) -> bool:
    """Does corosync know a process group named after the log (the other node created it)?"""
    proc = subprocess.run(
        ["corosync-cpgtool", "-e"], capture_output=True, text=True, timeout=30, check=False
    )
    return uuid in proc.stdout


def log_view(uuid: str) -> dict[str, Any] | None:
    """This node's ulogd's status entry for the log (None when unknown or unreachable)."""
    from ulogd.ops.status import StatusError, fetch

    try:
        snapshot = fetch(str(RUN_DIR))
    except (StatusError, OSError):
        return None
    for entry in snapshot.get("logs", []):
        if entry.get("uuid") == uuid:
            return dict(entry)
    return None


class Timeline(threading.Thread):
    """Samples the survivor's state every half second until halted: writes done, and per
    mirror its kernel's sync count and its log's group members and marked regions."""

    def __init__(self, mirrors: list[Shared], writers: list[Writer]) -> None:
        super().__init__(name="timeline", daemon=True)
        self.mirrors, self.writers = mirrors, writers
        self.samples: list[dict[str, Any]] = []
        self._halt = threading.Event()

    def halt(self) -> None:
        self._halt.set()
        self.join(timeout=60)

    def run(self) -> None:
        while not self._halt.is_set():
            sample: dict[str, Any] = {
                "t": round(now(), 2),
                "done": sum(w.done for w in self.writers),
            }
            for m in self.mirrors:
                try:
                    sample[f"{m.name}.in_sync"] = m.mirror.status(timeout=30).in_sync
                except Exception as exc:
                    sample[f"{m.name}.status_error"] = str(exc)[:200]
                view = log_view(m.uuid)
                if view is not None:
                    sample[f"{m.name}.members"] = view.get("members")
                    sample[f"{m.name}.marked"] = view.get("marked")
                    if m.kind == "clustered-disk":
                        sample[f"{m.name}.server"] = view.get("server")
            self.samples.append(sample)
            self._halt.wait(0.5)

    def first(
        self, pred: Callable[[dict[str, Any]], bool], after: float = 0.0
    ) -> dict[str, Any] | None:
        return next((s for s in self.samples if s["t"] >= after and pred(s)), None)

    def sync_change(self, name: str, lost: bool, after: float) -> dict[str, Any] | None:
        """The first sample from ``after`` on where mirror ``name`` is out of sync
        (``lost``) or fully in sync (not ``lost``)."""
        key = f"{name}.in_sync"
        if lost:
            return self.first(lambda s: s.get(key, REGIONS) < REGIONS, after)
        return self.first(lambda s: s.get(key) == REGIONS, after)


def rate(samples: list[dict[str, Any]], start: float, end: float) -> float | None:
    """Writes per second completed between two sample times."""
    inside = [s for s in samples if start <= s["t"] <= end]
    if len(inside) < 2 or inside[-1]["t"] <= inside[0]["t"]:
        return None
    return round((inside[-1]["done"] - inside[0]["done"]) / (inside[-1]["t"] - inside[0]["t"]), 1)


def prepare(
    sc: Scenario, node: int, uuid: str, role: str
) -> tuple[Daemon | UnitDaemon, list[Shared]]:
    """Link, corosync, ulogd, the shared mirrors created and joined by both nodes."""
    link_up(node)
    sc.mark("link up")
    daemon: Daemon | UnitDaemon
    if SYSTEMD:
        daemon = start_under_systemd(sc)
        sc.mark("ulogd's unit started (and corosync)")
    else:
        corosync = start_corosync()
        sc.info["corosync_pid"] = corosync.pid
    sc.require("corosync quorate with both nodes", wait_for(quorate_with_both, 180, 0.5),
               (COROSYNC_DIR / "corosync.log").read_text(errors="replace")[-1500:]
               if (COROSYNC_DIR / "corosync.log").exists() else "no corosync log")  # fmt: skip
    sc.mark("corosync quorate")
    if not SYSTEMD:
        daemon = Daemon(str(RUN_DIR), ARTEFACTS / "ulogd.log", ARTEFACTS,
                        ["--cluster", "corosync", "--log-level", "info"])  # fmt: skip
        daemon.start(timeout=180)
        sc.mark("ulogd ready")
    mirrors = shared_mirrors(uuid)
    for m in mirrors:
        if role == "survivor":
            appeared = wait_for(lambda m=m: group_exists(m.uuid), 240, 0.5)
            sc.require(f"{m.name}: the victim's group appears", appeared)
        m.mirror.create()
    sc.mark("mirrors created")
    for m in mirrors:
        both = wait_for(
            lambda m=m: (log_view(m.uuid) or {}).get("members") == list(NODES), 240, 0.5
        )
        sc.require(f"{m.name}: the log's group has both nodes", both, log_view(m.uuid))
    sc.mark("groups of two")
    return daemon, mirrors


def victim(sc: Scenario, node: int, uuid: str) -> None:
    _daemon, mirrors = prepare(sc, node, uuid, "victim")
    argv = ["fio", "--rw=randwrite", "--bs=4k", "--direct=1", "--ioengine=libaio",
            "--iodepth=16", f"--offset={HALF}", f"--size={HALF}", "--time_based",
            "--runtime=3600", "--randrepeat=0"]  # fmt: skip
    for m in mirrors:
        argv += [f"--name={m.name}", f"--filename={m.mirror.path}"]
    fio = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(8)
    marked = {m.name: (log_view(m.uuid) or {}).get("marked") for m in mirrors}
    sc.check("fio runs", fio.poll() is None, fio.returncode)
    sc.info["marked_before_kill"] = marked
    event("writing " + " ".join(f"{k}.marked={v}" for k, v in marked.items()))
    time.sleep(600)  # the host kills this guest now
    sc.check("the host killed this guest", False, "still alive 600 s after 'writing'")


def survivor(sc: Scenario, node: int, uuid: str) -> None:
    since = len(dmesg().splitlines())
    daemon, mirrors = prepare(sc, node, uuid, "survivor")
    expected: dict[str, dict[int, bytes]] = {m.name: {} for m in mirrors}
    writers = [Writer(m.mirror.path, HALF, f"n{node}-{m.name}", count=None,
                      expected=expected[m.name], seed=node) for m in mirrors]  # fmt: skip
    timeline = Timeline(mirrors, writers)
    for w in writers:
        w.start()
    timeline.start()
    event("writing")
    t_start = now()

    def alone() -> bool:
        return all((log_view(m.uuid) or {}).get("members") == [node] for m in mirrors)

    sc.require("the victim leaves the logs' groups (killed by the host)", wait_for(alone, 420, 0.5),
               [log_view(m.uuid) for m in mirrors])  # fmt: skip
    departed = timeline.first(lambda s: all(s.get(f"{m.name}.members") == [node] for m in mirrors))
    t_departed = departed["t"] if departed else now()
    sc.mark("victim gone")
    t_recovered = t_departed
    for m in mirrors:
        if m.kind == "clustered-disk":
            servers = [x.get(f"{m.name}.server") for x in timeline.samples]
            sc.equal(f"{m.name}: the victim served the disk log while it lived", servers[0], 1)
            now_serving = (log_view(m.uuid) or {}).get("server")
            sc.equal(f"{m.name}: the survivor serves the disk log after it died", now_serving, node)
    for m in mirrors:
        # The survivor's ulogd says how many regions the departed member held (they lose
        # sync); the 0.5 s timeline may miss the out-of-sync window when recovery is quick.
        said = re.compile(rf"\[{re.escape(m.uuid[-8:])}\] (\d+) region\(s\) must be recovered")
        lost = wait_for(lambda said=said: bool(said.search(daemon.log_text())), 120, 0.5)
        match = said.search(daemon.log_text())
        sc.info[f"{m.name}.lost_regions"] = int(match.group(1)) if match else 0
        sc.check(f"{m.name}: the victim's marked regions lose sync after it died", lost,
                 match.group(0) if match else "no such log line")  # fmt: skip
        at = timeline.sync_change(m.name, True, t_departed - 1)
        t_lost = at["t"] if at else t_departed
        recovered = wait_for(
            lambda m=m, t=t_lost: timeline.sync_change(m.name, False, t) is not None, 300, 0.5
        )
        sc.require(f"{m.name}: the survivor's kernel recovers them (sync count back to N/N)",
                   recovered, timeline.samples[-3:])  # fmt: skip
        back = timeline.sync_change(m.name, False, t_lost)
        t_recovered = max(t_recovered, back["t"] if back else now())
        counts = [x[f"{m.name}.in_sync"] for x in timeline.samples if f"{m.name}.in_sync" in x]
        sc.info[f"{m.name}.min_in_sync"] = min(counts, default=None)
    sc.mark("recovered")
    time.sleep(AFTER_SECONDS)
    for w in writers:
        w.halt()
    for w in writers:
        w.join(timeout=120)
    timeline.halt()
    t_end = now()
    samples = timeline.samples
    sc.info.update(
        regions=REGIONS,
        seconds_departure_to_recovered=round(t_recovered - t_departed, 1),
        writes=sum(w.done for w in writers),
        max_write_latency_s=round(max(w.max_latency for w in writers), 2),
        rate_before=rate(samples, t_start, t_departed - 3),
        rate_after=rate(samples, t_recovered, t_end),
        timeline=samples,
    )
    for m, w in zip(mirrors, writers, strict=True):
        sc.equal(f"{m.name}: no write errors on the survivor", w.errors, [])
        st = m.mirror.wait_synced(timeout=120)
        sc.check(f"{m.name}: mirror in sync at the end", st.synced, st.raw)
        if m.kind == "clustered-disk":
            sc.equal(f"{m.name}: the survivor serves the disk log, healthy", st.log[-1:], ["A"])
        bad = verify_readback(m.mirror.path, expected[m.name])
        sc.equal(f"{m.name}: the survivor's data reads back", bad[:10], [])
        m.mirror.remove()
        ok, detail = compare_legs(m.legs)
        sc.check(f"{m.name}: legs identical after the recovery", ok, detail)
        if m.log_dev is not None:
            sc.equal(f"{m.name}: the shared disk log says all clean after remove",
                     read_disk_log(m.log_dev, REGIONS), ALL_CLEAN)  # fmt: skip
    if SYSTEMD:
        text = daemon.log_text()
        sc.check("the recovery cycle ran inside ulogd's unit",
                 all(f"suspend/resume of {m.name} to recover" in text for m in mirrors)
                 and "recovery cycle of the local mirror failed" not in text,
                 [ln for ln in text.splitlines() if "cycle" in ln][-6:])  # fmt: skip
    sc.equal("ulogd exits 0 on SIGTERM", daemon.stop(), 0)
    sc.equal("no Python tracebacks in the ulogd log", daemon.log_text().count("Traceback"), 0)
    sc.equal("no kernel errors", kernel_errors(dmesg(), since), [])
    event("done")


def run_scenario(name: str, body: Callable[[Scenario], None], budget: float) -> int:
    """Run one guest scenario of a pair: ``result.json`` and the artefacts (corosync's logs;
    under systemd the unit's journal as ``ulogd.log``), a watchdog that saves and powers off
    after ``budget`` seconds, ``failed: ...`` on the events port; returns the exit status."""
    run_dir = Path(os.environ.get("ULOGD_RUN", "."))
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    report = Report(run_dir / "result.json")

    def save() -> None:
        report.write()
        for extra in ("corosync.log", "corosync.out"):
            with contextlib.suppress(OSError):
                (ARTEFACTS / extra).write_bytes((COROSYNC_DIR / extra).read_bytes())
        if SYSTEMD:
            from systemd_unit import Unit, save_journal

            with contextlib.suppress(Exception):
                (ARTEFACTS / "ulogd.log").write_text(save_journal(Unit()))
        save_artefacts(run_dir)
        os.sync()

    def watchdog() -> None:
        time.sleep(budget)
        event("failed: guest watchdog")
        save()
        Path("/proc/sysrq-trigger").write_text("o\n")

    threading.Thread(target=watchdog, daemon=True).start()
    with report.scenario(name) as sc:
        body(sc)
    failed = [s.name for s in report.scenarios if not s.ok]
    if failed:
        event(f"failed: {report.scenarios[-1].error or 'checks failed'}")
    save()
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--node", type=int, required=True, choices=NODES)
    parser.add_argument("--role", required=True, choices=["victim", "survivor"])
    parser.add_argument("--uuid", required=True)
    parser.add_argument("--budget", type=float, default=900)
    parser.add_argument("--systemd", action="store_true", help="run corosync and ulogd by units")
    args = parser.parse_args()
    global SYSTEMD
    SYSTEMD = args.systemd
    role = victim if args.role == "victim" else survivor
    return run_scenario(
        f"pair-{args.role}", lambda sc: role(sc, args.node, args.uuid), args.budget
    )


if __name__ == "__main__":
    sys.exit(main())
