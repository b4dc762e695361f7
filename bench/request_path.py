"""In-process request path: decode -> apply -> encode, in requests per second on one core.

Run: ``.venv/bin/python bench/request_path.py [--quick] [--rounds R] [--requests N]
[--profile MIX]``.

The request mixes are the ones the real kernel sends (``shared`` reference, kernel-in-qemu):

* ``resync`` — per region: GET_RESYNC_WORK, IN_SYNC, GET_SYNC_COUNT, SET_REGION_SYNC,
  CLEAR_REGION, FLUSH (a fresh log, every region out of sync, recovered in order);
* ``write`` — per 4 KiB direct write to a random in-sync region: IN_SYNC x2, MARK_REGION,
  FLUSH, CLEAR_REGION, FLUSH;
* ``write-integrated`` — the same with ``integrated_flush``: IN_SYNC x2, FLUSH[region],
  CLEAR_REGION.

The datagrams are built up front (kernel format, protocol 3) for a ``clustered-core`` log of
2^20 regions; each measurement creates a fresh log (CTR, GET_REGION_SIZE, RESUME; untimed),
feeds every datagram to :meth:`ulogd.engine.server.Server.receive` and takes the reply bytes out of
the returned action (timed), then destroys the log (DTR; untimed).  Two server set-ups:

* ``ulogd (state on /dev/shm)`` — as the daemon runs: the bitmaps live in a memory-mapped
  state file (tmpfs) and the scalars are saved into it before each reply that depends on them;
* ``ulogd (memory state)`` — the bitmaps in ordinary memory (replay's set-up).

Baselines over the same datagrams, measured alternately with the above in every round:

* ``bare decode`` — ``wire.decode`` alone, nothing applied, nothing encoded;
* ``minimal loop`` — one ``struct`` unpack of the header, the region read from the payload,
  one bitarray bit read and written, the reply header packed: the floor for any Python
  implementation of this protocol.

Each figure is the median over the rounds; each ratio the median of the per-round ratios.
Prints a table and writes JSON to ``bench/results/``.  ``--profile MIX`` runs cProfile over
one pass of that mix (state on /dev/shm) and prints the top functions instead.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import pstats
import random
import shutil
import struct
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

from ulogd.engine.actions import Send
from ulogd.engine.server import Server
from ulogd.protocol import wire
from ulogd.protocol.spec import RequestType as T
from ulogd.state.statefile import StateDir

UUID = "LVM-benchrequestpath0000000000000000000000000000000000000000000000000000000"
LUID = 0x42
REGION_SIZE = 1024  # sectors
REGIONS = 1 << 20
TARGET_ISSUE2 = 300_000
TARGET_ISSUE8 = 200_000

_U64 = struct.Struct("=Q")
_REGION_SYNC = struct.Struct("=Qq")
_seq = iter(range(1, 1 << 31))


def dg(rtype: int, data: bytes = b"") -> bytes:
    return wire.encode_request(rtype, uuid=UUID, luid=LUID, seq=next(_seq), data=data)


def resync_mix(n: int) -> list[bytes]:
    """Whole regions' worth of the resync sequence, at least ``n`` requests."""
    out: list[bytes] = []
    for r in range(-(-n // 6)):
        reg = _U64.pack(r)
        out += [
            dg(T.GET_RESYNC_WORK),
            dg(T.IN_SYNC, reg),
            dg(T.GET_SYNC_COUNT),
            dg(T.SET_REGION_SYNC, _REGION_SYNC.pack(r, 1)),
            dg(T.CLEAR_REGION, reg),
            dg(T.FLUSH),
        ]
    return out


def write_mix(n: int, integrated: bool, seed: int = 8) -> list[bytes]:
    rng = random.Random(seed)
    per = 4 if integrated else 6
    out: list[bytes] = []
    for _ in range(-(-n // per)):
        reg = _U64.pack(rng.randrange(REGIONS))
        if integrated:
            out += [
                dg(T.IN_SYNC, reg),
                dg(T.IN_SYNC, reg),
                dg(T.FLUSH, reg),
                dg(T.CLEAR_REGION, reg),
            ]
        else:
            out += [
                dg(T.IN_SYNC, reg),
                dg(T.IN_SYNC, reg),
                dg(T.MARK_REGION, reg),
                dg(T.FLUSH),
                dg(T.CLEAR_REGION, reg),
                dg(T.FLUSH),
            ]
    return out


MIXES: dict[str, tuple[str, Callable[[int], list[bytes]]]] = {
    # name: (sync mode of the log, datagram builder)
    "resync": ("", resync_mix),
    "write": ("nosync", lambda n: write_mix(n, integrated=False)),
    "write-integrated": ("nosync", lambda n: write_mix(n, integrated=True)),
}


class Fixture:
    """A server and the life cycle of the one log the mix talks to."""

    def __init__(self, state_root: Path | None) -> None:
        self.state_root = state_root
        self.server = Server(state_dir=StateDir(state_root) if state_root else None)

    def open(self, sync_word: str) -> None:
        text = f"{REGIONS * REGION_SIZE} clustered-core {REGION_SIZE}"
        if sync_word:
            text += f" {sync_word}"
        for d in (dg(T.CTR, text.encode()), dg(T.GET_REGION_SIZE), dg(T.RESUME)):
            (action,) = self.server.receive(d)
            assert isinstance(action, Send) and not wire.decode_reply(action.data).error

    def close(self) -> None:
        (action,) = self.server.receive(dg(T.DTR))
        assert isinstance(action, Send) and not wire.decode_reply(action.data).error


def run_ulogd(fixture: Fixture, sync_word: str, datagrams: list[bytes]) -> dict[str, float]:
    """Requests per second through ``Server.receive`` (the reply bytes taken out)."""
    fixture.open(sync_word)
    receive = fixture.server.receive
    gc.collect()
    with common.Timer() as t:
        for d in datagrams:
            receive(d)[0].data  # noqa: B018 - the reply, as the daemon takes it
    fixture.close()
    return common.rates(len(datagrams), t)


def run_decode(datagrams: list[bytes]) -> dict[str, float]:
    decode = wire.decode
    gc.collect()
    with common.Timer() as t:
        for d in datagrams:
            decode(d)
    return common.rates(len(datagrams), t)


_HEADER = struct.Struct("=IHHII" + "IIIIHH" + "Q129s3sIiIII")
_ERROR_AT = 36 + 144
_U32 = struct.Struct("=I")
_I32 = struct.Struct("=i")


def run_minimal(datagrams: list[bytes]) -> dict[str, float]:
    """unpack -> bitarray -> pack, nothing else: the floor for a Python responder."""
    from bitarray import bitarray

    bits = bitarray(REGIONS, endian="little")
    bits.setall(0)
    unpack = _HEADER.unpack_from
    u64 = _U64.unpack_from
    s64 = struct.Struct("=q").pack
    u32_into = _U32.pack_into
    i32_into = _I32.pack_into
    header_size = _HEADER.size
    gc.collect()
    with common.Timer() as t:
        for d in datagrams:
            v = unpack(d)
            r = u64(d, header_size)[0] if v[-1] else 0
            old = bits[r]
            bits[r] = 1
            out = bytearray(d[:header_size])
            u32_into(out, 0, header_size + 8)
            i32_into(out, _ERROR_AT, 0)
            out += s64(old)
            bytes(out)
    return common.rates(len(datagrams), t)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
    state_root = Path(tempfile.mkdtemp(prefix="ulogd-bench-", dir=shm))
    try:
        mem = Fixture(None)
        disk = Fixture(state_root / "logs")
        results: dict[str, Any] = {}
        for mix in args.mixes:
            sync_word, build = MIXES[mix]
            datagrams = build(args.requests)
            check(disk, sync_word, datagrams, mix)
            variants: dict[str, Callable[[], dict[str, float]]] = {
                "ulogd_shm": lambda: run_ulogd(disk, sync_word, datagrams),  # noqa: B023
                "ulogd_memory": lambda: run_ulogd(mem, sync_word, datagrams),  # noqa: B023
                "bare_decode": lambda: run_decode(datagrams),  # noqa: B023
                "minimal_loop": lambda: run_minimal(datagrams),  # noqa: B023
            }
            raw = common.alternate(variants, args.rounds)
            entry: dict[str, Any] = {"requests": len(datagrams), "rounds": args.rounds}
            for clock in ("per_cpu_s", "per_wall_s"):
                series = {k: [x[clock] for x in v] for k, v in raw.items()}

                def ratio(a: str, b: str, series: dict[str, list[float]] = series) -> float:
                    return common.median(common.ratios(series[a], series[b]))

                entry[clock] = {
                    "req_per_s": {k: common.median(v) for k, v in series.items()},
                    "rounds": series,
                    "shm_to_bare_decode": ratio("ulogd_shm", "bare_decode"),
                    "shm_to_minimal_loop": ratio("ulogd_shm", "minimal_loop"),
                    "memory_to_bare_decode": ratio("ulogd_memory", "bare_decode"),
                    "shm_to_memory": ratio("ulogd_shm", "ulogd_memory"),
                }
            results[mix] = entry
        mem.server.close()
        disk.server.close()
    finally:
        shutil.rmtree(state_root, ignore_errors=True)
    return results


def check(fixture: Fixture, sync_word: str, datagrams: list[bytes], mix: str) -> None:
    """One untimed pass that verifies every reply (errors, the resync work handed out)."""
    fixture.open(sync_word)
    expected_region = 0
    for d in datagrams:
        (action,) = fixture.server.receive(d)
        assert isinstance(action, Send)
        reply = wire.decode_reply(action.data)
        assert reply.error == 0, (mix, reply)
        request = wire.decode(d)
        assert isinstance(request, wire.Request)
        if request.request_type == T.GET_RESYNC_WORK:
            assert struct.unpack("=qQ", reply.data) == (1, expected_region), reply
            expected_region += 1
        elif request.request_type == T.IN_SYNC and mix != "resync":
            assert struct.unpack("=q", reply.data)[0] == 1, (mix, reply)
    fixture.close()


def profile(mix: str, requests: int) -> None:
    sync_word, build = MIXES[mix]
    datagrams = build(requests)
    root = Path(tempfile.mkdtemp(prefix="ulogd-bench-", dir="/dev/shm"))
    try:
        fixture = Fixture(root / "logs")
        fixture.open(sync_word)
        receive = fixture.server.receive
        prof = cProfile.Profile()
        prof.enable()
        for d in datagrams:
            receive(d)[0].data  # noqa: B018
        prof.disable()
        fixture.close()
        fixture.server.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    text = io.StringIO()
    stats = pstats.Stats(prof, stream=text)
    stats.sort_stats("tottime").print_stats(25)
    print(f"cProfile of {len(datagrams)} requests of the {mix} mix (state on /dev/shm):")
    print(text.getvalue())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=120_000, help="requests per measurement")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--mixes", nargs="+", default=list(MIXES), choices=list(MIXES))
    parser.add_argument("--quick", action="store_true", help="tiny run (the smoke test)")
    parser.add_argument("--profile", choices=list(MIXES), help="cProfile one mix and stop")
    parser.add_argument("--out", type=Path, help="JSON file (default bench/results/...)")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.rounds = 1200, 1
    cpu = common.pin_to_one_cpu()
    if args.profile:
        profile(args.profile, args.requests)
        return 0
    load_before = common.loadavg()
    results = measure(args)
    info = common.machine()
    print(
        f"request path, in process, one core (cpu {cpu}); {args.requests} requests x "
        f"{args.rounds} alternating rounds; medians; load {load_before[0]:.2f} -> "
        f"{info['loadavg'][0]:.2f}; {info['cpu']}"
    )
    head = ("mix", "ulogd shm", "ulogd mem", "bare decode", "minimal loop",
            "shm/decode", "shm/minimal")  # fmt: skip
    for clock, label in (
        ("per_cpu_s", "req per CPU second"),
        ("per_wall_s", "req per wall second"),
    ):
        rows = []
        for mix, r in results.items():
            c = r[clock]
            rates = c["req_per_s"]
            rows.append(
                (
                    mix,
                    f"{rates['ulogd_shm']:,.0f}",
                    f"{rates['ulogd_memory']:,.0f}",
                    f"{rates['bare_decode']:,.0f}",
                    f"{rates['minimal_loop']:,.0f}",
                    f"{c['shm_to_bare_decode']:.3f}",
                    f"{c['shm_to_minimal_loop']:.3f}",
                )
            )
        print(f"-- {label}")
        print(common.table(head, rows))
    worst = min(r["per_cpu_s"]["req_per_s"]["ulogd_shm"] for r in results.values())
    print(
        f"slowest mix (state on /dev/shm): {worst:,.0f} req per CPU second; target >= "
        f"{TARGET_ISSUE2:,} (issue 2): {'met' if worst >= TARGET_ISSUE2 else 'NOT met'}; "
        f">= {TARGET_ISSUE8:,} (issue 8): {'met' if worst >= TARGET_ISSUE8 else 'NOT met'}"
    )
    out = common.write_results(
        "request_path",
        {
            "requests": args.requests,
            "rounds": args.rounds,
            "cpu_pinned": cpu,
            "loadavg_before": load_before,
            "regions": REGIONS,
            "targets": {"issue2": TARGET_ISSUE2, "issue8": TARGET_ISSUE8},
            "slowest_shm_req_per_cpu_s": worst,
            "mixes": results,
        },
        args.out,
    )
    print(f"written {common.shown(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
