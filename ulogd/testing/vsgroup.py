"""A deterministic in-process process group with virtual synchrony — a *test aid only*.

The product always runs on corosync.  This model lets property tests explore interleavings
that are hard to force on a real ring: it keeps one total order of events, delivers every
message to every member of the configuration it was sent in (a member's messages are
delivered before the change that reports its departure), and reports configuration changes
in the same position to every member, as CPG does.

:class:`SimNode` drives one :class:`~ulogd.cluster.group.Group` per node the way the daemon
does (multicast, answers, disk server writes), and records every kernel answer.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field

from ulogd import ctr, wire
from ulogd.cluster import group as g
from ulogd.protocol import RequestType as T
from ulogd.regionlog import RegionLog, new_bitmaps

_pids = itertools.count(1000)


@dataclass
class SimNode:
    nodeid: int
    ctr_text: str
    pid: int = field(default_factory=lambda: next(_pids))
    answers: dict[int, wire.Reply] = field(default_factory=dict)
    asked: set[int] = field(default_factory=set)
    group: g.Group | None = None
    ready: bool = False
    left_ok: bool = False
    writes: int = 0
    log: RegionLog | None = None

    @property
    def member(self) -> tuple[int, int]:
        return (self.nodeid, self.pid)

    def fresh_group(self) -> g.Group:
        config = ctr.parse(self.ctr_text.encode())
        clean, sync = new_bitmaps(config)
        self.log = RegionLog(config, clean, sync, local_node=self.nodeid, device_id="7:0")
        self.log.disk_loaded = True
        self.log.resumed = True
        self.group = g.Group(self.log, self.member, chunk_size=64)
        self.ready = False
        return self.group


class VirtualGroup:
    """One group's total order."""

    def __init__(self, seed: int = 0, disk_delay: bool = True) -> None:
        self.members: list[SimNode] = []
        self.queue: list[tuple[str, object]] = []  # pending events in total order
        self.rng = random.Random(seed)
        self.disk_delay = disk_delay
        self.pending_writes: list[tuple[SimNode, int]] = []
        self.seq = itertools.count(1)
        self.delivered = 0

    # -- membership ------------------------------------------------------------------
    def join(self, node: SimNode) -> None:
        node.fresh_group()
        self._flush_pending_of(None)
        self.members.append(node)
        self._confchg(left=[], joined=[node])

    def leave(self, node: SimNode) -> None:
        """A departure (crash or leave): its queued messages are delivered first."""
        self._drain_from(node)
        self.members.remove(node)
        self._confchg(left=[node], joined=[])
        node.group = None

    def _confchg(self, left: list[SimNode], joined: list[SimNode]) -> None:
        members = [n.member for n in self.members]
        for n in list(self.members):
            assert n.group is not None
            self._act(n, n.group.confchg(members, [x.member for x in left],
                                         [x.member for x in joined]))  # fmt: skip

    def _flush_pending_of(self, node: SimNode | None) -> None:
        while self.queue:
            self.step()

    def _drain_from(self, node: SimNode) -> None:
        while any(sender is node for kind, (sender, _) in self.queue if kind == "msg"):  # type: ignore[misc]
            self.step()

    # -- messages --------------------------------------------------------------------
    def step(self) -> bool:
        if self.pending_writes and (not self.queue or self.rng.random() < 0.5):
            node, index = self.pending_writes.pop(0)
            if node in self.members and node.group is not None:
                self._act(node, node.group.disk_written(index, True))
            return True
        if not self.queue:
            return False
        _kind, (sender, data) = self.queue.pop(0)  # type: ignore[misc]
        self.delivered += 1
        for n in list(self.members):
            assert n.group is not None
            self._act(n, n.group.deliver(sender.member, data))  # type: ignore[union-attr]
        return True

    def run(self) -> None:
        while self.step():
            pass

    def _act(self, node: SimNode, actions: list[g.Action]) -> None:
        for a in actions:
            if isinstance(a, g.Multicast):
                self.queue.append(("msg", (node, a.data)))
            elif isinstance(a, g.Answer):
                node.answers[a.request.seq] = wire.Reply(a.request.seq, a.error, a.payload)
            elif isinstance(a, g.WriteDisk):
                node.writes += 1
                self.pending_writes.append((node, a.index))
            elif isinstance(a, g.Ready):
                node.ready = True
            elif isinstance(a, g.LeaveNow):
                node.left_ok = True

    # -- kernel side -----------------------------------------------------------------
    def request(self, node: SimNode, rtype: int, data: bytes = b"") -> int:
        seq = next(self.seq)
        req = wire.decode(wire.encode_request(rtype, uuid="LVM-sim", luid=1, seq=seq, data=data))
        assert isinstance(req, wire.Request)
        assert node.group is not None
        node.asked.add(seq)
        self._act(node, node.group.submit(req))
        return seq


def replicas_identical(nodes: list[SimNode]) -> bool:
    valid = [n for n in nodes if n.group is not None and n.group.phase is g.Phase.VALID]
    if len(valid) < 2:
        return True
    first = valid[0].log
    assert first is not None
    for other in valid[1:]:
        o = other.log
        assert o is not None
        if (first.clean, first.sync, first.holders, first.recovering, first.sync_search) != (
            o.clean, o.sync, o.holders, o.recovering, o.sync_search,
        ):  # fmt: skip
            return False
    return True


__all__ = ["SimNode", "T", "VirtualGroup", "replicas_identical"]
