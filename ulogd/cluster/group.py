"""One log's replica in its corosync process group: ordering, joins and departures (pure).

Theory of operation
-------------------
Every member runs a :class:`Group` per log and feeds it, in delivery order, the group's
configuration changes (:meth:`Group.confchg`) and messages (:meth:`Group.deliver`); its own
kernel's requests arrive through :meth:`Group.submit`.  The group returns *actions*
(:class:`Answer` a kernel request, :class:`Multicast` a message, :class:`WriteDisk`,
:class:`Ready`), and the caller performs them.  All region rules stay in
:class:`~ulogd.state.regionlog.RegionLog`; this module only decides *when* and *on whose behalf*
they run:

* **One total order.**  State-changing requests (MARK, CLEAR, FLUSH with its integrated marks,
  GET_RESYNC_WORK, SET_REGION_SYNC, IS_REMOTE_RECOVERING) are multicast with agreed ordering
  and applied by every member at delivery, with the originator's node id.  Every member's
  replica therefore passes through the same states.  The originator answers its kernel from
  its own replica at delivery: one ordered delivery per answer.  MARK and CLEAR are
  acknowledged at once and ride in the batch of the next multicast (the kernel issues no data
  write before its FLUSH returns).  Only a FLUSH that must reach the shared log device of a
  ``clustered-disk`` log waits for a second message: the disk server (lowest node id among the
  members holding state) writes and multicasts ``DISK_DONE``.
* **Delivery index.**  Members count delivered events (messages and configuration changes).
  A joiner does not know the absolute count until its checkpoint arrives; it counts from its
  own join (0) and learns the offset (``joined_at``) from the checkpoint.
* **Joining.**  At the configuration change that admits joiners, the lowest valid member takes a
  snapshot *at that change* and multicasts it in chunks.  Joiners queue every event from their
  join on; when the checkpoint is complete they load it and replay the queued events that come
  after the snapshot point, so every request is applied exactly once.  If the sender leaves
  before its last chunk, the next lowest valid member snapshots at the change that reported
  the departure, and joiners drop the partial one.  When no member with state remains (all
  joined together, or the older ones left), the lowest member of the oldest cohort becomes the
  *master* and its own replica (or the disk) is the truth.
* **A dead daemon is not a dead node.**  The rule: *no region is recovered or made clean
  while a live kernel may still be writing it*, and a node's kernel outlives its daemon.  A
  member that leaves while its node stays in the ring (PROCDOWN, or a LEAVE that no suspend
  preceded) keeps its marks in every replica as an *orphan's*
  (:meth:`RegionLog.node_process_gone`): dirty, sync bits as they are, never recovered, never
  made clean.  They are released only in the total order: by its node's new daemon, whose
  first message (``REJOIN``) says what its kernel holds — the own marks restored from its
  state file replace them, a new kernel (the node rebooted) makes them lose sync — and which
  answers nothing until that message is applied; or by ``NODE_GONE``, which a member sends
  when its totem ring no longer holds the orphan's node (ring changes are local
  notifications, so they are announced, not applied).  At POSTSUSPEND (I/O drained) a member
  clears its leftover marks before it leaves, so a suspended mirror leaves no orphan.
* **Departures.**  A member whose node leaves the ring (NODEDOWN) without clearing its marks
  may have written one leg only: every region it held loses sync
  (:meth:`RegionLog.node_departed`), its recovery assignment is handed out again, and if it was
  the disk server the next server rewrites the whole log and answers the flushes that waited
  for the old one, at once.  A member that lost its own corosync and comes back marks the
  regions its kernel still holds again before anything else, and sends again what it had
  multicast without seeing it applied.
* **Partition merges.**  At a NODEUP change every member contributes its replica, naming its
  side (who held state there), or says it has none; events wait until every contribution is
  in (or its sender left), then all replicas combine them alike: a node's marks come from its
  own side only (another side's copy is old: a node whose corosync died comes back with marks
  cleared since), see :meth:`RegionLog.merge_from`.  The round's events are then replayed, and
  one checkpoint serves the members that took part without state and those that joined
  during the round.
* **Alone.**  A member that is alone in its group, quorate, with nothing in flight applies
  requests directly (:meth:`Group.direct`): a one-member ring costs a full CPU per message.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from ulogd.cluster import checkpoint as ck
from ulogd.cluster import messages as m
from ulogd.cluster.events import (
    CHUNK_SIZE,
    Action,
    Answer,
    Assembly,
    ConfChange,
    Delivery,
    Event,
    LeaveNow,
    MemberId,
    MergeRound,
    Multicast,
    Phase,
    Ready,
    Recover,
    WriteDisk,
    is_merge,
    targets_of,
)
from ulogd.cluster.merging import MergeRounds
from ulogd.protocol import spec as p
from ulogd.protocol import wire
from ulogd.protocol.spec import RequestType as T
from ulogd.state.regionlog import RegionLog, Rejoin
from ulogd.state.requests import OPERATIONS, ORDERED, Operation

log = logging.getLogger(__name__)

#: the cluster op of each ordered request type (its meaning is its row in OPERATIONS)
_OP_OF: dict[int, m.Op] = {
    T.MARK_REGION: m.Op.MARK,
    T.CLEAR_REGION: m.Op.CLEAR,
    T.FLUSH: m.Op.FLUSH,
    T.GET_RESYNC_WORK: m.Op.RESYNC_WORK,
    T.SET_REGION_SYNC: m.Op.SET_SYNC,
    T.IS_REMOTE_RECOVERING: m.Op.REMOTE_RECOVERING,
}
assert _OP_OF.keys() == ORDERED, "every ordered request type needs its cluster op"
#: the row a delivered op applies
_ROW_OF: dict[m.Op, Operation] = {op: OPERATIONS[t] for t, op in _OP_OF.items()}


def _kind(record: m.OpRecord) -> str:
    """How :meth:`RegionLog.without_quorum` sees an op."""
    if record.op is m.Op.CLEAR:
        return "clear"
    return "mark" if record.op in (m.Op.MARK, m.Op.FLUSH) else "other"


def _values(record: m.OpRecord) -> tuple[int, ...]:
    return record.values


def _narrowed(record: m.OpRecord, regions: tuple[int, ...]) -> m.OpRecord:
    return m.OpRecord(record.op, record.seq, regions)


class Group(MergeRounds):
    """See the module docstring (partition merge rounds: :class:`MergeRounds`)."""

    def __init__(
        self,
        rl: RegionLog,
        me: MemberId,
        *,
        chunk_size: int = CHUNK_SIZE,
        rejoin: Rejoin = Rejoin.FRESH,
    ) -> None:
        self.log = rl
        #: what this member says about its kernel's marks once it holds the group's state:
        #: REPLACE (restored from its state file), UNION (a reconnect without state), FRESH
        self.rejoin = rejoin
        #: node ids in the totem ring (None until corosync reports it)
        self.ring: set[int] | None = None
        self._gone_sent: set[int] = set()  # orphans whose ring departure this member announced
        self._ready_after_rejoin = False  # Ready waits for this member's own REJOIN
        self.me = me
        self.chunk_size = chunk_size
        self.phase = Phase.JOINING
        self.index = 0  # absolute once VALID, relative to own join while JOINING
        self.members: tuple[MemberId, ...] = ()
        self.valid: set[MemberId] = set()
        self.joiners: dict[MemberId, int] = {}  # member -> absolute index of its join
        self.sender: MemberId | None = None  # who is sending the checkpoint in progress
        self.ckpt_point = -1  # its snapshot point
        self.ckpt_delivered = 0  # its chunks delivered so far
        self.quorate = True
        # own requests
        self.outbox: list[m.OpRecord] = []  # MARK/CLEAR acknowledged, not yet multicast
        self.in_flight = 0  # own messages multicast but not yet delivered
        self.unconfirmed: list[tuple[m.OpRecord, ...]] = []  # own OPS batches not yet applied
        self.waiting: dict[int, wire.Request] = {}  # seq -> request answered at delivery
        self.flushes: list[tuple[int, wire.Request]] = []  # (index, FLUSH) awaiting disk word
        self.written_upto = -1  # disk server: last index known durable
        # joining
        self._joined_seen = False
        self._elders: set[MemberId] = set()
        self._cohort: set[MemberId] = set()
        self._queue: list[tuple[int, Event]] = []
        self._assembly: Assembly | None = None
        self._leaving: wire.Request | None = None
        self._merge: MergeRound | None = None
        self._changes = 0  # configuration changes seen since our own join
        self._hold_duty = False  # no checkpoint starts while a merge round begins or replays
        #: regions this node held when its corosync connection was lost (marked again on rejoin)
        self.own_marks: list[int] = []
        self.dropped = 0  # corrupt or foreign messages

    # ------------------------------------------------------------------ properties
    @property
    def disk_server(self) -> int | None:
        nodes = [n for n, _ in self.valid]
        return min(nodes) if nodes else None

    @property
    def direct(self) -> bool:
        """Alone, holding state, quorate, nothing in flight: requests need no multicast."""
        return (
            self.quorate
            and self.phase is Phase.VALID
            and self.members == (self.me,)
            and not self.in_flight
            and not self.outbox
        )

    # ------------------------------------------------------------------ kernel side
    def submit(self, request: wire.Request) -> list[Action]:
        """A state-changing kernel request for this log (the caller answers the rest locally)."""
        rl = self.log
        rtype = request.request_type
        op = _OP_OF.get(rtype)
        if op is None:
            raise ValueError(f"{p.type_name(rtype)} is not routed through the group")
        row = OPERATIONS[rtype]
        values = row.decode(request.data)
        if row.check is not None and (err := row.check(rl, values)):
            return [Answer(request, err)]
        if row.local is not None and row.local(rl):
            assert row.apply is not None  # every ordered row has its operation
            return [Answer(request, *row.apply(rl, self.me[0], values))]
        if row.acknowledge is not None:
            row.acknowledge(rl, values)  # acknowledged now: persisted before the reply
        record = m.OpRecord(op, request.seq, tuple(values))
        if row.at_once:
            self.outbox.append(record)
            return [Answer(request)]
        self.waiting[request.seq] = request
        return self._send([record])

    def flush_outbox(self) -> list[Action]:
        """Multicast acknowledged MARK/CLEARs now (before a suspend, or when quorum returns)."""
        return self._send([]) if self.outbox else []

    def _send(self, tail: list[m.OpRecord]) -> list[Action]:
        if self.phase is Phase.JOINING:
            # Nobody applies a message of a member without state: what a (restarted) daemon's
            # kernel asks before the group's state is in waits, and goes out after it (after
            # this member's REJOIN, when it has one).
            self.outbox += tail
            return []
        ops = self.outbox + tail
        if not self.quorate:  # RegionLog.without_quorum: no region made clean
            ops, self.outbox = RegionLog.without_quorum(
                ops, kind=_kind, regions=_values, narrowed=_narrowed
            )
        else:
            self.outbox = []
        if not ops:
            return []
        self.in_flight += 1
        self.unconfirmed.append(tuple(ops))
        return [Multicast(m.encode_ops(ops))]

    # ------------------------------------------------------------------ group side
    def confchg(
        self,
        members: Sequence[MemberId],
        left: Sequence[MemberId],
        joined: Sequence[MemberId],
        nodeup: Sequence[MemberId] = (),
        procdown: Sequence[MemberId] = (),
    ) -> list[Action]:
        """A configuration change; ``nodeup`` names the joined members that arrived with a
        merging partition (corosync's NODEUP reason) rather than by joining; ``procdown`` the
        left members whose process went while their node stays in the ring (PROCDOWN, or a
        LEAVE that no suspend preceded): their kernels may still be writing."""
        members_t = tuple(sorted(members))
        if self.phase is Phase.LEFT:
            return []
        if not self._joined_seen:
            if self.me not in joined:
                return []  # a change from before our own join
            self._joined_seen = True
            self.members = members_t
            self._cohort = set(joined)
            self._elders = set(members_t) - self._cohort
            self.index = 0
            self.log.set_members(n for n, _ in members_t)
            return self._maybe_master()
        self.index += 1
        return self._on_confchg(
            ConfChange(members_t, tuple(left), tuple(joined), tuple(nodeup), tuple(procdown))
        )

    def _on_confchg(self, event: ConfChange) -> list[Action]:
        """A change (already counted) as it comes, or as a merge round hands it on."""
        members_t, left, joined = event.members, event.left, event.joined
        nodeup, procdown = event.nodeup, event.procdown
        if self._merge is not None:
            return self._merge_confchg(members_t, left, event)
        if is_merge(event):
            return self._start_merge(members_t, left, nodeup, procdown)
        self._changes += 1
        if self.phase is Phase.JOINING:
            self._queue.append((self.index, event))
            self.members = members_t
            self._elders -= set(left)
            self._cohort &= set(members_t)
            self.log.set_members(n for n, _ in members_t)
            return self._maybe_master()
        return self._apply_confchg(members_t, left, joined, procdown)

    def _maybe_master(self) -> list[Action]:
        if self._elders:
            return []
        if min(self._cohort) != self.me:
            return []  # the lowest of our cohort becomes master and sends us its state
        # Nobody older holds state: this member's replica is the truth.
        self.phase = Phase.VALID
        self.valid = {self.me}
        # Joined_at is the index of each member's join in this member's own numbering (0 for
        # its cohort, the queued change's index for later ones), which now becomes absolute.
        self.joiners = {mm: 0 for mm in self.members if mm != self.me}
        for idx, event in self._queue:
            if isinstance(event, ConfChange):
                for mm in event.joined:
                    if mm in self.joiners:
                        self.joiners[mm] = idx
        self.sender = None
        queued, self._queue = self._queue, []
        actions: list[Action] = [Ready(master=True)]
        actions += self._checkpoint_duty()
        current = self.index
        for idx, event in queued:
            actions += self._replay(idx, event)
        self.index = current
        if self.outbox:
            actions += self._send([])  # what waited while this member joined
        return actions

    def _apply_confchg(
        self,
        members: tuple[MemberId, ...],
        left: tuple[MemberId, ...],
        joined: tuple[MemberId, ...],
        procdown: tuple[MemberId, ...] = (),
    ) -> list[Action]:
        rl = self.log
        old_server = self.disk_server
        self.members = members
        actions: list[Action] = []
        present_nodes = {n for n, _ in members}
        for member in left:
            self.joiners.pop(member, None)
            was_valid = member in self.valid
            self.valid.discard(member)
            if was_valid and member[0] not in present_nodes and member in procdown:
                # A dead daemon is not a dead node: its kernel keeps writing what it holds.
                held = rl.node_process_gone(member[0])
                if member[0] in rl.orphans:
                    log.warning(
                        "member %d's daemon left while its node stays in the ring: its %d "
                        "marked region(s) stay held until it rejoins or leaves the ring",
                        member[0],
                        held,
                    )
                    actions += self._report_gone()
            elif was_valid and member[0] not in present_nodes:
                lost = rl.node_departed(member[0])
                if lost:
                    actions.append(Recover(lost))
                    log.warning(
                        "member %d left holding %d marked region(s): they lose sync and will "
                        "be recovered",
                        member[0],
                        len(lost),
                    )
        for member in joined:
            if member != self.me and member not in self.valid:
                self.joiners[member] = self.index
        rl.set_members(present_nodes)
        if self.sender in left:
            self.sender = None  # its checkpoint will never complete: start another
        actions += self._server_moved(old_server)
        # Last: a snapshot at this change must include all of the change's effects.
        actions += self._checkpoint_duty()
        return actions

    def _server_moved(self, old_server: int | None) -> list[Action]:
        rl = self.log
        new_server = self.disk_server
        if rl.has_disk and new_server != old_server and new_server is not None:
            # What the previous server wrote is unknown.  Every replica treats the change
            # like a FLUSH that must rewrite the whole log (so all agree on what is pending);
            # the new server writes it, and its DISK_DONE releases every flush still waiting.
            rl.rewrite_whole_log()
            if new_server == self.me[0]:
                return [WriteDisk(None, self.index)]
        return []

    def _checkpoint_duty(self) -> list[Action]:
        if self._hold_duty or not self.joiners or self.sender is not None:
            return []
        sender = min(self.valid) if self.valid else None
        self.sender = sender
        self.ckpt_point = self.index
        self.ckpt_delivered = 0
        if sender != self.me:
            return []
        point = self.index
        targets = tuple(m.Target(n, pid, at) for (n, pid), at in sorted(self.joiners.items()))
        book = ck.GroupBook(
            point,
            tuple(sorted(self.valid)),
            tuple((n, pid, at) for (n, pid), at in sorted(self.joiners.items())),
        )
        parts = ck.split(ck.snapshot(self.log, book), self.chunk_size)
        self.in_flight += len(parts)
        return [
            Multicast(m.encode_checkpoint(point, i, len(parts), targets, chunk))
            for i, chunk in enumerate(parts)
        ]

    def deliver(self, sender: MemberId, data: bytes) -> list[Action]:
        if self.phase is Phase.LEFT or not self._joined_seen:
            return []
        try:
            message = m.decode(data)
        except m.MessageError as exc:
            self.dropped += 1
            log.error("dropped a message from node %d pid %d: %s", sender[0], sender[1], exc)
            self.index += 1
            return []
        self.index += 1
        mine = sender == self.me and not isinstance(message, m.DiskDone)
        if mine:
            self.in_flight = max(0, self.in_flight - 1)
        actions = self._on_message(sender, message)
        if mine and not self.in_flight:
            actions += self._leave_if_drained()
        return actions

    def _on_message(self, sender: MemberId, message: m.Message) -> list[Action]:
        """A message (already counted) as it comes, or as a merge round hands it on."""
        actions: list[Action] = []
        chunk_of = (
            frozenset((t.nodeid, t.pid) for t in message.members)
            if isinstance(message, m.MergeChunk)
            else None
        )
        if (
            chunk_of is not None
            and self._merge is None
            and self.phase is Phase.JOINING
            and self.me in chunk_of
        ):
            # The change that admitted us was a partition merge for the others (our node came
            # back): take part, saying we hold no state, so the round can complete.  Our join
            # was the merge change (position 0): what we queued since is the round's, and
            # members of the change that left since are its departures.
            present = set(self.members)
            self._merge = MergeRound(
                change=chunk_of, expect=set(chunk_of & present), departed=set(chunk_of - present)
            )
            self._merge.queue, self._queue = self._queue, []
            self._merge.pos = self.index - 1
            self._assembly = None
            self.in_flight += 1
            actions.append(Multicast(m.encode_merge(0, 0, 0, targets_of(set(chunk_of)), b"")))
        merge = self._merge
        if merge is not None and isinstance(message, m.MergeChunk) and chunk_of == merge.change:
            merge.pos += 1
            actions += self._merge_chunk(sender, message)
        elif self._merge is not None:
            # (a chunk of another round, too: of a merge that came during this round, whose
            # round starts when this one ends)
            self._merge.pos += 1
            self._merge.queue.append((self._merge.pos, Delivery(sender, message)))
        elif self.phase is Phase.JOINING:
            done = (
                self._collect(message, sender) if isinstance(message, m.CheckpointChunk) else None
            )
            if done is None:
                self._queue.append((self.index, Delivery(sender, message)))
            else:
                actions = done
        else:
            actions = self._apply(sender, message)
        return actions

    def _replay(self, idx: int, event: Event) -> list[Action]:
        self.index = idx
        if isinstance(event, ConfChange):
            return self._apply_confchg(event.members, event.left, event.joined, event.procdown)
        sender, message = event.sender, event.message
        if isinstance(message, m.CheckpointChunk):
            return self._count_chunk(message, sender)
        return self._apply(sender, message)

    def _apply(self, sender: MemberId, message: m.Message) -> list[Action]:
        if isinstance(message, m.CheckpointChunk):
            return self._count_chunk(message, sender)
        if isinstance(message, m.MergeChunk):
            return []  # a round this member was not part of (it joined after it began)
        if sender == self.me and isinstance(message, m.Ops) and self.unconfirmed:
            # Applied (or dropped) here, in the order it was sent; a batch a merge round still
            # holds is not: it goes out again if corosync is lost before the round ends.
            self.unconfirmed.pop(0)
        if sender not in self.valid:
            self.dropped += 1
            log.error(
                "dropped a message from node %d pid %d: not a member holding state",
                sender[0],
                sender[1],
            )
            return []
        if isinstance(message, m.DiskDone):
            return self._disk_done(message)
        return self._apply_ops(sender, message.ops)

    def _apply_ops(self, sender: MemberId, ops: tuple[m.OpRecord, ...]) -> list[Action]:
        rl = self.log
        node = sender[0]
        mine = sender == self.me
        actions: list[Action] = []
        if mine and self._ready_after_rejoin and any(r.op is m.Op.REJOIN for r in ops):
            self._ready_after_rejoin = False
            actions += self._apply_ops(sender, ops)
            return [*actions, Ready(master=False)]
        for rec in ops:
            result: tuple[int, bytes] | None = None
            row = _ROW_OF.get(rec.op)
            if row is not None:
                assert row.apply is not None
                outcome = row.apply(rl, node, rec.values)
                if row.writes_disk:
                    work = rl.take_disk_work()
                    if work is not False:
                        if self.disk_server == self.me[0]:
                            actions.append(WriteDisk(work, self.index))  # type: ignore[arg-type]
                        if mine and rec.seq in self.waiting:
                            self.flushes.append((self.index, self.waiting.pop(rec.seq)))
                        continue
                if not row.at_once:
                    result = outcome
            elif rec.op is m.Op.REJOIN:
                if not self._node_has_member(node, besides=sender):
                    lost = rl.node_rejoined(node, Rejoin(rec.seq), rec.values)
                    if lost:
                        log.warning(
                            "node %d came back with a new kernel: the %d region(s) its old "
                            "one held lose sync and will be recovered",
                            node,
                            len(lost),
                        )
                        actions.append(Recover(lost))
            elif rec.op is m.Op.NODE_GONE:
                gone = rec.values[0]
                if gone in rl.orphans and not self._node_has_member(gone):
                    lost = rl.node_departed(gone)
                    rl.set_members(n for n, _ in self.members)
                    log.warning(
                        "orphan node %d left the ring: %d region(s) lose sync and will be "
                        "recovered",
                        gone,
                        len(lost),
                    )
                    if lost:
                        actions.append(Recover(lost))
            if mine and result is not None:
                request = self.waiting.pop(rec.seq, None)
                if request is not None:
                    actions.append(Answer(request, *result))
        return actions

    def disk_written(self, index: int, ok: bool) -> list[Action]:
        """The disk server finished the :class:`WriteDisk` for ``index``: announce it."""
        return [Multicast(m.encode_disk_done(index, 0 if ok else p.EIO))]

    def _disk_done(self, done: m.DiskDone) -> list[Action]:
        if done.error:
            self.log.disk_written(False)
        actions: list[Action] = []
        keep = []
        for index, request in self.flushes:
            if index <= done.index:
                actions.append(Answer(request, done.error))
            else:
                keep.append((index, request))
        self.flushes = keep
        return actions

    # ------------------------------------------------------------------ checkpoints
    def _count_chunk(self, chunk: m.CheckpointChunk, sender: MemberId) -> list[Action]:
        # Points are in the sender's numbering: a stale chunk of another sender may carry the
        # same point (a new master replaying a departed elder's chunks), so check both.
        if self.sender is None or chunk.point != self.ckpt_point or sender != self.sender:
            return []  # a checkpoint abandoned when its sender left
        self.ckpt_delivered += 1
        if self.ckpt_delivered < chunk.parts:
            return []
        # The last chunk: its targets hold state from here on (a joiner with a lower node id
        # becomes the disk server here, and must rewrite the log like any new server).
        old_server = self.disk_server
        for t in chunk.targets:
            member = (t.nodeid, t.pid)
            if member in self.members:
                self.valid.add(member)
            self.joiners.pop(member, None)
        self.sender = None
        actions = self._server_moved(old_server)
        return actions + self._checkpoint_duty()  # joiners that arrived meanwhile

    def _collect(self, chunk: m.CheckpointChunk, sender: MemberId) -> list[Action] | None:
        target = next((t for t in chunk.targets if (t.nodeid, t.pid) == self.me), None)
        if target is None:
            return None
        a = self._assembly
        if a is None or a.point != chunk.point or a.sender != sender:
            a = self._assembly = Assembly(chunk.point, chunk.parts, target.joined_at)
            a.sender = sender
        a.chunks[chunk.part] = chunk.data
        if len(a.chunks) < a.parts:
            return None
        self._assembly = None
        blob = b"".join(a.chunks[i] for i in range(a.parts))
        try:
            book = ck.restore(self.log, blob)
        except ck.CheckpointError as exc:
            log.error("checkpoint unusable: %s; waiting for another", exc)
            self.dropped += 1
            return []
        offset = a.joined_at  # absolute index of our join change
        final_index = offset + self.index  # this chunk's absolute index
        self.phase = Phase.VALID
        self.valid = set(book.valid)
        self.joiners = {(n, pid): at for n, pid, at in book.joiners}
        # The snapshot was taken as this checkpoint started: it is in progress at that point.
        self.sender = min(book.valid) if book.valid else None
        self.ckpt_point = book.index
        self.ckpt_delivered = 0
        actions: list[Action] = [Ready(master=False)]
        queued, self._queue = self._queue, []
        # Replay what happened after the snapshot point; the snapshot holds the rest.
        for rel, event in queued:
            absolute = offset + rel
            if absolute > book.index:
                actions += self._replay(absolute, event)
        self.index = final_index
        actions += self._count_chunk(chunk, sender)  # the final chunk, as everybody counts it
        # Before anything else this member sends: what its kernel holds (a restarted daemon's
        # marks replace the ones its node kept as an orphan; a new kernel releases them).
        again = self._rejoin_ops()
        if again:
            # ... and this member answers nothing until that is applied (Ready then).
            actions = [a for a in actions if not isinstance(a, Ready)]
            self._ready_after_rejoin = True
            self.outbox = again + self.outbox
        if self.outbox:
            actions += self._send([])  # with what waited while this member joined
        return actions + self._report_gone()

    # ------------------------------------------------------------------ leaving
    def postsuspend(self, request: wire.Request) -> list[Action]:
        """Send what is still held back, and leave once all of it has been delivered.

        The kernel has drained its I/O before POSTSUSPEND (and marks every region again on
        its next write), so this node's leftover marks are cleared on the way out: a member
        that leaves after them is not an orphan.  Without quorum the CLEAR stays held and the
        marks stay, as an orphan's, until the node rejoins or leaves the ring."""
        leftover = self.log.marks_of(self.me[0])
        if leftover and self.quorate:
            self.log.kernel_cleared(leftover)
            self.outbox.append(m.OpRecord(m.Op.CLEAR, 0, tuple(leftover)))
        actions = self._send([]) if self.outbox and self.quorate else []
        self._leaving = request
        return actions + self._leave_if_drained()

    def _leave_if_drained(self) -> list[Action]:
        request = self._leaving
        if request is None or self.in_flight:
            return []
        self._leaving = None
        self.phase = Phase.LEFT
        for waiting in self.waiting.values():  # cannot be answered by a group we leave
            log.warning("seq %d answered -EAGAIN: the log left its group", waiting.seq)
        actions: list[Action] = [Answer(r, -11) for r in self.waiting.values()]
        actions += [Answer(r, -11) for _, r in self.flushes]
        self.waiting.clear()
        self.flushes.clear()
        return [*actions, LeaveNow(request)]

    def leave_now(self) -> None:
        """Leave without waiting (DTR without POSTSUSPEND): nothing more will be answered."""
        self.phase = Phase.LEFT
        self.waiting.clear()
        self.flushes.clear()
        self.outbox.clear()

    def adopt_pending(self, previous: Group) -> list[Action]:
        """Take over what an earlier incarnation (lost with its corosync) had not finished:
        acknowledged MARK/CLEARs go out again, unanswered requests are submitted again."""
        # The survivors dropped this node's marks when it vanished, but its kernel may still be
        # writing those regions: mark them again before anything else.
        again = [m.OpRecord(m.Op.MARK, 0, tuple(previous.own_marks))] if previous.own_marks else []
        # Batches multicast but never applied here may be lost, or applied only by the others
        # (who dropped this node's marks since): all of them go out again in their order (an
        # acknowledged MARK among them may be a region the kernel writes now), and their
        # requests are answered when they arrive.
        resent = [rec for batch in previous.unconfirmed for rec in batch]
        # (what it held back while it joined waits in its outbox with its request)
        for rec in resent + previous.outbox:
            request = previous.waiting.get(rec.seq)
            if rec.op not in (m.Op.MARK, m.Op.CLEAR) and request is not None:
                self.waiting[rec.seq] = request
        self.outbox = again + resent + previous.outbox + self.outbox
        # What is left: FLUSHes delivered and waiting for a disk write that may never be announced.
        requests = [r for r in previous.waiting.values() if r.seq not in self.waiting]
        requests += [r for _, r in previous.flushes]
        actions: list[Action] = []
        for request in sorted(requests, key=lambda r: r.seq):
            actions += self.submit(request)
        return actions or self.flush_outbox()

    # ------------------------------------------------------------------ live kernels
    def ring_changed(self, nodes: Sequence[int]) -> list[Action]:
        """The totem ring now holds ``nodes`` (a local notification: not ordered with the
        group's messages, so a departure it shows is announced in the total order)."""
        self.ring = set(nodes)
        self._gone_sent -= self.ring  # a node back in the ring may leave it again
        return self._report_gone()

    def _report_gone(self) -> list[Action]:
        """Announce orphans whose node is no longer in the ring (once each)."""
        if self.phase is not Phase.VALID or self.ring is None or self._merge is not None:
            return []
        gone = sorted(self.log.orphans - self.ring - self._gone_sent)
        if not gone:
            return []
        self._gone_sent.update(gone)
        for node in gone:
            log.warning(
                "node %d left the ring while its daemon was gone: its regions lose sync", node
            )
        ops = [m.OpRecord(m.Op.NODE_GONE, 0, (node,)) for node in gone]
        self.in_flight += 1
        self.unconfirmed.append(tuple(ops))
        return [Multicast(m.encode_ops(ops))]

    def _rejoin_ops(self) -> list[m.OpRecord]:
        """What this member's kernel holds, said before anything else it sends once it has
        the group's state (after a daemon restart, or for a kernel that is new)."""
        rl = self.log
        mode = self.rejoin
        node = self.me[0]
        if mode is Rejoin.REPLACE:
            marks = rl.own_marks()
        elif node in rl.orphans:
            marks = []
        else:
            return []  # nothing of this node's is held: nothing to say
        if mode is Rejoin.REPLACE and not self.quorate:
            mode = Rejoin.UNION  # releasing stale marks is a CLEAR: not without quorum
        chunks = [marks[i : i + 0xFFFF] for i in range(0, len(marks), 0xFFFF)] or [[]]
        ops = [m.OpRecord(m.Op.REJOIN, int(mode), tuple(chunks[0]))]
        ops += [m.OpRecord(m.Op.REJOIN, int(Rejoin.UNION), tuple(c)) for c in chunks[1:]]
        return ops

    def _node_has_member(self, node: int, besides: MemberId | None = None) -> bool:
        return any(mm[0] == node and mm != besides for mm in self.valid)

    def set_quorate(self, quorate: bool) -> list[Action]:
        self.quorate = quorate
        return self.flush_outbox() if quorate else []
