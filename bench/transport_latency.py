"""Reply latency through a running daemon vs a bare echo server over the same socket type.

Run: ``.venv/bin/python bench/transport_latency.py [--quick] [--rounds R] [--requests N]``.

Starts two daemons, ``python -m ulogd run -f --transport unix:PATH --run-dir DIR --poll off``
and the same with ``--poll adaptive`` (the test transport: kernel-format datagrams over a
Unix datagram socket; state files on tmpfs as in production) and, beside them, a bare echo
server: a Python process that does nothing but a blocking ``recvfrom`` and ``sendto`` of the
datagram back on the same kind of socket.  One client
(:class:`ulogd.edges.transport.unixsock.UnixClient`) keeps one request in flight and times each
round trip with ``perf_counter_ns``.  The requests are the write mix the real kernel sends
for a 4 KiB write (IN_SYNC x2, MARK_REGION, FLUSH, CLEAR_REGION, FLUSH) on a nosync
``clustered-core`` log; the echo server gets the very same datagrams.

Rounds alternate the two daemons and the echo server; each round yields p50/p99 and the
server's CPU per request (the sum of ``/proc/PID/task/*/schedstat`` run times over the round,
divided by the round's requests: what polling costs); the figures are the medians over the
rounds and the ratios the median of the per-round ratios to the echo server (target of issue
17: p50 with adaptive polling <= 1.0x the blocking echo).  Prints a table and writes JSON to
``bench/results/``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import responders

from ulogd.edges.transport.unixsock import UnixClient
from ulogd.protocol import wire
from ulogd.protocol.spec import RequestType as T

UUID = "LVM-benchtransportlatency"
LUID = 7
REGIONS = 1 << 16
TARGET = 1.0  # p50 of the adaptive daemon / the blocking echo (issue 17)
MODES = ("off", "adaptive")

ECHO = """
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(sys.argv[1])
print("ready", flush=True)
while True:
    data, addr = s.recvfrom(65536)
    s.sendto(data, addr)
"""

_U64 = struct.Struct("=Q")


def write_mix(count: int, seed: int = 2) -> list[bytes]:
    rng = random.Random(seed)
    out: list[bytes] = []
    seq = 1000
    while len(out) < count:
        reg = _U64.pack(rng.randrange(REGIONS))
        for rtype, data in (
            (T.IN_SYNC, reg),
            (T.IN_SYNC, reg),
            (T.MARK_REGION, reg),
            (T.FLUSH, b""),
            (T.CLEAR_REGION, reg),
            (T.FLUSH, b""),
        ):
            seq += 1
            out.append(wire.encode_request(rtype, uuid=UUID, luid=LUID, seq=seq, data=data))
    return out[:count]


def cpu_ns(pid: int) -> int:
    """CPU time (ns) of every thread of ``pid`` so far (``schedstat``'s run time)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += int((task / "schedstat").read_text().split()[0])
    return total


@contextlib.contextmanager
def daemon(
    workdir: Path, profile: Path | None = None, poll: str = "adaptive"
) -> Iterator[tuple[str, int]]:
    path = str(workdir / f"ulogd-{poll}.sock")
    run_dir = workdir / f"run-{poll}"
    env = dict(os.environ, PYTHONPATH=str(common.REPO))
    logfile = workdir / f"ulogd-{poll}.log"
    log = open(logfile, "wb")  # noqa: SIM115 - closed below
    argv = [sys.executable]
    if profile is not None:
        argv += ["-m", "cProfile", "-o", str(profile)]
    argv += ["-m", "ulogd", "run", "-f", "--transport", f"unix:{path}"]
    argv += ["--run-dir", str(run_dir), "--log-level", "warning", "--poll", poll]
    proc = subprocess.Popen(
        argv,
        stdout=log,
        stderr=log,
        env=env,
        cwd=common.REPO,
    )
    try:
        deadline = time.monotonic() + 60
        while not (run_dir / "ulogd.pid").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ulogd did not start: {logfile.read_text()}")
            time.sleep(0.05)
        yield path, proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@contextlib.contextmanager
def echo_server(workdir: Path) -> Iterator[tuple[str, int]]:
    path = str(workdir / "echo.sock")
    proc = subprocess.Popen(
        [sys.executable, "-c", ECHO, path], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL
    )
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != b"ready":
            raise RuntimeError("echo server did not start")
        yield path, proc.pid
    finally:
        proc.kill()
        proc.wait()


def round_trips(client: UnixClient, datagrams: list[bytes], check: bool) -> list[int]:
    clock = time.perf_counter_ns
    request = client.request
    samples: list[int] = []
    append = samples.append
    for d in datagrams:
        t0 = clock()
        reply = request(d)
        append(clock() - t0)
        if check and wire.decode_reply(reply).error:
            raise AssertionError(f"error reply {wire.decode_reply(reply)}")
    return samples


def summary(samples: list[int], cpu: int) -> dict[str, float]:
    us = [s / 1000 for s in samples]
    return {
        "p50_us": common.percentile(us, 50),
        "p99_us": common.percentile(us, 99),
        "mean_us": sum(us) / len(us),
        "cpu_us_per_request": cpu / len(samples) / 1000,
    }


def one_round(client: UnixClient, pid: int, datagrams: list[bytes]) -> dict[str, float]:
    cpu0 = cpu_ns(pid)
    samples = round_trips(client, datagrams, check=False)
    return summary(samples, cpu_ns(pid) - cpu0)


def setup_log(client: UnixClient) -> None:
    ctr = f"{REGIONS * 1024} clustered-core 1024 nosync".encode()
    for rtype, data in ((T.CTR, ctr), (T.GET_REGION_SIZE, b""), (T.RESUME, b"")):
        reply = wire.decode_reply(
            client.request(wire.encode_request(rtype, uuid=UUID, luid=LUID, data=data))
        )
        assert reply.error == 0, reply


WHO = ("daemon-off", "daemon-adaptive", "echo", "c-responder")
FIGURES = ("p50_us", "p99_us", "mean_us", "cpu_us_per_request")


def measure(args: argparse.Namespace) -> dict[str, Any]:
    shm = "/dev/shm" if Path("/dev/shm").is_dir() else None
    workdir = Path(tempfile.mkdtemp(prefix="ulogd-bench-lat-", dir=shm))
    datagrams = write_mix(args.requests)
    try:
        with (
            daemon(workdir, args.profile, "off") as (off_path, off_pid),
            daemon(workdir, None, "adaptive") as (ad_path, ad_pid),
            echo_server(workdir) as (epath, epid),
            contextlib.ExitStack() as stack,
        ):
            clients = {
                "daemon-off": (UnixClient(off_path), off_pid),
                "daemon-adaptive": (UnixClient(ad_path), ad_pid),
                "echo": (UnixClient(epath), epid),
            }
            if responders.build_c_responder() is not None:
                cpath = str(workdir / "c.sock")
                cpid = stack.enter_context(responders.serve_unix("c", cpath))
                clients["c-responder"] = (UnixClient(cpath), cpid)
                setup_log(clients["c-responder"][0])
            else:
                print(f"C responder baseline skipped: {responders.WHY_NO_C[0]}")
            warm = datagrams[: min(600, len(datagrams))]
            for who, (client, _) in clients.items():
                if who.startswith("daemon"):
                    setup_log(client)
                # warm-up (and, for the daemons, a check that every reply is a success)
                round_trips(client, warm, check=who != "echo")

            def runner(who: str) -> Any:
                client, pid = clients[who]
                return lambda: one_round(client, pid, datagrams)

            rounds = common.alternate({who: runner(who) for who in clients}, args.rounds)
            for client, _ in clients.values():
                client.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    out: dict[str, Any] = {"rounds": rounds}
    for who in rounds:
        out[who] = {k: common.median([r[k] for r in rounds[who]]) for k in FIGURES}
    for who in ("daemon-off", "daemon-adaptive"):
        out[f"{who}_to_echo"] = {
            k: common.median(
                common.ratios([r[k] for r in rounds[who]], [r[k] for r in rounds["echo"]])
            )
            for k in FIGURES
        }
    out["adaptive_to_off"] = {
        k: common.median(
            common.ratios(
                [r[k] for r in rounds["daemon-adaptive"]], [r[k] for r in rounds["daemon-off"]]
            )
        )
        for k in FIGURES
    }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=6000, help="round trips per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="tiny run (the smoke test)")
    parser.add_argument("--out", type=Path, help="JSON file (default bench/results/...)")
    parser.add_argument(
        "--profile", type=Path, help="run the --poll off daemon under cProfile, stats to this file"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.rounds = 300, 1
    load_before = common.loadavg()
    r = measure(args)
    info = common.machine()
    print(
        f"reply latency over the unix test transport, one request in flight; {args.requests} "
        f"round trips x {args.rounds} alternating rounds; medians; load {load_before[0]:.2f} "
        f"-> {info['loadavg'][0]:.2f}"
    )
    names = {
        "daemon-off": "ulogd, --poll off (write mix)",
        "daemon-adaptive": "ulogd, --poll adaptive",
        "echo": "bare blocking echo server",
        "c-responder": "stateless C responder, blocking",
    }
    rows = []
    for who in (w for w in WHO if w in r):
        f = r[who]
        rows.append(
            (names[who], *(f"{f[k]:.1f}" for k in FIGURES[:3]), f"{f['cpu_us_per_request']:.1f}")
        )
    for who in ("daemon-off", "daemon-adaptive"):
        f = r[f"{who}_to_echo"]
        rows.append((f"ratio {who} / echo", *(f"{f[k]:.2f}" for k in FIGURES)))
    f = r["adaptive_to_off"]
    rows.append(("ratio adaptive / off", *(f"{f[k]:.2f}" for k in FIGURES)))
    print(common.table(("", "p50 us", "p99 us", "mean us", "CPU us/req"), rows))
    ratio = r["daemon-adaptive_to_echo"]["p50_us"]
    met = ratio <= TARGET
    print(f"target: adaptive p50 <= {TARGET}x echo: {ratio:.2f}, {'met' if met else 'NOT met'}")
    out = common.write_results(
        "transport_latency",
        {"requests": args.requests, "loadavg_before": load_before, "target": TARGET, **r},
        args.out,
    )
    print(f"written {common.shown(out)}")
    if args.profile is not None:
        import pstats

        print(
            "cProfile of the --poll off daemon (includes start-up and the other rounds' idle time):"
        )
        pstats.Stats(str(args.profile)).sort_stats("tottime").print_stats(20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
