"""Guest side of bench/fio_qemu.py: fio on a linear device and every kind of mirror log.

Runs as root in the QEMU guest (Debian's python3, standard library only; ``ulogd`` is
imported only by the daemon wrapper).  Usage::

    python3 fio_guest.py OUTDIR [--rounds 3] [--runtime 10] [--depths 1 16] [--c-responder BIN]

Builds, on loop devices over files in the guest's tmpfs (128 MiB legs, 256 regions of
512 KiB, ``nosync`` so no resync runs during the measurement; 1 MiB log devices):

* ``linear`` — one leg, no mirror;
* ``core`` / ``disk`` — the kernel's own in-memory and on-disk dirty logs;
* ``c`` / ``c-if`` — a ``clustered-core`` mirror (plain, and with ``integrated_flush``)
  served by the stateless C responder (``bench/c_responder.c``, built statically on the
  host; skipped when it was not built);
* ``py`` — the ``clustered-core`` table served by ``naive_responder.py``: the stateless
  blocking stdlib loop;
* (after every server start, a 3 s fio warm-up leg on its first device, not counted: under
  TCG a new process's code is translated again, and its first seconds are slow)
* ``ulogd`` / ``ulogd-if`` / ``ulogd-disk`` — ``clustered-core``, the same with
  ``integrated_flush``, and ``clustered-disk``, served by ulogd with adaptive polling, and
  each again as ``...-off`` with polling off (the same daemon and mirror: the wrapper
  switches the mode by signal).

Only one server can listen on the connector, so ulogd is stopped (its state kept) while a
responder's legs run, and each responder's mirrors exist only while it runs.  Every round
runs the groups (kernel logs, C, Python, ulogd) in a rotating order, and rotates the legs
inside each group; each leg runs fio at each iodepth for ``runtime`` seconds: 4 KiB random
direct writes (libaio).  Each leg records the serving process's CPU time (utime + stime from
``/proc/PID/stat``) and, for ulogd, its request counts and service times.  A last leg runs
ulogd (adaptive) at the highest iodepth with cProfile on.  Writes ``OUTDIR/result.json`` and
``OUTDIR/profile.txt``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
WORK = Path("/tmp/bench-fio")
LEG_MIB = 128
SECTORS = LEG_MIB * 2048
REGION = 1024  # sectors: 256 regions
TYPE_NAMES = {
    1: "CTR", 2: "DTR", 3: "PRESUSPEND", 4: "POSTSUSPEND", 5: "RESUME", 6: "GET_REGION_SIZE",
    7: "IS_CLEAN", 8: "IN_SYNC", 9: "FLUSH", 10: "MARK_REGION", 11: "CLEAR_REGION",
    12: "GET_RESYNC_WORK", 13: "SET_REGION_SYNC", 14: "GET_SYNC_COUNT", 15: "STATUS_INFO",
    16: "STATUS_TABLE", 17: "IS_REMOTE_RECOVERING",
}  # fmt: skip


def sh(*argv: str, timeout: float = 120) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {proc.returncode} {proc.stderr} {proc.stdout}")
    return proc.stdout


def loop(name: str) -> str:
    path = WORK / f"{name}.img"
    with open(path, "wb") as fh:
        fh.truncate(LEG_MIB << 20)
    return sh("losetup", "-f", "--show", str(path)).strip()


class Daemon:
    def __init__(self) -> None:
        self.stats = WORK / "stats.json"
        self.profile = WORK / "profile.txt"
        run_dir = WORK / "run"
        self.log = open(WORK / "ulogd.log", "ab")  # noqa: SIM115 (restarts append)
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "ulogd_timed.py"), str(self.stats), str(self.profile),
             "run", "-f", "--run-dir", str(run_dir), "--log-level", "info", "--poll", "adaptive"],
            stdout=self.log, stderr=self.log, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while not (run_dir / "ulogd.pid").exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("ulogd did not start: " + (WORK / "ulogd.log").read_text())
            time.sleep(0.1)

    def snapshot(self) -> dict[str, Any]:
        before = self.stats.stat().st_mtime_ns if self.stats.exists() else 0
        os.kill(self.proc.pid, signal.SIGUSR2)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.stats.exists() and self.stats.stat().st_mtime_ns != before:
                try:
                    data: dict[str, Any] = json.loads(self.stats.read_text())
                    return data
                except ValueError:
                    pass
            time.sleep(0.02)
        raise RuntimeError("no stats from ulogd")

    def toggle_profile(self) -> None:
        os.kill(self.proc.pid, signal.SIGRTMIN + 1)

    def set_poll(self, mode: str) -> None:
        if mode != getattr(self, "poll", None):
            os.kill(self.proc.pid, signal.SIGRTMIN + (2 if mode == "off" else 3))
            self.poll = mode
            time.sleep(0.2)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


class Responder:
    """A stateless responder (``argv``), with its mirrors created on start, removed on stop."""

    def __init__(self, argv: list[str], tables: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if b"ready" not in line:
            raise RuntimeError(f"responder {argv[0]} did not start: {line!r}")
        self.tables = tables
        for name, table in tables.items():
            sh("dmsetup", "create", f"bench-{name}", "--table", table)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        for name in self.tables:
            sh("dmsetup", "remove", f"bench-{name}")
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Servers:
    """Whichever server the next leg needs: ulogd (all ulogd mirrors) or a responder."""

    def __init__(self, responders: dict[str, tuple[list[str], dict[str, str]]]) -> None:
        self.responders = responders  # group -> (argv, its mirrors' tables)
        self.daemon: Daemon | None = Daemon()
        self.current: tuple[str, Responder] | None = None
        self.restarts = 0
        self.starts = 1  # server processes started (ulogd is, already)

    def use(self, group: str) -> Daemon | Responder | None:
        """Make the server of ``group`` (``c``, ``py``, ``ulogd`` or ``kernel``) run."""
        if self.current is not None and self.current[0] != group and group != "kernel":
            self.current[1].stop()
            self.current = None
        if group in self.responders:
            if self.current is None:
                if self.daemon is not None:
                    self.daemon.stop()
                    self.daemon = None
                argv, tables = self.responders[group]
                self.current = (group, Responder(argv, tables))
                self.starts += 1
            return self.current[1]
        if group == "ulogd" and self.daemon is None:
            self.daemon = Daemon()
            self.restarts += 1
            self.starts += 1
        return self.daemon if group == "ulogd" else None

    def stop(self) -> None:
        if self.current is not None:
            self.current[1].stop()
        if self.daemon is not None:
            self.daemon.stop()


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` so far (s)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def delta(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    types = set(a["requests"]) | set(b["requests"])
    req = {t: b["requests"].get(t, 0) - a["requests"].get(t, 0) for t in types}
    ns = {t: b["receive_ns"].get(t, 0) - a["receive_ns"].get(t, 0) for t in types}
    total = sum(req.values())
    loop_n = b["loop"]["datagrams"] - a["loop"]["datagrams"]
    loop_ns = b["loop"]["ns"] - a["loop"]["ns"]
    return {
        "requests": total,
        "by_type": {TYPE_NAMES.get(int(t), t): n for t, n in req.items() if n},
        "receive_us_mean": sum(ns.values()) / total / 1000 if total else None,
        "receive_us_by_type": {
            TYPE_NAMES.get(int(t), t): ns[t] / req[t] / 1000 for t in types if req[t]
        },
        "loop_us_per_datagram": loop_ns / loop_n / 1000 if loop_n else None,
        "wall_s": b["time"] - a["time"],
    }


def fio(device: str, depth: int, runtime: int) -> dict[str, Any]:
    out = sh(
        "fio", "--name=bench", f"--filename={device}", "--rw=randwrite", "--bs=4k",
        "--direct=1", "--ioengine=libaio", f"--iodepth={depth}", f"--runtime={runtime}",
        "--time_based", f"--size={LEG_MIB}M", "--output-format=json",
        timeout=runtime * 10 + 120,
    )  # fmt: skip
    job = json.loads(out[out.index("{") :])["jobs"][0]["write"]
    return {
        "iops": job["iops"],
        "ios": job["total_ios"],
        "clat_p50_us": job.get("clat_ns", {}).get("percentile", {}).get("50.000000", 0) / 1000,
    }


GROUPS = {
    "kernel": ["linear", "core", "disk"],
    "c": ["c", "c-if"],
    "py": ["py"],
    "ulogd": ["ulogd", "ulogd-off", "ulogd-if", "ulogd-if-off", "ulogd-disk", "ulogd-disk-off"],
}


def mirror(log: str, legs: tuple[str, str]) -> str:
    return f"0 {SECTORS} mirror {log} 2 {loop(legs[0])} 0 {loop(legs[1])} 0 1 handle_errors"


def small_loop(name: str) -> str:
    path = WORK / f"{name}.img"
    with open(path, "wb") as fh:
        fh.truncate(1 << 20)
    return sh("losetup", "-f", "--show", str(path)).strip()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runtime", type=int, default=10)
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--c-responder", type=Path, help="the static C responder binary")
    args = parser.parse_args()
    os.environ["DM_DISABLE_UDEV"] = "1"
    WORK.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    result: dict[str, Any] = {"legs": [], "rounds": args.rounds, "runtime": args.runtime}
    groups = {g: list(legs) for g, legs in GROUPS.items()}
    responders: dict[str, tuple[list[str], dict[str, str]]] = {
        "py": (
            [sys.executable, str(HERE / "naive_responder.py")],
            {"py": mirror(f"userspace 4 bench-fio-py clustered-core {REGION} nosync",
                          ("p0", "p1"))},
        ),
    }  # fmt: skip
    if args.c_responder is not None and args.c_responder.exists():
        responders["c"] = (
            [str(args.c_responder)],
            {
                "c": mirror(f"userspace 4 bench-fio-c clustered-core {REGION} nosync",
                            ("cc0", "cc1")),
                "c-if": mirror(f"userspace 5 bench-fio-c-if integrated_flush clustered-core "
                               f"{REGION} nosync", ("ci0", "ci1")),
            },
        )  # fmt: skip
    else:
        del groups["c"]
        result["c_responder"] = "not built on the host: its legs are skipped"
    servers = Servers(responders)
    ulogd_mirrors = {
        "ulogd": f"userspace 4 bench-fio-ulogd clustered-core {REGION} nosync",
        "ulogd-if": f"userspace 5 bench-fio-ulogd-if integrated_flush clustered-core {REGION} "
        "nosync",
        "ulogd-disk": f"userspace 5 bench-fio-ulogd-disk clustered-disk {small_loop('ud-log')} "
        f"{REGION} nosync",
    }
    try:
        tables = {
            "linear": f"0 {SECTORS} linear {loop('lin')} 0",
            "core": mirror(f"core 2 {REGION} nosync", ("k0", "k1")),
            "disk": mirror(f"disk 3 {small_loop('kd-log')} {REGION} nosync", ("d0", "d1")),
        }
        for name, log in ulogd_mirrors.items():
            tables[name] = mirror(log, (f"{name}-0", f"{name}-1"))
        persistent = list(tables)
        for name in persistent:
            sh("dmsetup", "create", f"bench-{name}", "--table", tables[name])
        result["status"] = {n: sh("dmsetup", "status", f"bench-{n}").strip() for n in persistent}
        for _, (_, extra) in responders.items():
            tables.update(extra)
        result["tables"] = tables
        result["setup_s"] = time.monotonic() - t_start
        order = list(groups)
        for rnd in range(args.rounds):
            for group in order[rnd % len(order) :] + order[: rnd % len(order)]:
                legs = groups[group]
                legs = legs[rnd % len(legs) :] + legs[: rnd % len(legs)]
                before_use = servers.starts
                server = servers.use(group)
                if servers.starts != before_use:
                    # A process just started: under TCG its code is translated again (a new
                    # address space), so its first seconds are slow; warm it up, uncounted.
                    warm = legs[0].removesuffix("-off")
                    result.setdefault("warmups", []).append(
                        {"round": rnd, "device": warm, **fio(f"/dev/mapper/bench-{warm}", 1, 3)}
                    )
                for name in legs:
                    device = name.removesuffix("-off")
                    if isinstance(server, Daemon):
                        server.set_poll("off" if name.endswith("-off") else "adaptive")
                    for depth in args.depths:
                        ulogd = isinstance(server, Daemon)
                        before = server.snapshot() if isinstance(server, Daemon) else None
                        cpu0 = cpu_seconds(server.pid) if server is not None else None
                        leg: dict[str, Any] = {"round": rnd, "depth": depth, "device": name}
                        leg.update(fio(f"/dev/mapper/bench-{device}", depth, args.runtime))
                        if cpu0 is not None and server is not None:
                            leg["server_cpu_s"] = cpu_seconds(server.pid) - cpu0
                        if before is not None and isinstance(server, Daemon) and ulogd:
                            d = delta(before, server.snapshot())
                            d["requests_per_write"] = (
                                d["requests"] / leg["ios"] if leg["ios"] else 0
                            )
                            leg["ulogd"] = d
                        result["legs"].append(leg)
                        print(json.dumps(leg), flush=True)
        # profile leg (not counted in the medians)
        daemon = servers.use("ulogd")
        assert isinstance(daemon, Daemon)
        daemon.set_poll("adaptive")
        daemon.toggle_profile()
        time.sleep(0.5)
        prof = fio("/dev/mapper/bench-ulogd", max(args.depths), args.runtime)
        daemon.toggle_profile()
        time.sleep(1.0)
        result["profile_leg"] = prof
        result["status_after"] = {
            n: sh("dmsetup", "status", f"bench-{n}").strip() for n in persistent
        }
        for name in persistent:
            sh("dmsetup", "remove", f"bench-{name}")
        result["ulogd_restarts"] = servers.restarts
    finally:
        servers.stop()
        sh("losetup", "-D")
        args.outdir.mkdir(parents=True, exist_ok=True)
        for f in ("profile.txt", "ulogd.log"):
            if (WORK / f).exists():
                (args.outdir / f).write_bytes((WORK / f).read_bytes())
        result["guest_seconds"] = time.monotonic() - t_start
        (args.outdir / "result.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
