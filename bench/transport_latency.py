"""Reply latency through a running daemon vs a bare echo server over the same socket type.

Run: ``.venv/bin/python bench/transport_latency.py [--quick] [--rounds R] [--requests N]``.

Starts ``python -m ulogd run -f --transport unix:PATH --run-dir DIR`` (the test transport:
kernel-format datagrams over a Unix datagram socket; state files on tmpfs as in production)
and, beside it, a bare echo server: a Python process that does nothing but ``recvfrom`` and
``sendto`` the datagram back on the same kind of socket.  One client
(:class:`ulogd.edges.transport.unixsock.UnixClient`) keeps one request in flight and times each
round trip with ``perf_counter_ns``.  The requests are the write mix the real kernel sends
for a 4 KiB write (IN_SYNC x2, MARK_REGION, FLUSH, CLEAR_REGION, FLUSH) on a nosync
``clustered-core`` log; the echo server gets the very same datagrams.

Rounds alternate daemon and echo; each round yields p50/p99; the figures are the medians over
the rounds and the ratio the median of the per-round ratios (target: daemon <= 2x echo at
p50).  Prints a table and writes JSON to ``bench/results/``.
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

from ulogd.edges.transport.unixsock import UnixClient
from ulogd.protocol import wire
from ulogd.protocol.spec import RequestType as T

UUID = "LVM-benchtransportlatency"
LUID = 7
REGIONS = 1 << 16
TARGET = 2.0

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


@contextlib.contextmanager
def daemon(workdir: Path, profile: Path | None = None) -> Iterator[str]:
    path = str(workdir / "ulogd.sock")
    run_dir = workdir / "run"
    env = dict(os.environ, PYTHONPATH=str(common.REPO))
    log = open(workdir / "ulogd.log", "wb")  # noqa: SIM115 - closed below
    argv = [sys.executable]
    if profile is not None:
        argv += ["-m", "cProfile", "-o", str(profile)]
    argv += ["-m", "ulogd", "run", "-f", "--transport", f"unix:{path}"]
    argv += ["--run-dir", str(run_dir), "--log-level", "warning"]
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
                raise RuntimeError(f"ulogd did not start: {(workdir / 'ulogd.log').read_text()}")
            time.sleep(0.05)
        yield path
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@contextlib.contextmanager
def echo_server(workdir: Path) -> Iterator[str]:
    path = str(workdir / "echo.sock")
    proc = subprocess.Popen(
        [sys.executable, "-c", ECHO, path], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL
    )
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != b"ready":
            raise RuntimeError("echo server did not start")
        yield path
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


def summary(samples: list[int]) -> dict[str, float]:
    us = [s / 1000 for s in samples]
    return {
        "p50_us": common.percentile(us, 50),
        "p99_us": common.percentile(us, 99),
        "mean_us": sum(us) / len(us),
    }


def measure(args: argparse.Namespace) -> dict[str, Any]:
    shm = "/dev/shm" if Path("/dev/shm").is_dir() else None
    workdir = Path(tempfile.mkdtemp(prefix="ulogd-bench-lat-", dir=shm))
    datagrams = write_mix(args.requests)
    try:
        with daemon(workdir, args.profile) as dpath, echo_server(workdir) as epath:
            dclient, eclient = UnixClient(dpath), UnixClient(epath)
            ctr = f"{REGIONS * 1024} clustered-core 1024 nosync".encode()
            for rtype, data in ((T.CTR, ctr), (T.GET_REGION_SIZE, b""), (T.RESUME, b"")):
                reply = wire.decode_reply(
                    dclient.request(wire.encode_request(rtype, uuid=UUID, luid=LUID, data=data))
                )
                assert reply.error == 0, reply
            # warm-up (and a check that every reply is a success)
            round_trips(dclient, datagrams[: min(600, len(datagrams))], check=True)
            round_trips(eclient, datagrams[: min(600, len(datagrams))], check=False)
            rounds = common.alternate(
                {
                    "daemon": lambda: summary(round_trips(dclient, datagrams, check=False)),
                    "echo": lambda: summary(round_trips(eclient, datagrams, check=False)),
                },
                args.rounds,
            )
            dclient.close()
            eclient.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    out: dict[str, Any] = {"rounds": rounds}
    for who in ("daemon", "echo"):
        out[who] = {k: common.median([r[k] for r in rounds[who]]) for k in rounds[who][0]}
    for k in ("p50_us", "p99_us", "mean_us"):
        out[f"ratio_{k}"] = common.median(
            common.ratios([r[k] for r in rounds["daemon"]], [r[k] for r in rounds["echo"]])
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=6000, help="round trips per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="tiny run (the smoke test)")
    parser.add_argument("--out", type=Path, help="JSON file (default bench/results/...)")
    parser.add_argument(
        "--profile", type=Path, help="run the daemon under cProfile, stats to this file"
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
    rows = [
        (
            "ulogd daemon (write mix)",
            f"{r['daemon']['p50_us']:.1f}",
            f"{r['daemon']['p99_us']:.1f}",
            f"{r['daemon']['mean_us']:.1f}",
        ),
        (
            "bare echo server",
            f"{r['echo']['p50_us']:.1f}",
            f"{r['echo']['p99_us']:.1f}",
            f"{r['echo']['mean_us']:.1f}",
        ),
        (
            "ratio daemon / echo",
            f"{r['ratio_p50_us']:.2f}",
            f"{r['ratio_p99_us']:.2f}",
            f"{r['ratio_mean_us']:.2f}",
        ),
    ]
    print(common.table(("", "p50 us", "p99 us", "mean us"), rows))
    met = r["ratio_p50_us"] <= TARGET
    print(f"target: p50 <= {TARGET}x echo: {'met' if met else 'NOT met'}")
    out = common.write_results(
        "transport_latency",
        {"requests": args.requests, "loadavg_before": load_before, "target": TARGET, **r},
        args.out,
    )
    print(f"written {common.shown(out)}")
    if args.profile is not None:
        import pstats

        print("cProfile of the daemon (includes start-up and the echo rounds' idle time):")
        pstats.Stats(str(args.profile)).sort_stats("tottime").print_stats(20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
