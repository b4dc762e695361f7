"""How long a huge log's creation and restore hold up another log's requests (issue 14, 9).

Run: ``.venv/bin/python bench/huge_log_stall.py [--quick] [--rounds R] [--log2 N]``.

Starts ``python -m ulogd run -f --transport unix:PATH --run-dir DIR`` (run directory on
``/dev/shm``, tmpfs, as ``/run`` is in production) with one small log (``other``).  A prober
thread keeps one IN_SYNC request of ``other`` in flight the whole time and records every
round trip.  Per round:

* **idle** (the baseline, same round): the prober alone for as long as the creation took;
* **create**: the CTR of a 2^N-region ``nosync`` log (default N = 32: a 1.5 GiB state file),
  its RESUME and first GET_RESYNC_WORK — the time the CTR took is printed beside the wait;
* **restore**: ``kill -9``, a new daemon; from the moment it answers ``other`` again until
  the huge log answers GET_SYNC_COUNT (counted off the event loop), and the restart time
  (spawn to first answer) next to a restart of the same daemon without the huge log.

The figure is the **longest wait** of one ``other`` request in each window (target: 50 ms),
next to the idle window's longest wait (the ratio says what the huge log costs beyond the
machine's own noise).  Prints a table and writes JSON to ``bench/results/``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

from ulogd.edges.transport.unixsock import UnixClient
from ulogd.protocol import wire
from ulogd.protocol.spec import RequestType as T

TARGET_MS = 50.0


class Daemon:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.sock = str(workdir / "ulogd.sock")
        self.run_dir = workdir / "run"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        """Spawn; returns the seconds until the ``other`` log answers."""
        env = dict(os.environ, PYTHONPATH=str(common.REPO))
        env.pop("NOTIFY_SOCKET", None)
        t0 = time.perf_counter()
        with open(self.workdir / "ulogd.log", "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ulogd", "run", "-f", "--transport", f"unix:{self.sock}",
                 "--run-dir", str(self.run_dir), "--log-level", "warning"],
                stdout=log, stderr=log, env=env, cwd=common.REPO,
            )  # fmt: skip
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError((self.workdir / "ulogd.log").read_text())
            with contextlib.suppress(OSError), UnixClient(self.sock, timeout=0.5) as c:
                reply = wire.decode_reply(c.request(_req("LVM-other", T.GET_SYNC_COUNT)))
                if reply.error in (0, -3):  # the log, or -ESRCH before it is made
                    return time.perf_counter() - t0
            time.sleep(0.01)
        raise RuntimeError("ulogd did not answer")

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.kill9()


_seq = iter(range(1, 1 << 62))


def _req(uuid: str, rtype: int, data: bytes = b"") -> bytes:
    return wire.encode_request(rtype, uuid=uuid, luid=1, seq=next(_seq), data=data)


def call(client: UnixClient, uuid: str, rtype: int, data: bytes = b"") -> wire.Reply:
    reply = wire.decode_reply(client.request(_req(uuid, rtype, data)))
    if reply.error:
        raise RuntimeError(f"{T(rtype).name} of {uuid}: error {reply.error}")
    return reply


class Prober(threading.Thread):
    """One IN_SYNC of ``other`` in flight at all times; (start, seconds) of each round trip."""

    def __init__(self, sock: str) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.samples: list[tuple[float, float]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        with UnixClient(self.sock, timeout=30) as c:
            probe = struct.pack("=Q", 5)
            while not self.halt.is_set():
                t0 = time.perf_counter()
                call(c, "LVM-other", T.IN_SYNC, probe)
                self.samples.append((t0, time.perf_counter() - t0))

    def longest(self, start: float, end: float) -> float:
        """The longest wait (ms) of a request in flight at any time in [start, end]."""
        waits = [s for t, s in self.samples if t <= end and t + s >= start]
        return 1000 * max(waits, default=0.0)

    def stop(self) -> None:
        self.halt.set()
        self.join(timeout=30)


def one_round(workdir: Path, log2: int) -> dict[str, float]:
    regions = 1 << log2
    d = Daemon(workdir)
    d.start()
    with UnixClient(d.sock, timeout=120) as c:
        call(c, "LVM-other", T.CTR, b"1024 core 8 nosync")
        call(c, "LVM-other", T.RESUME)
    # Baseline restart: the same daemon with only the small log.
    d.kill9()
    restart_small = d.start()
    prober = Prober(d.sock)
    prober.start()
    time.sleep(0.2)
    with UnixClient(d.sock, timeout=120) as c:
        t0 = time.perf_counter()
        call(c, "LVM-huge", T.CTR, f"{regions * 8} core 8 nosync".encode())
        t1 = time.perf_counter()
        call(c, "LVM-huge", T.RESUME)
        call(c, "LVM-huge", T.GET_RESYNC_WORK)
        t2 = time.perf_counter()
    create_s, up_s = t1 - t0, t2 - t0
    time.sleep(0.1)
    idle0 = time.perf_counter()
    time.sleep(max(up_s, 0.5))
    idle1 = time.perf_counter()
    prober.stop()
    create_wait = prober.longest(t0, t2)
    idle_wait = prober.longest(idle0, idle1)
    d.kill9()
    restart_huge = d.start()
    prober = Prober(d.sock)
    prober.start()
    with UnixClient(d.sock, timeout=120) as c:
        r0 = time.perf_counter()
        count = struct.unpack("=Q", call(c, "LVM-huge", T.GET_SYNC_COUNT).data)[0]
        r1 = time.perf_counter()
    assert count == regions, count
    time.sleep(0.1)
    prober.stop()
    restore_wait = prober.longest(r0 - restart_huge, r1)
    d.stop()
    shutil.rmtree(d.run_dir, ignore_errors=True)
    return {
        "create_s": create_s,
        "up_s": up_s,
        "create_longest_wait_ms": create_wait,
        "idle_longest_wait_ms": idle_wait,
        "restart_small_s": restart_small,
        "restart_huge_s": restart_huge,
        "census_s": r1 - r0,
        "restore_longest_wait_ms": restore_wait,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--log2", type=int, default=32, help="the huge log has 2^N regions")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny run (the smoke test)")
    parser.add_argument("--out", type=Path, help="JSON file (default bench/results/...)")
    args = parser.parse_args(argv)
    if args.quick:
        args.log2, args.rounds = 24, 1
    shm = "/dev/shm" if Path("/dev/shm").is_dir() else None
    need = 3 * (1 << args.log2) // 8 + (1 << 20)
    if common.mem_available() < 2 * need:
        print(f"needs {2 * need >> 20} MiB of free memory for a 2^{args.log2}-region log")
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="ulogd-bench-huge-", dir=shm))
    try:
        rounds = [one_round(workdir, args.log2) for _ in range(args.rounds)]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    med = {k: common.median([r[k] for r in rounds]) for k in rounds[0]}
    worst = max(max(r["create_longest_wait_ms"], r["restore_longest_wait_ms"]) for r in rounds)
    rows = [
        ["CTR of the huge log (s)", f"{med['create_s']:.2f}", "", ""],
        ["CTR + RESUME + GET_RESYNC_WORK (s)", f"{med['up_s']:.2f}", "", ""],
        ["longest wait of 'other', creation (ms)", f"{med['create_longest_wait_ms']:.1f}",
         f"{med['idle_longest_wait_ms']:.1f}",
         f"{med['create_longest_wait_ms'] / max(med['idle_longest_wait_ms'], 0.001):.1f}"],
        ["longest wait of 'other', restore (ms)", f"{med['restore_longest_wait_ms']:.1f}",
         f"{med['idle_longest_wait_ms']:.1f}",
         f"{med['restore_longest_wait_ms'] / max(med['idle_longest_wait_ms'], 0.001):.1f}"],
        ["restart until 'other' answers (s)", f"{med['restart_huge_s']:.2f}",
         f"{med['restart_small_s']:.2f}",
         f"{med['restart_huge_s'] / max(med['restart_small_s'], 0.001):.2f}"],
        ["huge log counted after restart (s)", f"{med['census_s']:.2f}", "", ""],
    ]  # fmt: skip
    print(f"2^{args.log2}-region nosync log, {args.rounds} round(s), medians; baseline = idle "
          "window / restart without the huge log, same round")  # fmt: skip
    print(common.table(["", "huge log", "baseline", "ratio"], rows))
    print(f"worst wait over all rounds: {worst:.1f} ms (target <= {TARGET_MS:.0f} ms): "
          f"{'met' if worst <= TARGET_MS else 'NOT met'}")  # fmt: skip
    path = common.write_results(
        "huge_log_stall",
        {"log2": args.log2, "rounds": rounds, "median": med, "worst_wait_ms": worst,
         "target_ms": TARGET_MS},
        args.out,
    )  # fmt: skip
    print(f"written: {common.shown(path)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
