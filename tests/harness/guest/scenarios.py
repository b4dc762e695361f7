"""e2e scenarios, run inside the QEMU guest: ``python3 scenarios.py [--budget S] NAME...``.

Each scenario builds real dm-mirror devices over loop devices, serves their dirty log with
ulogd (``python3 -m ulogd run``, except ``kernel-logs`` which validates the harness itself
with the kernel's own ``core``/``disk`` logs), drives O_DIRECT I/O with known data and records
named checks.  Results go to ``$ULOGD_RUN/result.json``; daemon logs, captures and the kernel
log are copied next to it.  A watchdog thread writes what it has and powers the guest off
before the host's timeout would kill QEMU, so a hang still leaves its diagnostics behind.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import signal
import sys
import threading
import time
import uuid as uuidlib
from collections.abc import Callable
from pathlib import Path

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
    detach_all_loops,
    dmesg,
    kernel_errors,
    kernel_table,
    kmsg,
    read_disk_log,
    remove_all_dm,
    run,
    save_artefacts,
    userspace_table,
    verify_readback,
    wait_for,
)

LEG_SIZE = 32 * MiB
SECTORS = LEG_SIZE // 512
REGION = 1024  # sectors: 512 KiB regions
REGIONS = SECTORS // REGION  # 64
LOGDEV_SIZE = 4 * MiB
WRITES = 40  # O_DIRECT 4 KiB writes per batch
ALL_CLEAN = [LOG_MAGIC, 2, REGIONS, REGIONS]  # (magic, version, nr_regions, clean regions)


class Env:
    """Per-boot context: the one ulogd of this boot, where logs and captures go.

    Starting ulogd costs 10-40 s under TCG (Python imports), so the scenarios of one boot
    share one daemon and run directory; the restart scenarios kill and restart that same
    daemon, the ``shutdown`` pseudo-scenario stops it at the end and checks its exit.
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.daemons: list[Daemon] = []
        ARTEFACTS.mkdir(parents=True, exist_ok=True)
        self._ulogd: Daemon | None = None

    def ulogd(self, sc: Scenario) -> Daemon:
        """The shared daemon, started (or restarted after a failed scenario) when needed."""
        if self._ulogd is None:
            self._ulogd = Daemon("/run/dm-ulogd", ARTEFACTS / "ulogd.log", ARTEFACTS)
            self.daemons.append(self._ulogd)
        d = self._ulogd
        if not d.alive():
            d.start()
            sc.mark(f"ulogd start #{d.starts} ready")
        sc.info["capture_at_start"] = d.captures[-1].name
        return d

    def save_artefacts(self) -> None:
        save_artefacts(self.run_dir)

    def cleanup(self) -> None:
        """Remove what a scenario left behind (the shared daemon keeps running)."""
        for d in self.daemons:
            if d.alive():
                with_timeout(functools.partial(d.signal, signal.SIGCONT))
        remove_all_dm()
        detach_all_loops()
        shutil.rmtree("/tmp/e2e", ignore_errors=True)


def with_timeout(fn: Callable[[], object]) -> None:
    try:
        fn()
    except Exception as exc:  # cleanup must go on
        kmsg(f"cleanup step failed: {exc}")


def new_uuid(tag: str) -> str:
    return f"e2e-{tag}-{uuidlib.uuid4().hex[:12]}"


def legs_pair(tag: str, first_fill: bytes | None = None) -> list[Loop]:
    return [Loop.create(f"{tag}-leg0", LEG_SIZE, first_fill), Loop.create(f"{tag}-leg1", LEG_SIZE)]


def write_and_verify(
    sc: Scenario, m: Mirror, tag: str, count: int, expected: dict[int, bytes], seed: int
) -> None:
    """``count`` O_DIRECT writes, then check they completed and read back correctly."""
    w = Writer(m.path, LEG_SIZE, tag, count=count, expected=expected, seed=seed)
    w.start()
    w.join(240)
    sc.check(
        f"{tag}: {count} O_DIRECT writes complete without I/O error",
        not w.is_alive() and w.done == count and not w.errors,
        f"done={w.done} errors={w.errors[:3]} alive={w.is_alive()}",
    )
    bad = verify_readback(m.path, expected)
    sc.check(f"{tag}: data reads back", not bad, f"{len(expected)} blocks, bad offsets {bad[:5]}")


def synced_and_identical(sc: Scenario, m: Mirror, legs: list[Loop], label: str) -> None:
    st = m.wait_synced(120)
    sc.check(f"{label}: mirror in sync", st.synced, st.raw)
    ok, detail = compare_legs(legs)
    sc.check(f"{label}: legs identical", ok, detail)


def no_kernel_errors(sc: Scenario, since: int) -> None:
    errs = kernel_errors(dmesg(), since)
    sc.check("no dm error messages in the kernel log", not errs, errs[:10])


def dmesg_lines() -> int:
    return len(dmesg().splitlines())


def dmesg_since(line: int) -> str:
    return "\n".join(dmesg().splitlines()[line:])


def note_uuid(sc: Scenario, role: str, uuid: str) -> str:
    sc.info.setdefault("uuids", {})[role] = uuid
    return uuid


def daemon_alive(sc: Scenario, d: Daemon) -> None:
    sc.check("ulogd still running", d.alive(), f"pid {d.pid}")


# ---------------------------------------------------------------------------------------------
# scenarios (capture-based protocol checks run on the host, see tests/e2e)


def sc_kernel_logs(sc: Scenario, env: Env) -> None:
    """Harness self-test with the kernel's own disk log: resync, writes, leg comparison, log."""
    since = dmesg_lines()
    log = Loop.create("disk-log", LOGDEV_SIZE)
    legs = legs_pair("disk", first_fill=b"\xa5")
    sc.equal("legs differ before the mirror exists", compare_legs(legs)[0], False)
    table = kernel_table(SECTORS, "disk", legs, region=REGION, log_dev=log.dev)
    m = Mirror("e2e-disk", table, SECTORS)
    m.create()
    st = m.wait_synced(120)
    sc.require("disk: initial resync completes", st.synced, st.raw)
    sc.mark("disk synced")
    sc.check("disk: legs identical after resync", *compare_legs(legs))
    sc.equal("disk: status log part", st.log, ["3", "disk", log.majmin, "A"])
    expected: dict[int, bytes] = {}
    write_and_verify(sc, m, "disk", WRITES, expected, seed=2)
    synced_and_identical(sc, m, legs, "disk after writes")
    m.remove()
    sc.equal("disk: on-disk log after remove", read_disk_log(log.dev, REGIONS), ALL_CLEAN)
    m.create()
    st = m.status()
    sc.check("disk: re-created mirror is in sync at once (log honoured)", st.synced, st.raw)
    m.remove()
    no_kernel_errors(sc, since)


def _clustered_core(sc: Scenario, env: Env, integrated: bool) -> None:
    since = dmesg_lines()
    tag = "cif" if integrated else "cc"
    d = env.ulogd(sc)
    legs = legs_pair(tag, first_fill=b"\x3c")
    uuid = note_uuid(sc, "mirror", new_uuid(tag))
    table = userspace_table(SECTORS, uuid, "clustered-core", legs, integrated_flush=integrated)
    m = Mirror(f"e2e-{tag}", table, SECTORS)
    m.create()
    sc.mark("created")
    st = m.wait_synced(180)
    sc.require("initial full resync completes (N/N)", st.synced, st.raw)
    sc.mark("synced")
    sc.equal("region count", st.regions, REGIONS)
    sc.equal("status: dirty log part (STATUS_INFO)", st.log, ["1", "clustered-core"])
    sc.equal("status: leg health", st.health, "AA")
    sc.check("legs identical after the initial resync", *compare_legs(legs))
    table_line = run(["dmsetup", "table", m.name]).strip()
    sc.check(
        "table shows integrated_flush" if integrated else "table is userspace",
        ("integrated_flush" in table_line) == integrated and "userspace" in table_line,
        table_line,
    )

    expected: dict[int, bytes] = {}
    write_and_verify(sc, m, f"{tag}-a", WRITES, expected, seed=11)
    sc.mark("writes done")
    synced_and_identical(sc, m, legs, "after writes")

    m.suspend()
    m.resume()
    st = m.status()
    sc.check("N/N right after suspend/resume (no resync)", st.synced, st.raw)

    m.reload()
    st = m.status()
    sc.check(
        "N/N right after reloading the same table (new luid, no full resync)", st.synced, st.raw
    )
    sc.mark("reloaded")
    write_and_verify(sc, m, f"{tag}-b", WRITES // 2, expected, seed=12)
    synced_and_identical(sc, m, legs, "after reload and writes")
    m.remove()
    sc.check("device removed", not Path(m.path).exists(), m.path)
    daemon_alive(sc, d)
    no_kernel_errors(sc, since)


def sc_clustered_core(sc: Scenario, env: Env) -> None:
    _clustered_core(sc, env, integrated=False)


def sc_integrated_flush(sc: Scenario, env: Env) -> None:
    _clustered_core(sc, env, integrated=True)


def sc_clustered_disk(sc: Scenario, env: Env) -> None:
    since = dmesg_lines()
    d = env.ulogd(sc)
    log = Loop.create("cd-log", LOGDEV_SIZE)
    legs = legs_pair("cd", first_fill=b"\x69")
    uuid = note_uuid(sc, "mirror", new_uuid("cd"))
    table = userspace_table(SECTORS, uuid, "clustered-disk", legs, log_dev=log.dev)
    m = Mirror("e2e-cd", table, SECTORS)
    m.create()
    st = m.wait_synced(180)
    sc.require("fresh log: full resync completes", st.synced, st.raw)
    sc.mark("synced")
    sc.equal("status: dirty log part", st.log, ["3", "clustered-disk", log.majmin, "A"])
    sc.check("legs identical after the resync", *compare_legs(legs))
    expected: dict[int, bytes] = {}
    write_and_verify(sc, m, "cd-a", WRITES, expected, seed=21)
    synced_and_identical(sc, m, legs, "after writes")
    m.remove()
    sc.equal(
        "on-disk log after remove: kernel format, all regions clean",
        read_disk_log(log.dev, REGIONS),
        ALL_CLEAN,
    )

    m.create()
    st = m.status()
    sc.check("re-created on the same log: in sync at once (log honoured)", st.synced, st.raw)
    write_and_verify(sc, m, "cd-b", WRITES // 2, expected, seed=22)
    synced_and_identical(sc, m, legs, "re-created, after writes")
    m.remove()
    sc.mark("recreate done")

    # ulogd -> kernel: the kernel's own disk log reads the log ulogd wrote
    km = Mirror("e2e-kdisk", kernel_table(SECTORS, "disk", legs, log_dev=log.dev), SECTORS)
    km.create()
    st = km.status()
    sc.check("kernel disk log honours ulogd's on-disk log (in sync at once)", st.synced, st.raw)
    write_and_verify(sc, km, "cd-k", WRITES // 2, expected, seed=23)
    synced_and_identical(sc, km, legs, "kernel disk log, after writes")
    km.remove()
    sc.equal(
        "on-disk log written by the kernel: all clean", read_disk_log(log.dev, REGIONS), ALL_CLEAN
    )
    # kernel -> ulogd
    m.create()
    st = m.status()
    sc.check("ulogd honours the kernel's on-disk log (in sync at once)", st.synced, st.raw)
    write_and_verify(sc, m, "cd-c", WRITES // 2, expected, seed=24)
    synced_and_identical(sc, m, legs, "back on ulogd, after writes")
    m.remove()
    sc.mark("compat done")

    # nosync on a fresh log: no copying at all; legs that differed keep differing
    log2 = Loop.create("cd-log2", LOGDEV_SIZE)
    legs2 = legs_pair("cdn", first_fill=b"\x77")
    uuid2 = note_uuid(sc, "nosync", new_uuid("cdn"))
    t2 = userspace_table(SECTORS, uuid2, "clustered-disk", legs2, log_dev=log2.dev, sync="nosync")
    m2 = Mirror("e2e-cdn", t2, SECTORS)
    m2.create()
    st = m2.status()
    sc.check("nosync: N/N at once", st.synced, st.raw)
    time.sleep(1)
    sc.equal("nosync: no resync copied the legs", compare_legs(legs2)[0], False)
    exp2: dict[int, bytes] = {}
    write_and_verify(sc, m2, "cdn", WRITES // 2, exp2, seed=25)
    m2.remove()
    # sync on a fresh log: everything copied
    log3 = Loop.create("cd-log3", LOGDEV_SIZE)
    uuid3 = note_uuid(sc, "sync", new_uuid("cds"))
    t3 = userspace_table(SECTORS, uuid3, "clustered-disk", legs2, log_dev=log3.dev, sync="sync")
    m3 = Mirror("e2e-cds", t3, SECTORS)
    m3.create()
    st = m3.wait_synced(180)
    sc.check("sync: full resync completes", st.synced, st.raw)
    sc.check("sync: legs identical after resync", *compare_legs(legs2))
    bad = verify_readback(m3.path, exp2)
    sc.check("sync: data written under nosync still reads back", not bad, bad[:5])
    m3.remove()
    daemon_alive(sc, d)
    no_kernel_errors(sc, since)


def _writer_until(w: Writer, n: int, timeout: float) -> bool:
    return wait_for(lambda: w.done >= n or bool(w.errors), timeout)


def _restart_mirror(sc: Scenario, env: Env, tag: str) -> tuple[Daemon, Mirror, list[Loop]]:
    d = env.ulogd(sc)
    legs = legs_pair(tag)
    uuid = note_uuid(sc, "mirror", new_uuid(tag))
    m = Mirror(f"e2e-{tag}", userspace_table(SECTORS, uuid, "clustered-core", legs), SECTORS)
    m.create()
    st = m.wait_synced(180)
    sc.require("initial resync completes", st.synced, st.raw)
    return d, m, legs


def sc_kill9_writer(sc: Scenario, env: Env) -> None:
    d, m, legs = _restart_mirror(sc, env, "k9")
    since = dmesg_lines()
    expected: dict[int, bytes] = {}
    w = Writer(m.path, LEG_SIZE, "k9", count=None, expected=expected, seed=31)
    w.start()
    sc.require("writer running", _writer_until(w, 20, 60), w.done)
    d.kill9()
    sc.mark("killed")
    at_kill = w.done
    # Restart only once the kernel is in its reconnect loop (a request in flight at the kill
    # first waits out the 15 s timeout): then the new daemon must see CTR (with NUL) + RESUME.
    lost = wait_for(lambda: "server not found" in dmesg_since(since), 40, 1.0)
    sc.check("kernel lost the server", lost, "expected 'Userspace log server not found'")
    sc.mark("kernel reconnecting")
    sc.info["writes_completed_while_dead"] = w.done - at_kill
    d.start()
    sc.info["capture_after_restart"] = d.captures[-1].name
    sc.mark("restarted")
    resumed = _writer_until(w, w.done + 20, 120)
    sc.mark("writes resumed")
    w.halt()
    w.join(120)
    sc.check(
        "blocked writes complete after the restart", resumed and not w.is_alive(), f"done={w.done}"
    )
    sc.equal("no application I/O error", w.errors, [])
    sc.info["max_write_latency_s"] = round(w.max_latency, 1)
    bad = verify_readback(m.path, expected)
    sc.check("data reads back", not bad, f"{len(expected)} blocks, bad {bad[:5]}")
    synced_and_identical(sc, m, legs, "after the restart")
    m.remove()
    daemon_alive(sc, d)


def sc_sigstop(sc: Scenario, env: Env) -> None:
    d, m, legs = _restart_mirror(sc, env, "st")
    since = dmesg_lines()
    expected: dict[int, bytes] = {}
    w = Writer(m.path, LEG_SIZE, "st", count=None, expected=expected, seed=41)
    w.start()
    sc.require("writer running", _writer_until(w, 20, 60), w.done)
    d.signal(signal.SIGSTOP)
    sc.mark("stopped")
    time.sleep(1)
    at_stop = w.done
    time.sleep(16)
    sc.info["writes_completed_while_stopped"] = w.done - at_stop
    sc.check("writes stall while ulogd is stopped", w.done - at_stop <= 1, w.done - at_stop)
    d.signal(signal.SIGCONT)
    sc.mark("continued")
    resumed = _writer_until(w, w.done + 20, 90)
    sc.mark("writes resumed")
    w.halt()
    w.join(60)
    sc.check("writes complete after SIGCONT", resumed and not w.is_alive(), w.done)
    sc.equal("no application I/O error", w.errors, [])
    sc.info["max_write_latency_s"] = round(w.max_latency, 1)
    text = "\n".join(dmesg().splitlines()[since:])
    sc.check(
        "kernel timed out and retried the request",
        "timed out" in text,
        [ln for ln in text.splitlines() if "userspace" in ln.lower()][:5],
    )
    bad = verify_readback(m.path, expected)
    sc.check("data reads back", not bad, f"{len(expected)} blocks, bad {bad[:5]}")
    synced_and_identical(sc, m, legs, "after SIGCONT")
    m.remove()
    daemon_alive(sc, d)


def sc_restart_idle(sc: Scenario, env: Env) -> None:
    d, m, legs = _restart_mirror(sc, env, "ri")
    expected: dict[int, bytes] = {}
    write_and_verify(sc, m, "ri-a", WRITES // 2, expected, seed=51)
    time.sleep(1)
    d.kill9()
    d.start()
    sc.info["capture_after_restart"] = d.captures[-1].name
    sc.mark("restarted")
    st = m.status()
    sc.check("state restored: N/N right after the restart", st.synced, st.raw)
    sc.equal("status: dirty log part", st.log, ["1", "clustered-core"])
    write_and_verify(sc, m, "ri-b", WRITES // 2, expected, seed=52)
    synced_and_identical(sc, m, legs, "after restart and writes")
    m.remove()
    daemon_alive(sc, d)


def sc_wiped_rundir(sc: Scenario, env: Env) -> None:
    d, m, legs = _restart_mirror(sc, env, "wr")
    expected: dict[int, bytes] = {}
    write_and_verify(sc, m, "wr-a", WRITES // 2, expected, seed=61)
    time.sleep(1)
    d.kill9()
    shutil.rmtree(d.run_dir)
    since = dmesg_lines()
    log_size = d.log_file.stat().st_size
    d.start()
    sc.info["capture_after_restart"] = d.captures[-1].name
    sc.mark("restarted without state")
    st = m.status()
    sc.info["status_after_reconnect"] = st.raw
    write_and_verify(sc, m, "wr-b", WRITES // 2, expected, seed=62)
    with open(d.log_file, "rb") as fh:
        fh.seek(log_size)
        log_text = fh.read().decode(errors="replace")
    esrch_lines = [ln for ln in log_text.splitlines() if "ESRCH" in ln]
    sc.check("ulogd logged the -ESRCH answer", bool(esrch_lines), esrch_lines[:3])
    text = "\n".join(dmesg().splitlines()[since:]).lower()
    sc.check(
        "kernel logged the reconnect",
        "server not found" in text or "attempting to contact" in text,
        "",
    )
    # a stateless restart loses the region state; a suspend/resume repairs the legs
    sc.info["legs_identical_before_suspend"] = compare_legs(legs)[0]
    m.suspend()
    m.resume()
    synced_and_identical(sc, m, legs, "after suspend/resume")
    bad = verify_readback(m.path, expected)
    sc.check("data reads back", not bad, f"{len(expected)} blocks, bad {bad[:5]}")
    m.remove()
    daemon_alive(sc, d)


def sc_log_failure(sc: Scenario, env: Env) -> None:
    d = env.ulogd(sc)
    back = Loop.create("lf-logback", LOGDEV_SIZE)
    logdm = Mirror("e2e-lflog", f"0 {LOGDEV_SIZE // 512} linear {back.dev} 0", LOGDEV_SIZE // 512)
    logdm.create()
    legs1 = legs_pair("lf1")
    uuid1 = note_uuid(sc, "failing", new_uuid("lf1"))
    t1 = userspace_table(
        SECTORS, uuid1, "clustered-disk", legs1, log_dev=logdm.majmin, handle_errors=False
    )
    m1 = Mirror("e2e-lf1", t1, SECTORS)
    legs2 = legs_pair("lf2")
    uuid2 = note_uuid(sc, "other", new_uuid("lf2"))
    m2 = Mirror("e2e-lf2", userspace_table(SECTORS, uuid2, "clustered-core", legs2), SECTORS)
    m1.create()
    m2.create()
    st1 = m1.wait_synced(180)
    st2 = m2.wait_synced(180)
    sc.require("both mirrors synced", st1.synced and st2.synced, f"{st1.raw} | {st2.raw}")
    sc.equal("disk log alive", st1.log, ["3", "clustered-disk", logdm.majmin, "A"])
    exp1: dict[int, bytes] = {}
    write_and_verify(sc, m1, "lf1-a", 10, exp1, seed=71)
    sc.mark("failing the log device")
    logdm.reload(f"0 {LOGDEV_SIZE // 512} error")
    write_and_verify(sc, m1, "lf1-b", 10, exp1, seed=72)
    ok = wait_for(lambda: m1.status().log[-1:] == ["D"], 20, 0.5)
    sc.check("status shows the log device failed (D)", ok, m1.status_line())
    daemon_alive(sc, d)
    exp2: dict[int, bytes] = {}
    write_and_verify(sc, m2, "lf2", WRITES, exp2, seed=73)
    synced_and_identical(sc, m2, legs2, "the other mirror")
    m1.remove()
    m2.remove()
    logdm.remove()
    daemon_alive(sc, d)


def sc_two_mirrors(sc: Scenario, env: Env) -> None:
    since = dmesg_lines()
    d = env.ulogd(sc)
    legs_c = legs_pair("tmc", first_fill=b"\x11")
    legs_d = legs_pair("tmd", first_fill=b"\x22")
    log = Loop.create("tm-log", LOGDEV_SIZE)
    uc = note_uuid(sc, "core", new_uuid("tmc"))
    ud = note_uuid(sc, "disk", new_uuid("tmd"))
    mc = Mirror("e2e-tmc", userspace_table(SECTORS, uc, "clustered-core", legs_c), SECTORS)
    md = Mirror(
        "e2e-tmd", userspace_table(SECTORS, ud, "clustered-disk", legs_d, log_dev=log.dev), SECTORS
    )
    mc.create()
    md.create()
    stc, std = mc.wait_synced(180), md.wait_synced(180)
    sc.require("both mirrors synced", stc.synced and std.synced, f"{stc.raw} | {std.raw}")
    sc.equal("core status", stc.log, ["1", "clustered-core"])
    sc.equal("disk status", std.log, ["3", "clustered-disk", log.majmin, "A"])
    exp_c: dict[int, bytes] = {}
    exp_d: dict[int, bytes] = {}
    wc = Writer(mc.path, LEG_SIZE, "tmc", count=WRITES, expected=exp_c, seed=81)
    wd = Writer(md.path, LEG_SIZE, "tmd", count=WRITES, expected=exp_d, seed=82)
    wc.start()
    wd.start()
    wc.join(240)
    wd.join(240)
    for w in (wc, wd):
        sc.check(
            f"{w.tag}: interleaved writes complete",
            not w.is_alive() and w.done == WRITES and not w.errors,
            f"{w.done} {w.errors[:3]}",
        )
    sc.check("core: data reads back", not verify_readback(mc.path, exp_c), "")
    sc.check("disk: data reads back", not verify_readback(md.path, exp_d), "")
    synced_and_identical(sc, mc, legs_c, "core")
    synced_and_identical(sc, md, legs_d, "disk")
    mc.remove()
    md.remove()
    sc.equal("disk log all clean after remove", read_disk_log(log.dev, REGIONS), ALL_CLEAN)
    daemon_alive(sc, d)
    no_kernel_errors(sc, since)


def sc_shutdown(sc: Scenario, env: Env) -> None:
    """Stop the boot's shared ulogd: SIGTERM must end it with status 0, without tracebacks."""
    d = env._ulogd
    sc.require("a ulogd was started in this boot", d is not None, "")
    assert d is not None
    sc.check("ulogd running before SIGTERM", d.alive(), d.proc.returncode if d.proc else None)
    sc.equal("ulogd exits 0 on SIGTERM", d.stop(), 0)
    sc.equal("no Python tracebacks in the ulogd log", d.log_text().count("Traceback"), 0)
    sc.info["ulogd_ready_seconds"] = [round(s, 1) for s in d.start_seconds]
    sc.info["captures"] = [c.name for c in d.captures]


SCENARIOS: dict[str, Callable[[Scenario, Env], None]] = {
    "kernel-logs": sc_kernel_logs,
    "clustered-core": sc_clustered_core,
    "integrated-flush": sc_integrated_flush,
    "clustered-disk": sc_clustered_disk,
    "kill9-writer": sc_kill9_writer,
    "sigstop": sc_sigstop,
    "restart-idle": sc_restart_idle,
    "wiped-rundir": sc_wiped_rundir,
    "log-failure": sc_log_failure,
    "two-mirrors": sc_two_mirrors,
    "shutdown": sc_shutdown,
}


def watchdog(budget: float, env: Env, report: Report) -> None:
    time.sleep(budget)
    kmsg(f"guest watchdog: budget of {budget:.0f} s exhausted, saving artefacts")
    current = report.scenarios[-1] if report.scenarios else None
    if current is not None and current.error is None:
        current.error = f"guest watchdog: scenario still running after the {budget:.0f} s budget"
    with_timeout(report.write)
    with_timeout(env.save_artefacts)
    os.sync()
    Path("/proc/sysrq-trigger").write_text("o\n")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", type=float, default=600)
    parser.add_argument("names", nargs="+", choices=sorted(SCENARIOS))
    args = parser.parse_args()
    return 1 if run_scenarios(args.names, SCENARIOS, args.budget) else 0


def run_scenarios(
    names: list[str], table: dict[str, Callable[[Scenario, Env], None]], budget: float
) -> list[str]:
    """Run the named scenarios in this boot under a watchdog; returns the failed ones."""
    run_dir = Path(os.environ.get("ULOGD_RUN", "."))
    env = Env(run_dir)
    report = Report(run_dir / "result.json")
    threading.Thread(target=watchdog, args=(budget, env, report), daemon=True).start()
    for name in names:
        with report.scenario(name) as sc:
            table[name](sc, env)
        env.cleanup()
        env.save_artefacts()
    failed = [s.name for s in report.scenarios if not s.ok]
    print(f"e2e: {len(report.scenarios) - len(failed)} passed, failed: {failed}", flush=True)
    return failed


if __name__ == "__main__":
    sys.exit(main())
