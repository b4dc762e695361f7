"""The daemon's corosync edge: one CPG handle per clustered log, wired to the server.

Theory of operation
-------------------
:class:`CorosyncLink` performs the server's cluster actions — :class:`~ulogd.engine.server.Join`,
:class:`~ulogd.engine.server.ClusterSend`, :class:`~ulogd.engine.server.Leave` — with :mod:`cpg`
handles,
and feeds each handle's deliveries and configuration changes back to
:meth:`Server.group_deliver <ulogd.engine.server.Server.group_deliver>` /
:meth:`Server.group_confchg <ulogd.engine.server.Server.group_confchg>` in delivery order; the
actions those return go back to the daemon to perform.  Handles are polled by the daemon's
selector (``fileno``), sends go through each handle's outbound queue (``CS_ERR_TRY_AGAIN``
never spins: the daemon's loop wakes up after :meth:`timeout` to retry).

When the local corosync goes away, every group's handle reports it; the server holds those
logs' requests, and :meth:`tick` tries once a second to reconnect and join again.  Quorum
changes (libquorum) are passed to the server, which stops making regions clean without it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

import cpg
from ulogd.engine.actions import Action, ClusterSend, Join, Leave
from ulogd.engine.server import Server
from ulogd.engine.table import about

log = logging.getLogger(__name__)

Executor = Callable[[list[Action]], None]

ORPHAN_CHECK = 30.0  # s between looks at orphaned marks
ORPHAN_WARN_AFTER = 120.0  # s a node may go without a daemon before it is worth a warning
ORPHAN_WARN_EVERY = 600.0  # s between repeated warnings for the same node and log
Registrar = Callable[[int, Callable[[], None] | None], None]


def local_nodeid() -> int:
    """This node's corosync node id (raises ``cpg.CpgError`` when corosync is not running)."""
    with cpg.Handle() as h:
        return h.local_get()


class CorosyncLink:
    def __init__(
        self,
        server: Server,
        execute: Executor,
        register: Registrar,
        *,
        require_quorum: bool = True,
        metrics: Any = None,
    ) -> None:
        self.server = server
        self.metrics = metrics
        self.execute = execute
        self.register = register  # (fd, callback) registers; (fd, None) unregisters
        self.handles: dict[tuple[str, int], cpg.Handle] = {}
        self.lost: set[tuple[str, int]] = set()
        self._next_try = 0.0
        self.deliveries = 0
        self.confchgs = 0
        self.quorum: Any = None
        self.want_quorum = require_quorum
        self._next_orphan_check = 0.0
        self._orphans_seen = False  # the last look found orphans: look again on time
        self._orphan_warned: dict[tuple[tuple[str, int], int], float] = {}
        if require_quorum:
            self._open_quorum()

    # ------------------------------------------------------------------ quorum
    def _open_quorum(self) -> None:
        try:
            self.quorum = cpg.Quorum(on_change=self._on_quorum)
        except cpg.CpgError as exc:
            log.error("cannot track quorum (%s): acting as not quorate, retrying", exc)
            self.quorum = None
            self.execute(self.server.set_quorate(False))
            return
        self.register(self.quorum.fileno(), self._dispatch_quorum)
        quorate = bool(self.quorum.quorate)
        log.info("corosync quorum: %s", "quorate" if quorate else "NOT quorate")
        self.execute(self.server.set_quorate(quorate))

    def _dispatch_quorum(self) -> None:
        fd = self.quorum.fileno()
        if not self.quorum.dispatch():  # the connection is gone (the handle closed itself)
            log.error("quorum connection lost: acting as not quorate until corosync returns")
            self.register(fd, None)
            self.quorum = None
            self.execute(self.server.set_quorate(False))

    def _on_quorum(self, change: Any) -> None:
        log.warning("corosync quorum is now %s", "quorate" if change.quorate else "LOST")
        self.execute(self.server.set_quorate(change.quorate))

    def describe(self) -> str:
        """The cluster part of the daemon's status line (systemd's STATUS=)."""
        if not self.want_quorum:
            quorum = "quorum not required"
        elif self.quorum is None:
            quorum = "no quorum link (retrying)"
        else:
            quorum = "quorate" if self.quorum.quorate else "NOT quorate"
        groups = len(self.handles)
        text = f"corosync node {self.server.local_node}, {quorum}, {groups} group"
        text += "" if groups == 1 else "s"
        return f"{text}, {len(self.lost)} rejoining" if self.lost else text

    # ------------------------------------------------------------------ actions
    def perform(self, action: Join | ClusterSend | Leave) -> None:
        if isinstance(action, Join):
            self._join(action.key, action.name)
        elif isinstance(action, ClusterSend):
            handle = self.handles.get(action.key)
            if handle is None:
                log.error("no group for %s: message dropped", action.key[0][-8:])
                return
            handle.send(action.data)
        else:
            self._leave(action.key)

    def _join(self, key: tuple[str, int], name: bytes) -> None:
        old = self.handles.pop(key, None)
        if old is not None:
            self._close(key, old)

        def on_deliver(msg: Any) -> None:
            self.deliveries += 1
            if self.metrics is not None:
                self.metrics.cluster_delivery()
            self.execute(self.server.group_deliver(key, (msg.nodeid, msg.pid), msg.data))

        def on_confchg(change: Any) -> None:
            self.confchgs += 1
            if self.metrics is not None:
                self.metrics.membership_change()
            members = [m.ident for m in change.members]
            left = [m.ident for m in change.left]
            joined = [m.ident for m in change.joined]
            reasons = ", ".join(f"{m.nodeid}:{m.reason.name}" for m in change.left + change.joined)
            log.info("[%s] group members %s (%s)", key[0][-8:], members, reasons)
            nodeup = [m.ident for m in change.joined if m.reason is cpg.Reason.NODEUP]
            # A process that went (PROCDOWN), or left without a suspend before (LEAVE: a
            # daemon shutting down), leaves its node in the ring and its kernel writing;
            # NODEDOWN is the node's own departure.  (A LEAVE after POSTSUSPEND cleared its
            # marks first, so it leaves nothing to keep.)
            procdown = [
                m.ident for m in change.left if m.reason in (cpg.Reason.PROCDOWN, cpg.Reason.LEAVE)
            ]
            self.execute(self.server.group_confchg(key, members, left, joined, nodeup, procdown))

        def on_totem(ring: Any) -> None:
            self.execute(self.server.ring_changed(key, list(ring.nodes)))

        def on_lost(lost: Any) -> None:
            log.error("[%s] corosync connection lost (%s)", key[0][-8:], lost.op, extra=about(key))
            self.lost.add(key)
            if lost.fd >= 0:
                self.register(lost.fd, None)  # already closed by the handle

        try:
            handle = cpg.Handle(
                on_deliver=on_deliver, on_confchg=on_confchg, on_lost=on_lost, on_totem=on_totem
            )
            handle.join(name)
        except cpg.CpgError as exc:
            log.error(
                "[%s] cannot join the group (%s): retrying", key[0][-8:], exc, extra=about(key)
            )
            self.server.group_lost(key)
            self.lost.add(key)
            return
        self.handles[key] = handle
        self.register(handle.fileno(), lambda: self._dispatch(key))

    def _dispatch(self, key: tuple[str, int]) -> None:
        handle = self.handles.get(key)
        if handle is None:
            return
        handle.dispatch()
        if key in self.lost:
            self.handles.pop(key, None)
            self._close(key, handle)
            self.server.group_lost(key)
            return
        handle.flush_outbound()

    def _leave(self, key: tuple[str, int]) -> None:
        handle = self.handles.pop(key, None)
        if handle is None:
            return
        try:
            handle.leave()
        except cpg.CpgError as exc:
            log.warning("[%s] leaving the group: %s", key[0][-8:], exc, extra=about(key))
        self._close(key, handle)

    def _close(self, key: tuple[str, int], handle: cpg.Handle) -> None:
        fd = handle.fileno() if handle.is_open else -1
        if fd >= 0:
            self.register(fd, None)
        handle.close()

    # ------------------------------------------------------------------ timing
    def timeout(self) -> float | None:
        """How soon the loop must call :meth:`tick` (None: no need)."""
        waits = [w for h in self.handles.values() if (w := h.retry_after()) is not None]
        if self._orphans_seen:  # (not a walk over every log on each wake-up)
            waits.append(max(0.0, self._next_orphan_check - time.monotonic()))
        if self.lost or (self.want_quorum and self.quorum is None):
            waits.append(max(0.0, self._next_try - time.monotonic()))
        return min(waits) if waits else None

    def tick(self) -> None:
        for handle in list(self.handles.values()):
            if handle.pending:
                handle.flush_outbound()
        self._watch_orphans()
        reconnect = self.lost or (self.want_quorum and self.quorum is None)
        if reconnect and time.monotonic() >= self._next_try:
            self._next_try = time.monotonic() + 1.0
            if self.want_quorum and self.quorum is None:
                self._open_quorum()
            for key in list(self.lost):
                self.lost.discard(key)
                self.execute(self.server.rejoin(key))

    def _watch_orphans(self) -> None:
        """A node that stays in the ring with its daemon gone holds its regions for as long:
        worth a warning, repeated at a low rate."""
        now = time.monotonic()
        if now < self._next_orphan_check:
            return
        self._next_orphan_check = now + ORPHAN_CHECK
        report = self.server.orphan_report(time.time())
        self._orphans_seen = bool(report)
        for key, node, held, since in report:
            age = time.time() - since
            last = self._orphan_warned.get((key, node), 0.0)
            if age >= ORPHAN_WARN_AFTER and now - last >= ORPHAN_WARN_EVERY:
                self._orphan_warned[(key, node)] = now
                log.warning(
                    "[%s] node %d has had no daemon in this log's group for %d s: its %d "
                    "region(s) stay held (start ulogd there, or the node must leave the ring)",
                    key[0][-8:],
                    node,
                    age,
                    held,
                    extra=about(key),
                )

    def close(self) -> None:
        for key in list(self.handles):
            self._leave(key)
        if self.quorum is not None:
            self.register(self.quorum.fileno(), None)
            self.quorum.close()


def member_pid() -> int:
    return os.getpid()
