"""Guest side of bench/fio_qemu.py: fio on a linear device and three kinds of mirror.

Runs as root in the QEMU guest (Debian's python3, standard library only; ``ulogd`` is
imported only by the daemon wrapper).  Usage::

    python3 fio_guest.py OUTDIR [--rounds 3] [--runtime 10] [--depths 1 16]

Builds, on loop devices over files in the guest's tmpfs (128 MiB legs, 256 regions of
512 KiB, ``nosync`` so no resync runs during the measurement):

* ``linear`` — one leg, no mirror;
* ``core`` — ``mirror core 2 1024 nosync``: the kernel's own in-memory dirty log;
* ``ulogd`` — ``mirror userspace 4 <uuid> clustered-core 1024 nosync``, served by ulogd;
* ``ulogd-if`` — the same with ``integrated_flush``;
* ``naive`` — the ``ulogd`` table served by ``naive_responder.py`` instead: a blocking
  stdlib loop that answers every request without keeping any state (the floor a Python
  server pays for the round trips alone).  Only one server can listen on the connector, so
  ulogd is stopped (its state kept) while the ``naive`` legs run, and the ``naive`` mirror
  exists only during them.

ulogd runs through ``ulogd_timed.py`` (the daemon with timers on its request path).  For each
round, each iodepth and each device (in an order that rotates every round) fio does 4 KiB
random direct writes (libaio) for ``runtime`` seconds; for the ulogd legs the daemon's request
counts and service times are read before and after.  A last leg runs ulogd at the highest
iodepth with cProfile on.  Writes ``OUTDIR/result.json`` and ``OUTDIR/profile.txt``.
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
        self.log = open(WORK / "ulogd.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "ulogd_timed.py"), str(self.stats), str(self.profile),
             "run", "-f", "--run-dir", str(run_dir), "--log-level", "info"],
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

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


class Naive:
    """naive_responder.py, with the ``naive`` mirror created on start and removed on stop."""

    def __init__(self, table: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "naive_responder.py")],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if b"ready" not in line:
            raise RuntimeError(f"naive responder did not start: {line!r}")
        sh("dmsetup", "create", "bench-naive", "--table", table)

    def stop(self) -> None:
        sh("dmsetup", "remove", "bench-naive")
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)


class Servers:
    """Whichever server the next leg needs: ulogd (all ulogd mirrors) or the naive one."""

    def __init__(self, naive_table: str) -> None:
        self.naive_table = naive_table
        self.daemon: Daemon | None = Daemon()
        self.naive: Naive | None = None
        self.restarts = 0

    def use(self, name: str) -> Daemon | None:
        if name == "naive" and self.naive is None:
            if self.daemon is not None:
                self.daemon.stop()
                self.daemon = None
            self.naive = Naive(self.naive_table)
        elif name != "naive" and self.naive is not None:
            self.naive.stop()
            self.naive = None
        if name.startswith("ulogd") and self.daemon is None:
            self.daemon = Daemon()
            self.restarts += 1
        return self.daemon

    def stop(self) -> None:
        if self.naive is not None:
            self.naive.stop()
        if self.daemon is not None:
            self.daemon.stop()


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


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runtime", type=int, default=10)
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 16])
    args = parser.parse_args()
    os.environ["DM_DISABLE_UDEV"] = "1"
    WORK.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    result: dict[str, Any] = {"legs": [], "rounds": args.rounds, "runtime": args.runtime}
    naive_table = (
        f"0 {SECTORS} mirror userspace 4 bench-fio-naive clustered-core {REGION} "
        f"nosync 2 {loop('n0')} 0 {loop('n1')} 0 1 handle_errors"
    )
    servers = Servers(naive_table)
    try:
        names = ["linear", "core", "ulogd", "ulogd-if"]
        tables = {
            "linear": f"0 {SECTORS} linear {loop('lin')} 0",
            "core": f"0 {SECTORS} mirror core 2 {REGION} nosync 2 {loop('c0')} 0 {loop('c1')} 0"
            " 1 handle_errors",
            "ulogd": f"0 {SECTORS} mirror userspace 4 bench-fio-ulogd clustered-core {REGION} "
            f"nosync 2 {loop('u0')} 0 {loop('u1')} 0 1 handle_errors",
            "ulogd-if": f"0 {SECTORS} mirror userspace 5 bench-fio-ulogd-if integrated_flush "
            f"clustered-core {REGION} nosync 2 {loop('i0')} 0 {loop('i1')} 0 1 handle_errors",
        }
        for name in names:
            sh("dmsetup", "create", f"bench-{name}", "--table", tables[name])
        result["tables"] = tables
        result["status"] = {n: sh("dmsetup", "status", f"bench-{n}").strip() for n in names}
        result["tables"]["naive"] = naive_table
        result["setup_s"] = time.monotonic() - t_start
        legs = [*names, "naive"]
        for rnd in range(args.rounds):
            for depth in args.depths:
                order = legs[rnd % len(legs) :] + legs[: rnd % len(legs)]
                for name in order:
                    daemon = servers.use(name)
                    before = daemon.snapshot() if name.startswith("ulogd") and daemon else None
                    leg: dict[str, Any] = {"round": rnd, "depth": depth, "device": name}
                    leg.update(fio(f"/dev/mapper/bench-{name}", depth, args.runtime))
                    if before is not None and daemon is not None:
                        d = delta(before, daemon.snapshot())
                        d["requests_per_write"] = d["requests"] / leg["ios"] if leg["ios"] else 0
                        leg["ulogd"] = d
                    result["legs"].append(leg)
                    print(json.dumps(leg), flush=True)
        # profile leg (not counted in the medians)
        daemon = servers.use("ulogd")
        assert daemon is not None
        daemon.toggle_profile()
        time.sleep(0.5)
        prof = fio("/dev/mapper/bench-ulogd", max(args.depths), args.runtime)
        daemon.toggle_profile()
        time.sleep(1.0)
        result["profile_leg"] = prof
        result["status_after"] = {n: sh("dmsetup", "status", f"bench-{n}").strip() for n in names}
        for name in names:
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
