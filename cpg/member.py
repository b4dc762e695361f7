"""A scriptable CPG member process: ``python -m cpg.member``.

Theory of operation
-------------------
Tests and benchmarks need one CPG client per cluster node, i.e. per network namespace, so the
client must be a separate process.  This module is that process: a small event loop over
stdin, a :class:`cpg.Handle` and (on request) a :class:`cpg.Quorum`, driven by one command per
stdin line and reporting one JSON object per stdout line.  It doubles as a manual probe
(``ip netns exec NS python -m cpg.member`` then type ``info``).

Commands (words separated by spaces)::

    info                      -> {"ev": "info", "nodeid", "pid", "max"}
    join GROUP                 join GROUP (text; a NUL is appended)
    leave                      leave the group
    quorum                    open a Quorum tracker -> {"ev": "quorum", "quorate", "nodes"}
    quiet 0|1                 stop/start reporting each message (default: report)
    burst COUNT SIZE          queue COUNT messages of SIZE bytes -> {"ev": "burst_sent", ...}
    ping COUNT SIZE           one in flight, COUNT times -> {"ev": "ping", "us": [...]}
    expect COUNT              -> {"ev": "expected", "seconds"} once COUNT more burst messages
                              (from anyone) have been delivered
    mcast SIZE                one raw mcast -> {"ev": "mcast", "ok", "error"}
    stats                     -> {"ev": "stats", "count", "digest", "gaps", "try_again"}
    reconnect TIMEOUT         reopen the handle (and quorum) until corosync answers, rejoin
    exit                      finalize and exit 0

Events: ``confchg`` (members/left/joined as ``[nodeid, pid, reason-name]``), ``msg``
(nodeid ``n``, pid ``p``, length, digest ``h``), ``lost``, ``reconnected``.  Every event
carries ``t`` (``time.time()``) so a test can time failure detection.  ``digest`` in ``stats``
is a SHA-256 over every delivered (nodeid, pid, payload) in order, so equal digests mean
byte-identical message streams.
"""

from __future__ import annotations

import hashlib
import json
import os
import selectors
import struct
import sys
import time
from typing import Any

from . import ConfChg, CpgError, Handle, Lost, Member, Message, Quorum, QuorumChange

#: Payload header of burst and ping messages: kind, nodeid, pid, sequence number.
HEADER = struct.Struct(">BIIQ")
KIND_BURST = 1
KIND_PING = 2


def _members(members: tuple[Member, ...]) -> list[list[Any]]:
    return [[m.nodeid, m.pid, m.reason.name] for m in members]


class MemberProcess:
    def __init__(self) -> None:
        self.sel = selectors.DefaultSelector()
        self.handle: Handle | None = None
        self.quorum: Quorum | None = None
        self.group: bytes | None = None
        self.quiet = False
        self.count = 0
        self.digest = hashlib.sha256()
        self.last_seq: dict[tuple[int, int], int] = {}
        self.gaps = 0
        self.seq = 0
        self.nodeid = 0
        self.burst_started: float | None = None
        self.burst_count = 0
        self.burst_try_again_base = 0
        self.ping_left = 0
        self.ping_size = 0
        self.ping_sent = 0.0
        self.ping_us: list[float] = []
        self.expect_left = 0
        self.expect_started = 0.0
        self.stdin_buf = b""
        self.running = True

    # -- output ----------------------------------------------------------------------------

    def emit(self, ev: str, **fields: Any) -> None:
        fields = {"ev": ev, "t": time.time(), **fields}
        sys.stdout.write(json.dumps(fields) + "\n")
        sys.stdout.flush()

    # -- callbacks --------------------------------------------------------------------------

    def on_deliver(self, msg: Message) -> None:
        self.count += 1
        self.digest.update(struct.pack(">III", msg.nodeid, msg.pid, len(msg.data)))
        self.digest.update(msg.data)
        kind = msg.data[0] if msg.data else 0
        if len(msg.data) >= HEADER.size and kind in (KIND_BURST, KIND_PING):
            _, nodeid, pid, seq = HEADER.unpack_from(msg.data)
            key = (nodeid, pid)
            if kind == KIND_BURST:
                if key in self.last_seq and seq != self.last_seq[key] + 1:
                    self.gaps += 1
                self.last_seq[key] = seq
                if self.expect_left > 0:
                    self.expect_left -= 1
                    if self.expect_left == 0:
                        seconds = time.perf_counter() - self.expect_started
                        self.emit("expected", seconds=seconds)
            elif kind == KIND_PING and pid == os.getpid() and nodeid == self.nodeid:
                self.ping_us.append((time.perf_counter() - self.ping_sent) * 1e6)
                self.ping_left -= 1
                if self.ping_left > 0:
                    self.send_ping()
                else:
                    self.emit("ping", us=self.ping_us)
                    self.ping_us = []
        if not self.quiet:
            h = hashlib.sha1(msg.data).hexdigest()[:16]
            self.emit("msg", n=msg.nodeid, p=msg.pid, len=len(msg.data), h=h)

    def on_confchg(self, chg: ConfChg) -> None:
        self.emit(
            "confchg",
            members=_members(chg.members),
            left=_members(chg.left),
            joined=_members(chg.joined),
        )

    def on_lost(self, lost: Lost) -> None:
        self.sel_unregister(lost.op.split("_")[0])
        self.emit("lost", op=lost.op, code=int(lost.code), unsent=lost.unsent)

    def on_quorum(self, change: QuorumChange) -> None:
        self.emit("quorum", quorate=change.quorate, nodes=list(change.nodes))

    def sel_unregister(self, kind: str) -> None:
        for key in list(self.sel.get_map().values()):
            if key.data == kind:
                self.sel.unregister(key.fileobj)

    # -- connections -------------------------------------------------------------------------

    def open_handle(self) -> None:
        self.handle = Handle(self.on_deliver, self.on_confchg, self.on_lost)
        self.nodeid = self.handle.local_get()
        self.sel.register(self.handle.fileno(), selectors.EVENT_READ, "cpg")

    def open_quorum(self) -> None:
        self.quorum = Quorum(self.on_quorum, self.on_lost)
        self.sel.register(self.quorum.fileno(), selectors.EVENT_READ, "quorum")
        self.emit("quorum", quorate=self.quorum.quorate, nodes=[])

    # -- commands ---------------------------------------------------------------------------

    def send_ping(self) -> None:
        assert self.handle is not None
        self.seq += 1
        payload = HEADER.pack(KIND_PING, self.nodeid, os.getpid(), self.seq)
        self.ping_sent = time.perf_counter()
        self.handle.send(payload.ljust(self.ping_size, b"p"))

    def command(self, line: str) -> None:
        words = line.split()
        if not words:
            return
        cmd, args = words[0], words[1:]
        h = self.handle
        try:
            if cmd == "info":
                assert h is not None
                self.emit("info", nodeid=h.local_get(), pid=os.getpid(), max=h.max_atomic_msgsize())
            elif cmd == "join":
                assert h is not None
                self.group = args[0].encode() + b"\0"
                h.join(self.group)
            elif cmd == "leave":
                assert h is not None
                h.leave()
            elif cmd == "quorum":
                self.open_quorum()
            elif cmd == "quiet":
                self.quiet = args[0] == "1"
            elif cmd == "burst":
                assert h is not None
                count, size = int(args[0]), int(args[1])
                self.burst_started = time.perf_counter()
                self.burst_count = count
                self.burst_try_again_base = h.try_again_count
                messages = []
                for _ in range(count):
                    self.seq += 1
                    header = HEADER.pack(KIND_BURST, self.nodeid, os.getpid(), self.seq)
                    messages.append(header.ljust(size, b"b"))
                h.send_many(messages)
                self.check_burst()
            elif cmd == "ping":
                self.ping_left, self.ping_size = int(args[0]), int(args[1])
                self.send_ping()
            elif cmd == "expect":
                self.expect_left = int(args[0])
                self.expect_started = time.perf_counter()
            elif cmd == "mcast":
                assert h is not None
                try:
                    h.mcast(b"m" * int(args[0]))
                    self.emit("mcast", ok=True, error=None)
                except CpgError as exc:
                    self.emit("mcast", ok=False, error=exc.name, text=str(exc))
            elif cmd == "stats":
                self.emit(
                    "stats",
                    count=self.count,
                    digest=self.digest.hexdigest(),
                    gaps=self.gaps,
                    try_again=h.try_again_count if h is not None else None,
                    pending=h.pending if h is not None else None,
                )
            elif cmd == "reconnect":
                self.reconnect(float(args[0]) if args else 30.0)
            elif cmd == "exit":
                self.running = False
            else:
                self.emit("error", text=f"unknown command {cmd!r}")
        except Exception as exc:  # report, keep serving
            self.emit("error", text=f"{cmd}: {exc!r}")

    def reconnect(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        if self.handle is not None:
            self.handle.close()
        while True:
            try:
                self.open_handle()
                break
            except CpgError:
                if time.monotonic() > deadline:
                    self.emit("error", text="reconnect timed out")
                    return
                time.sleep(0.05)
        if self.group is not None:
            assert self.handle is not None
            self.handle.join(self.group)
        if self.quorum is not None:
            self.quorum.close()
            self.open_quorum()
        self.emit("reconnected", nodeid=self.nodeid)

    def check_burst(self) -> None:
        if self.burst_started is not None and self.handle is not None and not self.handle.pending:
            seconds = time.perf_counter() - self.burst_started
            self.emit(
                "burst_sent",
                count=self.burst_count,
                seconds=seconds,
                try_again=self.handle.try_again_count - self.burst_try_again_base,
            )
            self.burst_started = None

    # -- loop -------------------------------------------------------------------------------

    def read_stdin(self) -> None:
        data = os.read(0, 65536)
        if not data:
            self.running = False
            return
        self.stdin_buf += data
        while b"\n" in self.stdin_buf:
            line, self.stdin_buf = self.stdin_buf.split(b"\n", 1)
            self.command(line.decode())

    def run(self) -> int:
        os.set_blocking(0, False)
        self.sel.register(0, selectors.EVENT_READ, "stdin")
        self.open_handle()
        assert self.handle is not None
        self.emit(
            "ready", nodeid=self.nodeid, pid=os.getpid(), max=self.handle.max_atomic_msgsize()
        )
        while self.running:
            h = self.handle
            timeout = h.retry_after() if h is not None else None
            for key, _ in self.sel.select(timeout):
                if key.data == "stdin":
                    self.read_stdin()
                elif key.data == "cpg" and h is not None:
                    h.dispatch()
                elif key.data == "quorum" and self.quorum is not None:
                    self.quorum.dispatch()
            if h is not None and h.is_open and h.pending:
                h.flush_outbound()
            self.check_burst()
        if self.handle is not None:
            self.handle.close()
        if self.quorum is not None:
            self.quorum.close()
        return 0


def main() -> int:
    return MemberProcess().run()


if __name__ == "__main__":
    sys.exit(main())
