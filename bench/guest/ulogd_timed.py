"""Run ``ulogd`` in the QEMU guest with a timer on its request path (bench/fio_qemu.py).

Usage: ``python3 ulogd_timed.py STATS_FILE PROFILE_FILE ulogd-args...``.  Starts the daemon
exactly as ``python3 -m ulogd ...`` would, with three additions for the benchmark:

* every :meth:`Server.receive` call (decode -> apply -> encode) and every
  ``Daemon._on_transport`` call (receive from the socket ... reply sent) is timed with
  ``perf_counter_ns``; counts and total nanoseconds per request type are kept;
* ``SIGUSR2`` writes those counters as JSON to STATS_FILE (the caller takes deltas);
* ``SIGRTMIN+1`` toggles cProfile over the daemon's thread; turning it off writes the top
  functions to PROFILE_FILE;
* ``SIGRTMIN+2`` / ``SIGRTMIN+3`` switch the running daemon's polling to ``off`` /
  ``adaptive`` (a fresh policy each time), so both are measured on the same daemon and
  mirrors without a restart; start it with ``--poll adaptive`` (the loop only asks the
  policy when it started enabled).

If the netlink transport's socket is left unbound by the installed pyroute2 (seen with 0.9.7,
see captures/scenarios.sh), it is bound here; a no-op otherwise.
"""

from __future__ import annotations

import cProfile
import io
import json
import pstats
import signal
import sys
import time
from collections import defaultdict
from typing import Any

import ulogd.edges.transport.netlink as netlink
from ulogd.edges import daemon
from ulogd.engine import server
from ulogd.ops.cli import main

STATS, PROFILE = sys.argv[1], sys.argv[2]
clock = time.perf_counter_ns
counts: dict[int, int] = defaultdict(int)
nanos: dict[int, int] = defaultdict(int)
loop = {"calls": 0, "ns": 0, "datagrams": 0}

_receive = server.Server.receive


def timed_receive(self: server.Server, datagram: Any, sender_port: int = 0) -> Any:
    t0 = clock()
    actions = _receive(self, datagram, sender_port)
    dt = clock() - t0
    rtype = datagram[36 + 152] if len(datagram) >= 36 + 156 else -1
    counts[rtype] += 1
    nanos[rtype] += dt
    return actions


server.Server.receive = timed_receive  # type: ignore[method-assign]

_on_transport = daemon.Daemon._on_transport


def timed_on_transport(self: daemon.Daemon) -> None:
    served = self.served
    t0 = clock()
    _on_transport(self)
    loop["ns"] += clock() - t0
    loop["calls"] += 1
    loop["datagrams"] += self.served - served


daemon.Daemon._on_transport = timed_on_transport  # type: ignore[method-assign]

running: list[daemon.Daemon] = []
wanted: list[str] = []  # the last mode asked for (a signal may come before run())
_run = daemon.Daemon.run


def run_and_remember(self: daemon.Daemon) -> None:
    from ulogd.edges.poll import PollSetting

    running.append(self)
    if wanted:
        self.poll.__init__(PollSetting(wanted[-1]))  # type: ignore[misc]
    _run(self)


daemon.Daemon.run = run_and_remember  # type: ignore[method-assign]


def set_poll(mode: str) -> None:
    from ulogd.edges.poll import PollSetting

    wanted.append(mode)
    for d in running:
        d.poll.__init__(PollSetting(mode))  # type: ignore[misc]
    print(f"ulogd_timed: poll {mode}", file=sys.stderr, flush=True)


def dump_stats(*_: object) -> None:
    data = {
        "requests": {str(k): v for k, v in counts.items()},
        "receive_ns": {str(k): v for k, v in nanos.items()},
        "loop": dict(loop),
        "time": time.monotonic(),
        "poll": [d.poll.describe() for d in running],
    }
    with open(STATS + ".new", "w") as fh:
        json.dump(data, fh)
    import os

    os.replace(STATS + ".new", STATS)


profiler: cProfile.Profile | None = None


def toggle_profile(*_: object) -> None:
    global profiler
    if profiler is None:
        profiler = cProfile.Profile()
        profiler.enable()
        return
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
    with open(PROFILE, "w") as fh:
        fh.write(text.getvalue())
    profiler = None


signal.signal(signal.SIGUSR2, dump_stats)
signal.signal(signal.SIGRTMIN + 1, toggle_profile)
signal.signal(signal.SIGRTMIN + 2, lambda *_: set_poll("off"))
signal.signal(signal.SIGRTMIN + 3, lambda *_: set_poll("adaptive"))

_init = netlink.NetlinkTransport.__init__


def _init_and_bind(self: netlink.NetlinkTransport) -> None:
    _init(self)
    if self._sock.getsockname()[0] == 0:
        self._sock.bind((0, netlink.GROUP_BIT))
        self._sock.setsockopt(270, 1, 7)  # SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group 7
        print("ulogd_timed: bound the unbound netlink socket", file=sys.stderr)


netlink.NetlinkTransport.__init__ = _init_and_bind  # type: ignore[method-assign]
sys.exit(main(sys.argv[3:]))
