"""A deterministic in-process process group with virtual synchrony — a *test aid only*.

The product always runs on corosync.  This model lets property tests explore interleavings
that are hard to force on a real ring.  One :class:`VirtualGroup` is one connected component
of a CPG group: it keeps one total order of events (messages *and* configuration changes),
delivers every event to every member of the configuration it is ordered in, and reports
configuration changes in the same position to every member, as CPG does.  What the model
lets a test choose, all from a seeded :class:`random.Random` so a schedule replays exactly:

* **Where a change is ordered.**  :meth:`VirtualGroup.change` (several joins and leaves in
  one configuration change) puts the change at the end of the queue, or anywhere after the
  last queued change (``at``): messages multicast earlier but ordered later are delivered
  after it — to joiners too, as corosync does.
* **Graceful leave** (:meth:`leave`): everything the leaver multicast is delivered first.
* **Crash** (:meth:`crash`): the change is ordered at a chosen point; the crashed member's
  messages ordered before it are delivered, those after it were never sent (lost with the
  process); its pending disk writes never complete.
* **Partition** (:meth:`partition`) splits off a second, independent :class:`VirtualGroup`;
  each side sees the other side leave.  Messages still queued at the split are delivered up
  to a chosen cut to everybody; after the cut each side delivers only its own side's
  messages (virtual synchrony: members that move together deliver the same set).
  **Merge** (:meth:`merge`) drains both sides and reports, NODEUP style, the other side's
  members as joined — on each side a *different* change, as corosync does.
* **Lost corosync** (:meth:`lose_corosync`): the others see the member leave as after a
  crash, but its daemon lives on with its replica and its unfinished work; :meth:`revive`
  brings it back as the first member of a component of its own (corosync restarted alone),
  where it joins again on the same replica and takes the old work over, as the daemon does
  (``Server.group_lost``, ``Server.rejoin``): a later :meth:`merge` is NODEUP.
* **Disk writes** of a disk server complete at a random later step, and fail with
  probability ``fail_writes``.

:class:`SimNode` drives one :class:`~ulogd.cluster.group.Group` per node the way the daemon
does (multicast, answers, disk server writes, leaving), and records every kernel answer
(``answer_counts`` catches a request answered twice).  ``on_event`` (if set) is called after
every delivered event with the group and the event, so tests check invariants after every
delivery.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from ulogd.cluster import group as g
from ulogd.protocol import ctr, wire
from ulogd.protocol.spec import RequestType as T
from ulogd.state.regionlog import RegionLog, new_bitmaps

_pids = itertools.count(1000)

MemberId = tuple[int, int]


@dataclass
class SimNode:
    nodeid: int
    ctr_text: str
    pid: int = field(default_factory=lambda: next(_pids))
    answers: dict[int, wire.Reply] = field(default_factory=dict)
    answer_counts: Counter[int] = field(default_factory=Counter)
    asked: set[int] = field(default_factory=set)
    requests: dict[int, tuple[int, bytes]] = field(default_factory=dict)  # seq -> (type, data)
    group: g.Group | None = None
    ready: bool = False
    master: bool | None = None
    left_ok: bool = False
    writes: int = 0
    log: RegionLog | None = None
    chunk_size: int = 64
    recover: list[list[int]] = field(default_factory=list)  # Recover actions (lost regions)
    orphan: g.Group | None = None  # the group lost with the local corosync (see lose_corosync)

    @property
    def member(self) -> MemberId:
        return (self.nodeid, self.pid)

    def fresh_group(self) -> g.Group:
        config = ctr.parse(self.ctr_text.encode())
        clean, sync = new_bitmaps(config)
        self.log = RegionLog(config, clean, sync, local_node=self.nodeid, device_id="7:0")
        self.log.disk_loaded = True
        self.log.resumed = True
        return self.rejoin_group()

    def rejoin_group(self) -> g.Group:
        """A new member on the current replica (also after the local corosync came back,
        saying what its kernel holds, as the server's rejoin does)."""
        assert self.log is not None
        rejoin = g.Rejoin.REPLACE if self.orphan is not None else g.Rejoin.FRESH
        self.group = g.Group(self.log, self.member, chunk_size=self.chunk_size, rejoin=rejoin)
        self.ready = False
        self.master = None
        self.left_ok = False
        return self.group

    def restart(self) -> None:
        """A new process on the same node (new pid), e.g. after a crash; join it again."""
        self.pid = next(_pids)
        self.group = None
        self.log = None

    def restart_daemon(self) -> None:
        """A new daemon on the same node and kernel (new pid): it restores the dead one's
        replica and own marks from its state file, and rejoins saying what its kernel holds
        (the kernel re-sends no MARK)."""
        assert self.log is not None
        old = self.log
        config = ctr.parse(self.ctr_text.encode())
        self.log = RegionLog(
            config, old.clean, old.sync, local_node=self.nodeid, device_id="7:0", mine=old.mine
        )
        self.log.restore_scalars(old.scalars())
        self.log.restore_own_marks()
        self.pid = next(_pids)
        self.group = g.Group(
            self.log, self.member, chunk_size=self.chunk_size, rejoin=g.Rejoin.REPLACE
        )
        self.ready = False
        self.master = None
        self.left_ok = False


@dataclass(frozen=True)
class Msg:
    sender: SimNode
    data: bytes
    quorate: bool = True  # the sender's quorum state when it multicast the message
    #: the sender's member id when it multicast (a node's later daemon has another pid)
    sender_id: MemberId = field(default=(0, 0), compare=False)

    def __post_init__(self) -> None:
        if self.sender_id == (0, 0):
            object.__setattr__(self, "sender_id", self.sender.member)


@dataclass(frozen=True)
class Conf:
    members: tuple[SimNode, ...]  # the view after the change
    left: tuple[SimNode, ...]
    joined: tuple[SimNode, ...]
    procdown: tuple[SimNode, ...] = ()  # left: the process died, the node stays in the ring
    #: the member ids of members, left, joined, procdown as they were when the change was
    #: ordered (a SimNode's pid changes when its daemon restarts)
    ids: tuple[tuple[MemberId, ...], ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        if not self.ids:
            ids = tuple(
                tuple(n.member for n in ns)
                for ns in (self.members, self.left, self.joined, self.procdown)
            )
            object.__setattr__(self, "ids", ids)


@dataclass(frozen=True)
class Merge:
    """A NODEUP merge: ``sides`` are the member lists of the components merged."""

    sides: tuple[tuple[SimNode, ...], ...]
    ids: tuple[tuple[MemberId, ...], ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        if not self.ids:
            ids = tuple(tuple(n.member for n in side) for side in self.sides)
            object.__setattr__(self, "ids", ids)


Event = Msg | Conf | Merge


class VirtualGroup:
    """One connected component's total order (see the module docstring)."""

    def __init__(
        self, seed: int = 0, disk_delay: bool = True, fail_writes: float = 0.0,
        rng: random.Random | None = None,
    ) -> None:  # fmt: skip
        self.view: list[SimNode] = []  # members at the delivery point
        #: their member ids there (a node whose daemon restarted hears nothing before its join)
        self.view_ids: set[MemberId] = set()
        self.members: list[SimNode] = []  # members once every queued change is delivered
        self.queue: list[Event] = []  # ordered, not yet delivered
        self.rng = rng if rng is not None else random.Random(seed)
        self.disk_delay = disk_delay
        self.fail_writes = fail_writes
        self.pending_writes: list[tuple[SimNode, int]] = []
        self.seq = itertools.count(1)
        self.delivered = 0
        self.on_event: Callable[[VirtualGroup, Event], None] | None = None
        self.crashed: list[SimNode] = []
        #: nodes that lost their corosync: nothing more of this component reaches them
        self.deaf: set[MemberId] = set()  # by member id: a node's next daemon hears again

    # -- membership ------------------------------------------------------------------
    def _last_conf(self) -> int:
        return max((i + 1 for i, e in enumerate(self.queue) if not isinstance(e, Msg)), default=0)

    def change(
        self,
        joined: Iterable[SimNode] = (),
        left: Iterable[SimNode] = (),
        *,
        at: int | None = None,
        drop_after: Iterable[SimNode] = (),
        procdown: Iterable[SimNode] = (),
    ) -> None:
        """One configuration change; ``at`` orders it before queued messages (clamped to after
        the last queued change); messages of ``drop_after`` members ordered after it are lost."""
        joined_t, left_t = tuple(joined), tuple(left)
        for n in joined_t:
            assert n not in self.members, f"node {n.nodeid} is already a member"
            if n.orphan is not None:
                n.rejoin_group()
            elif n.group is None or n.ready:
                n.fresh_group()
        for n in left_t:
            assert n in self.members, f"node {n.nodeid} is not a member"
        lo = self._last_conf()
        pos = len(self.queue) if at is None else min(max(at, lo), len(self.queue))
        gone = set(map(id, drop_after))
        if gone:
            self.queue[pos:] = [
                e for e in self.queue[pos:] if not (isinstance(e, Msg) and id(e.sender) in gone)
            ]
        self.members = [n for n in self.members if n not in left_t] + list(joined_t)
        self.queue.insert(pos, Conf(tuple(self.members), left_t, joined_t, tuple(procdown)))

    def join(self, node: SimNode, *, at: int | None = None) -> None:
        self.change(joined=[node], at=at)

    def leave(self, node: SimNode) -> None:
        """A departure with every message it multicast delivered first (graceful leave, or a
        crash after corosync got everything)."""
        self.change(left=[node])
        self.run_events()

    def crash(self, *nodes: SimNode, at: int | None = None) -> None:
        """The processes die (several in one change): the change is ordered at ``at`` (random
        when None); their messages ordered later are lost; they process nothing from now on."""
        if at is None:
            at = self.rng.randint(self._last_conf(), len(self.queue))
        self.change(left=nodes, at=at, drop_after=nodes)
        for node in nodes:
            node.group = None  # a dead process acts no more
            self.crashed.append(node)
        self.pending_writes = [(n, i) for n, i in self.pending_writes if n not in nodes]

    def kill_daemon(self, node: SimNode, *, at: int | None = None) -> None:
        """``kill -9`` of the node's daemon only: its kernel lives on and keeps writing the
        regions it holds; the others see PROCDOWN.  Its replica stays (the state file)."""
        if at is None:
            at = self.rng.randint(self._last_conf(), len(self.queue))
        self.change(left=[node], at=at, drop_after=[node], procdown=[node])
        node.group = None
        self.pending_writes = [(n, i) for n, i in self.pending_writes if n is not node]

    def rejoin_after_restart(self, node: SimNode) -> None:
        """The node's new daemon (same kernel) rejoins with what it restored."""
        node.restart_daemon()
        self.change(joined=[node])

    def ring_changed(self, nodes: Iterable[int]) -> None:
        """Every listening member's corosync reports the totem ring (a local notification)."""
        ring = list(nodes)
        for n in self.listening:
            if n.group is not None:
                self._act(n, n.group.ring_changed(ring))

    def lose_corosync(self, node: SimNode, *, at: int | None = None) -> None:
        """The node's corosync dies: a crash for the others (see :meth:`crash`), but the
        daemon keeps its replica, its unfinished requests and the regions its kernel holds."""
        orphan = node.group
        assert orphan is not None and node.log is not None and node.orphan is None
        orphan.own_marks = sorted(r for r, h in node.log.holders.items() if node.nodeid in h)
        self.crash(node, at=at)
        self.crashed.remove(node)
        self.deaf.add(node.member)
        node.orphan = orphan

    @classmethod
    def revive(cls, node: SimNode, like: VirtualGroup) -> VirtualGroup:
        """The node's corosync is back, alone at first: a new component (sharing ``like``'s
        rng, seq counter and hook) in which the node joins again on its old replica."""
        assert node.orphan is not None
        new = cls(disk_delay=like.disk_delay, fail_writes=like.fail_writes, rng=like.rng)
        new.seq = like.seq
        new.on_event = like.on_event
        new.crashed = like.crashed
        new.join(node)
        return new

    def partition(self, side: Iterable[SimNode], *, cut: int | None = None) -> VirtualGroup:
        """Split ``side`` off into a new component (same rng, seq counter and hook)."""
        other = list(side)
        self.run_confs()
        cut = self.rng.randint(0, len(self.queue)) if cut is None else min(cut, len(self.queue))
        for _ in range(cut):
            self._deliver_one()
        rest, self.queue = self.queue, []
        mine = [n for n in self.members if n not in other]
        new = VirtualGroup(disk_delay=self.disk_delay, fail_writes=self.fail_writes, rng=self.rng)
        new.seq = self.seq
        new.on_event = self.on_event
        new.crashed = self.crashed
        ids = set(map(id, other))
        new.queue = [e for e in rest if isinstance(e, Msg) and id(e.sender) in ids]
        self.queue = [e for e in rest if isinstance(e, Msg) and id(e.sender) not in ids]
        new.view = [n for n in self.view if id(n) in ids]
        new.view_ids = {n.member for n in new.view} & self.view_ids
        new.members = list(new.view)
        self.view = [n for n in self.view if id(n) not in ids]
        self.view_ids -= new.view_ids
        self.members = mine
        new.pending_writes = [(n, i) for n, i in self.pending_writes if id(n) in ids]
        self.pending_writes = [(n, i) for n, i in self.pending_writes if id(n) not in ids]
        # Each side: the other side left (NODEDOWN), after its own side's old messages.
        self.queue.append(Conf(tuple(self.members), tuple(new.members), ()))
        new.queue.append(Conf(tuple(new.members), tuple(self.members), ()))
        return new

    def merge(self, other: VirtualGroup) -> None:
        """Merge ``other`` into this component (NODEUP on both sides)."""
        self.run_events()
        other.run_events()
        self.pending_writes += other.pending_writes
        other.pending_writes = []
        sides = (tuple(self.members), tuple(other.members))
        self.members = self.members + other.members
        self.queue.append(Merge(sides))
        other.members, other.view, other.view_ids = [], [], set()

    # -- delivery --------------------------------------------------------------------
    def is_deaf(self, node: SimNode) -> bool:
        return node.member in self.deaf

    @property
    def listening(self) -> list[SimNode]:
        """The members at the delivery point that still receive this component's events."""
        return [n for n in self.view if not self.is_deaf(n) and n.member in self.view_ids]

    def _deliver_one(self) -> None:
        event = self.queue.pop(0)
        self.delivered += 1
        if isinstance(event, Msg):
            for n in self.listening:
                if n.group is not None:
                    self._act(n, n.group.deliver(event.sender_id, event.data))
        elif isinstance(event, Conf):
            ms, left, joined, procdown = (list(x) for x in event.ids)
            self.view = list(event.members)
            self.view_ids = set(ms)
            self.deaf -= set(left)
            for n in self.listening:
                if n.group is not None:
                    self._act(n, n.group.confchg(ms, left, joined, procdown=procdown))
        else:
            everyone = [n for side in event.sides for n in side]
            self.view = everyone
            ms = [mm for side in event.ids for mm in side]
            self.view_ids = set(ms)
            for side, side_ids in zip(event.sides, event.ids, strict=True):
                others = [mm for mm in ms if mm not in side_ids]
                for n in side:
                    if n.group is not None and not self.is_deaf(n) and n.member in side_ids:
                        self._act(n, n.group.confchg(ms, [], others, nodeup=others))
        if self.on_event is not None:
            self.on_event(self, event)

    def deliver_one(self) -> bool:
        """Deliver the next queued event; False when the queue is empty."""
        if not self.queue:
            return False
        self._deliver_one()
        return True

    def complete_write(self, i: int = 0, ok: bool = True) -> bool:
        """Complete the ``i``-th pending disk write (modulo their number)."""
        if not self.pending_writes:
            return False
        node, index = self.pending_writes.pop(i % len(self.pending_writes))
        if (
            node in self.view
            and node.member in self.view_ids
            and node.group is not None
            and node.group.phase is g.Phase.VALID
        ):
            self._act(node, node.group.disk_written(index, ok))
        return True

    def _complete_write(self) -> None:
        i = self.rng.randrange(len(self.pending_writes)) if self.disk_delay else 0
        ok = not (self.fail_writes and self.rng.random() < self.fail_writes)
        self.complete_write(i, ok)

    def step(self) -> bool:
        """Deliver one event or complete one disk write; False when there is nothing to do."""
        if self.pending_writes and (not self.queue or self.rng.random() < 0.5):
            self._complete_write()
            return True
        if not self.queue:
            return False
        self._deliver_one()
        return True

    def run(self) -> None:
        while self.step():
            pass

    def run_events(self) -> None:
        """Deliver every queued event (disk writes may stay pending)."""
        while self.queue:
            self._deliver_one()

    def run_confs(self) -> None:
        """Deliver up to and including the last queued configuration change."""
        for _ in range(self._last_conf()):
            self._deliver_one()

    def _act(self, node: SimNode, actions: list[g.Action]) -> None:
        for a in actions:
            if isinstance(a, g.Multicast):
                quorate = node.group.quorate if node.group is not None else True
                self.queue.append(Msg(node, a.data, quorate))
            elif isinstance(a, g.Answer):
                seq = a.request.seq
                node.answers[seq] = wire.Reply(seq, a.error, a.payload)
                node.answer_counts[seq] += 1
            elif isinstance(a, g.WriteDisk):
                node.writes += 1
                self.pending_writes.append((node, a.index))
            elif isinstance(a, g.Ready):
                node.ready = True
                node.master = a.master
                orphan, node.orphan = node.orphan, None
                if orphan is not None and node.group is not None:
                    self._act(node, node.group.adopt_pending(orphan))
            elif isinstance(a, g.Recover):
                node.recover.append(list(a.regions))
            elif isinstance(a, g.LeaveNow):
                node.left_ok = True
                seq = a.request.seq
                node.answers[seq] = wire.Reply(seq, 0, b"")
                node.answer_counts[seq] += 1

    # -- kernel side -----------------------------------------------------------------
    def make_request(self, node: SimNode, rtype: int, data: bytes = b"") -> wire.Request:
        seq = next(self.seq)
        req = wire.decode(wire.encode_request(rtype, uuid="LVM-sim", luid=1, seq=seq, data=data))
        assert isinstance(req, wire.Request)
        node.asked.add(seq)
        node.requests[seq] = (rtype, data)
        return req

    def request(self, node: SimNode, rtype: int, data: bytes = b"") -> int:
        """A kernel request routed through the group; returns its seq."""
        assert node.group is not None
        req = self.make_request(node, rtype, data)
        self._act(node, node.group.submit(req))
        return req.seq

    def postsuspend(self, node: SimNode) -> int:
        """POSTSUSPEND: the node leaves once its own messages are delivered (see
        :meth:`leave_if_done`)."""
        assert node.group is not None
        req = self.make_request(node, T.POSTSUSPEND)
        self._act(node, node.group.postsuspend(req))
        return req.seq

    def leave_if_done(self) -> None:
        """Members whose group said LeaveNow leave (the daemon calls cpg_leave)."""
        for n in list(self.members):
            if n.left_ok and n.group is not None and n.group.phase is g.Phase.LEFT:
                self.change(left=[n])
                n.left_ok = False

    def set_quorate(self, node: SimNode, quorate: bool) -> None:
        assert node.group is not None
        self._act(node, node.group.set_quorate(quorate))


def replica_state(n: SimNode) -> tuple[object, ...]:
    """Everything every member holding state must agree on at the same delivery point."""
    rl, gr = n.log, n.group
    assert rl is not None and gr is not None
    k = rl.region_count
    return (
        rl.clean[:k].to01(), rl.sync[:k].to01(), rl.sync_count,
        {r: frozenset(h) for r, h in rl.holders.items()},
        rl.recovering, rl.recoverer, rl.sync_search, tuple(rl.priority),
        frozenset(rl.dirty_chunks), rl.full_write, rl.disk_failed, rl.in_sync_override,
        frozenset(rl.members),
        gr.index, gr.members, frozenset(gr.valid), dict(gr.joiners), gr.sender,
        # the checkpoint counters mean something only while a checkpoint is in progress
        gr.ckpt_point if gr.sender else None, gr.ckpt_delivered if gr.sender else None,
        gr.disk_server,
    )  # fmt: skip


REPLICA_FIELDS = (
    "clean", "sync", "sync_count", "holders", "recovering", "recoverer", "sync_search",
    "priority", "dirty_chunks", "full_write", "disk_failed", "in_sync_override", "log.members",
    "index", "members", "valid", "joiners", "sender", "ckpt_point", "ckpt_delivered",
    "disk_server",
)  # fmt: skip


def replica_differences(nodes: Iterable[SimNode]) -> list[str]:
    """Fields in which members holding state differ (empty when identical)."""
    valid = [n for n in nodes if n.group is not None and n.group.phase is g.Phase.VALID]
    if len(valid) < 2:
        return []
    first = replica_state(valid[0])
    out = []
    for other in valid[1:]:
        st = replica_state(other)
        for name, a, b in zip(REPLICA_FIELDS, first, st, strict=True):
            if a != b:
                out.append(f"{name}: node {valid[0].nodeid}={a!r} node {other.nodeid}={b!r}")
    return out


def replicas_identical(nodes: list[SimNode]) -> bool:
    return not replica_differences(nodes)


__all__ = [
    "Conf", "Merge", "Msg", "SimNode", "T", "VirtualGroup", "replica_differences",
    "replica_state", "replicas_identical",
]  # fmt: skip
