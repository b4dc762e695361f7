"""e2e under systemd, run inside the QEMU guest booted with systemd as PID 1 and udev running:
``python3 systemd_unit.py [--budget S] NAME...``.

ulogd is installed the way its package installs it — the Python package under
``dist-packages``, the console command at the unit's ``ExecStart=`` path, the shipped unit,
tmpfiles.d and modules-load.d files — and run by ``systemctl`` only:

``install``
    the files, ``systemd-tmpfiles --create``, ``systemd-modules-load`` loading
    dm-log-userspace, ``systemctl start``; then what the running unit is: its ordering
    (no default dependencies, before remote-fs-pre/shutdown, no corosync), its status line,
    its capabilities, and from inside its cgroup: ``dmsetup table`` works (the control node is
    allowed) while another character device is refused (the policy is in force).  The cluster
    drop-in pulls corosync in and makes no ordering cycle.
``mirror-restart``
    a mirror served by the unit: create, writes, ``systemctl restart`` under writes (no I/O
    error, legs identical), ``systemctl stop`` / ``start``, more writes, remove.
``shutdown``
    ``systemctl stop``: a clean exit; the journal of the unit is kept.
"""

from __future__ import annotations

import argparse
import configparser
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from dmlib import (
    ARTEFACTS,
    Mirror,
    Scenario,
    Writer,
    kmsg,
    run,
    userspace_table,
    verify_readback,
    wait_for,
)
from scenarios import (
    LEG_SIZE,
    SECTORS,
    Env,
    legs_pair,
    new_uuid,
    note_uuid,
    run_scenarios,
    synced_and_identical,
    write_and_verify,
)

SRC = Path(os.environ.get("ULOGD_SRC", "."))
PACKAGING = SRC / "packaging"
SITE = Path("/usr/lib/python3/dist-packages")
PYDEPS = "/opt/ulogd-pydeps"


class Unit:
    """The shipped unit file and what its package installs beside it."""

    def __init__(self) -> None:
        (self.file,) = sorted(PACKAGING.glob("*ulogd.service"))
        self.name = self.file.name
        parser = configparser.RawConfigParser(strict=False, delimiters=("=",))
        parser.optionxform = str  # type: ignore[assignment,method-assign]
        parser.read(self.file)
        self.service = parser["Service"]
        self.command = self.service["ExecStart"].split()[0]
        self.run_dir = Path("/run") / self.service["RuntimeDirectory"].split()[0]
        self.state_dir = Path("/var/lib") / self.service["StateDirectory"].split()[0]

    def show(self, *props: str) -> dict[str, str]:
        out = run(["systemctl", "show", self.name, *(f"--property={p}" for p in props)])
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def prop(self, name: str) -> str:
        return self.show(name).get(name, "")

    def main_pid(self) -> int:
        return int(self.prop("MainPID") or 0)


def systemctl(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    kmsg(f"systemctl {' '.join(args)}")
    return subprocess.run(
        ["systemctl", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def save_journal(unit: Unit) -> str:
    text = run(["journalctl", "-b", "-u", unit.name, "--no-pager", "-o", "short-monotonic"],
               check=False)  # fmt: skip
    (ARTEFACTS / "unit-journal.txt").write_text(text)
    (ARTEFACTS / "journal.txt").write_text(run(["journalctl", "-b", "--no-pager"], check=False))
    return text


def in_unit_cgroup(unit: Unit, command: str) -> subprocess.CompletedProcess[str]:
    """Run ``command`` (sh) as a process of the unit's cgroup, so its device policy applies."""
    cgroup = Path("/sys/fs/cgroup") / unit.prop("ControlGroup").lstrip("/")
    script = f'echo $$ > "{cgroup}/cgroup.procs" && {command}'
    return subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=60)


# ---------------------------------------------------------------------------------------------


def install_like_the_package(unit: Unit) -> None:
    for pkg in ("ulogd", "cpg"):
        shutil.rmtree(SITE / pkg, ignore_errors=True)
        shutil.copytree(SRC / pkg, SITE / pkg, ignore=shutil.ignore_patterns("testing"))
    command = Path(unit.command)
    command.write_text(
        "#!/bin/sh\n# what the package's console script does\n"
        f'export PYTHONPATH={PYDEPS}\nexec /usr/bin/python3 -m ulogd "$@"\n'
    )
    command.chmod(0o755)
    lib = Path("/usr/lib")
    shutil.copy(unit.file, lib / "systemd/system" / unit.name)
    for kind in ("tmpfiles.d", "modules-load.d"):
        for conf in (PACKAGING / kind).glob("*.conf"):
            (lib / kind).mkdir(exist_ok=True)
            shutil.copy(conf, lib / kind / conf.name)


def sc_install(sc: Scenario, env: Env) -> None:
    unit = Unit()
    sc.info["unit"] = unit.name
    sc.check("udev runs (its control socket exists)", Path("/run/udev/control").exists())
    sc.equal("dm-log-userspace not loaded before modules-load.d",
             Path("/sys/module/dm_log_userspace").exists(), False)  # fmt: skip
    install_like_the_package(unit)
    tmpfiles = [p.name for p in (PACKAGING / "tmpfiles.d").glob("*.conf")]
    run(["systemd-tmpfiles", "--create", *tmpfiles])
    for d in (unit.run_dir, unit.state_dir):
        mode = oct(d.stat().st_mode & 0o777) if d.exists() else None
        sc.equal(f"tmpfiles.d made {d}", mode, "0o700")
    r = systemctl("restart", "systemd-modules-load.service")
    sc.check("systemd-modules-load ran", r.returncode == 0, r.stderr)
    sc.check(
        "modules-load.d loaded dm-log-userspace", Path("/sys/module/dm_log_userspace").exists()
    )
    systemctl("daemon-reload")
    r = systemctl("enable", unit.name)
    sc.check("systemctl enable", r.returncode == 0, r.stderr)
    t0 = time.monotonic()
    r = systemctl("start", unit.name)
    sc.info["start_seconds"] = round(time.monotonic() - t0, 1)
    sc.mark("started")
    sc.require("systemctl start (Type=notify: returns at READY=1)", r.returncode == 0,
               f"{r.stderr} {save_journal(unit)[-2000:]}")  # fmt: skip
    sc.equal("active", unit.prop("ActiveState"), "active")
    sc.equal("status line", unit.prop("StatusText"), "serving 0 logs over netlink; cluster off")

    deps = unit.show("After", "Before", "Wants", "Requires", "Conflicts", "DefaultDependencies")
    sc.info["dependencies"] = deps
    after = deps["After"].split()
    sc.check("no default dependencies (not after basic.target/sysinit.target)",
             "basic.target" not in after and "sysinit.target" not in after, after)  # fmt: skip
    late = {"local-fs.target", "systemd-tmpfiles-setup.service"} & set(after)
    sc.check("not after local file systems (nor tmpfiles-setup, which is)", not late, after)
    sc.check("after systemd-modules-load.service", "systemd-modules-load.service" in after, after)
    before = deps["Before"].split()
    sc.check("before remote-fs-pre.target and shutdown.target",
             {"remote-fs-pre.target", "shutdown.target"} <= set(before), before)  # fmt: skip
    sc.check("conflicts with shutdown.target", "shutdown.target" in deps["Conflicts"].split(),
             deps["Conflicts"])  # fmt: skip
    sc.check("does not want corosync", "corosync" not in deps["Wants"] + deps["Requires"],
             deps["Wants"])  # fmt: skip
    sc.equal("corosync not started", systemctl("is-active", "corosync").stdout.strip(),
             "inactive")  # fmt: skip

    pid = unit.main_pid()
    status = Path(f"/proc/{pid}/status").read_text()
    eff = int(re.search(r"CapEff:\s*([0-9a-f]+)", status).group(1), 16)  # type: ignore[union-attr]
    sc.check("the daemon holds CAP_NET_ADMIN and CAP_SYS_ADMIN", eff >> 12 & 1 and eff >> 21 & 1,
             f"CapEff {eff:#x}")  # fmt: skip
    sc.check("but not CAP_SYS_MODULE", not eff >> 16 & 1, f"CapEff {eff:#x}")
    table = in_unit_cgroup(unit, "exec dmsetup table")
    sc.check("dmsetup table works inside the unit's cgroup (/dev/mapper/control allowed)",
             table.returncode == 0, f"{table.returncode}: {table.stderr}")  # fmt: skip
    other = in_unit_cgroup(unit, "exec head -c1 /dev/kmsg")
    sc.check("another character device is refused there (the device policy is in force)",
             other.returncode != 0 and "not permitted" in other.stderr,
             f"{other.returncode}: {other.stderr}")  # fmt: skip

    dropin = Path("/etc/systemd/system") / f"{unit.name}.d"
    dropin.mkdir(parents=True, exist_ok=True)
    shutil.copy(PACKAGING / "cluster.conf", dropin / "cluster.conf")
    systemctl("daemon-reload")
    deps = unit.show("Wants", "After")
    sc.check("the cluster drop-in wants corosync and orders after it",
             "corosync.service" in deps["Wants"].split()
             and "corosync.service" in deps["After"].split(), deps)  # fmt: skip
    verify = subprocess.run(["systemd-analyze", "verify", "--man=no", unit.name],
                            capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    sc.check("no ordering cycle with the drop-in (systemd-analyze verify)",
             "cycle" not in verify.stderr.lower(), verify.stderr[-1500:])  # fmt: skip
    shutil.rmtree(dropin)
    systemctl("daemon-reload")
    journal = run(["journalctl", "-b", "--no-pager", "_PID=1"], check=False).splitlines()
    cycles = [ln for ln in journal if "ordering cycle" in ln.lower()]
    sc.check("no ordering cycle in this boot's journal (systemd's own messages)", not cycles,
             cycles[:5])  # fmt: skip


def _restart(sc: Scenario, unit: Unit, verb: str) -> float:
    t0 = time.monotonic()
    r = systemctl(verb, unit.name)
    took = round(time.monotonic() - t0, 1)
    sc.check(f"systemctl {verb}", r.returncode == 0, r.stderr)
    sc.mark(f"{verb} done")
    return took


def sc_mirror_restart(sc: Scenario, env: Env) -> None:
    unit = Unit()
    sc.require("the unit is active", unit.prop("ActiveState") == "active")
    legs = legs_pair("sd")
    uuid = note_uuid(sc, "mirror", new_uuid("sd"))
    m = Mirror("e2e-sd", userspace_table(SECTORS, uuid, "clustered-core", legs), SECTORS)
    m.create()
    st = m.wait_synced(180)
    sc.require("initial resync completes", st.synced, st.raw)
    sc.equal("status line counts the log", unit.prop("StatusText"),
             "serving 1 log over netlink; cluster off")  # fmt: skip
    expected: dict[int, bytes] = {}
    w = Writer(m.path, LEG_SIZE, "sd", count=None, expected=expected, seed=41)
    w.start()
    sc.require("writer running", wait_for(lambda: w.done >= 20 or bool(w.errors), 90), w.done)
    old_pid = unit.main_pid()
    sc.info["restart_seconds"] = _restart(sc, unit, "restart")
    sc.check("a new daemon after restart", unit.main_pid() not in (0, old_pid), unit.main_pid())
    at = w.done
    resumed = wait_for(lambda: w.done >= at + 20 or bool(w.errors), 180)
    sc.mark("writes resumed")
    w.halt()
    w.join(120)
    sc.check("writes go on after the restart", resumed and not w.is_alive(), f"done={w.done}")
    sc.equal("no application I/O error across systemctl restart", w.errors, [])
    sc.info["max_write_latency_s"] = round(w.max_latency, 1)
    bad = verify_readback(m.path, expected)
    sc.check("data reads back", not bad, f"{len(expected)} blocks, bad {bad[:5]}")
    synced_and_identical(sc, m, legs, "after systemctl restart")

    sc.info["stop_seconds"] = _restart(sc, unit, "stop")
    sc.equal("inactive after stop", unit.prop("ActiveState"), "inactive")
    kept = (
        sorted(p.name for p in (unit.run_dir / "logs").glob("*")) if unit.run_dir.exists() else []
    )
    sc.check("the live state stays in the run directory across a stop", kept, kept)
    sc.info["start_again_seconds"] = _restart(sc, unit, "start")
    sc.equal("active after start", unit.prop("ActiveState"), "active")
    write_and_verify(sc, m, "sd-after-start", 30, expected, seed=42)
    synced_and_identical(sc, m, legs, "after systemctl stop/start")
    m.remove()
    sc.check("status line after the mirror is gone",
             wait_for(lambda: unit.prop("StatusText").startswith("serving 0 logs"), 30),
             unit.prop("StatusText"))  # fmt: skip
    sc.equal("no restart by systemd (Restart=on-failure never fired)", unit.prop("NRestarts"), "0")


def sc_shutdown(sc: Scenario, env: Env) -> None:
    unit = Unit()
    r = systemctl("stop", unit.name)
    sc.check("systemctl stop", r.returncode == 0, r.stderr)
    props = unit.show("ActiveState", "Result", "ExecMainStatus")
    sc.equal("stopped cleanly", props, {"ActiveState": "inactive", "Result": "success",
                                        "ExecMainStatus": "0"})  # fmt: skip
    journal = save_journal(unit)
    sc.check("the daemon said ready three times (start, restart, start)",
             len(re.findall(r"ready: \d+ log", journal)) >= 3, journal[-1500:])  # fmt: skip
    problems = [ln for ln in journal.splitlines() if "Traceback" in ln or "ERROR" in ln]
    sc.check("no error or traceback in the unit's journal", not problems, problems[:5])


SCENARIOS = {"install": sc_install, "mirror-restart": sc_mirror_restart, "shutdown": sc_shutdown}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", type=float, default=900)
    parser.add_argument("names", nargs="+", choices=sorted(SCENARIOS))
    args = parser.parse_args()
    try:
        return 1 if run_scenarios(args.names, SCENARIOS, args.budget) else 0
    finally:
        save_journal(Unit())
        Env(Path(os.environ.get("ULOGD_RUN", "."))).save_artefacts()


if __name__ == "__main__":
    sys.exit(main())
