"""Partition merges of one log's group: the merge round (pure; part of :class:`Group`).

Theory of operation
-------------------
At a configuration change that brings members of another partition (corosync's NODEUP) every
member contributes its replica, naming its side (who held state there), or says it has none;
events wait until every contribution is in (or its sender left), then all replicas combine
them alike with :meth:`RegionLog.merge_from` (a node's marks come from its own side only).
The round's events are then replayed, and one checkpoint serves the members that took part
without state and those that joined during the round.  A merge that comes during a round
ends the round just before it and starts the next.

:class:`MergeRounds` holds these steps; :class:`~ulogd.cluster.group.Group` is one (it owns
the state they read and the steps they hand on to, declared below for the type checker).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ulogd.cluster import checkpoint as ck
from ulogd.cluster import messages as m
from ulogd.cluster.events import (
    Action,
    ConfChange,
    Event,
    MemberId,
    MergeRound,
    Multicast,
    Phase,
    Recover,
    WriteDisk,
    is_merge,
    targets_of,
)
from ulogd.state.regionlog import RegionLog

log = logging.getLogger("ulogd.cluster.group")


class MergeRounds:
    """The merge-round steps of :class:`~ulogd.cluster.group.Group`."""

    if TYPE_CHECKING:
        log: RegionLog
        me: MemberId
        index: int
        phase: Phase
        members: tuple[MemberId, ...]
        valid: set[MemberId]
        joiners: dict[MemberId, int]
        sender: MemberId | None
        chunk_size: int
        in_flight: int
        _merge: MergeRound | None
        _hold_duty: bool
        _queue: list[tuple[int, Event]]
        _elders: set[MemberId]
        _cohort: set[MemberId]
        _assembly: object

        @property
        def disk_server(self) -> int | None: ...
        def _replay(self, idx: int, event: Event) -> list[Action]: ...
        def _on_message(self, sender: MemberId, message: m.Message) -> list[Action]: ...
        def _on_confchg(self, event: ConfChange) -> list[Action]: ...
        def _maybe_master(self) -> list[Action]: ...
        def _checkpoint_duty(self) -> list[Action]: ...
        def _apply_confchg(
            self,
            members: tuple[MemberId, ...],
            left: tuple[MemberId, ...],
            joined: tuple[MemberId, ...],
            procdown: tuple[MemberId, ...],
        ) -> list[Action]: ...

    def _start_merge(
        self,
        members: tuple[MemberId, ...],
        left: tuple[MemberId, ...],
        nodeup: tuple[MemberId, ...],
        procdown: tuple[MemberId, ...] = (),
    ) -> list[Action]:
        """Partitions merged: every member contributes its state as of this change (or says it
        has none); events are held until every contribution is in, then all replicas combine
        them the same way (:meth:`RegionLog.merge_from`)."""
        actions: list[Action] = []
        if self.phase is Phase.VALID:
            # Departures seen in this change still count (a node on the far side may have
            # crashed).  Nobody is a joiner yet and no checkpoint starts: every member of the
            # change takes part in the round, and those without state become joiners when it
            # completes (a checkpoint started now would be abandoned right away).
            self._hold_duty = True
            actions += self._apply_confchg(members, left, (), procdown)
            self._hold_duty = False
        self.members = members
        self.log.set_members(n for n, _ in members)
        log.warning("partitions merged (%d member(s) came back): combining replicas", len(nodeup))
        self._merge = MergeRound(change=frozenset(members), expect=set(members))
        self.sender = None
        if self.phase is Phase.VALID:
            # The contribution names its side: who held state there (a node's marks are taken
            # from its own side only) and who did not (such a member has no marks).
            side = [mm for mm in members if mm not in nodeup]
            book = ck.GroupBook(
                self.index,
                tuple(sorted(self.valid)),
                tuple((n, pid, 0) for n, pid in side if (n, pid) not in self.valid),
            )
            self._merge.own = book
            parts = ck.split(ck.snapshot(self.log, book), self.chunk_size)
            self.in_flight += len(parts)
            actions += [
                Multicast(m.encode_merge(self.index, i, len(parts), targets_of(members), chunk))
                for i, chunk in enumerate(parts)
            ]
        else:
            # What this member waited for on its side is moot: it counts from the merge change
            # (0) like everybody who takes part without state (see _merge_complete).
            self.index = 0
            self._queue = []
            self._assembly = None
            self.in_flight += 1
            actions.append(Multicast(m.encode_merge(0, 0, 0, targets_of(members), b"")))
        return actions

    def _merge_confchg(
        self, members: tuple[MemberId, ...], left: tuple[MemberId, ...], event: ConfChange
    ) -> list[Action]:
        merge = self._merge
        assert merge is not None
        self.members = members
        self.log.set_members(n for n, _ in members)
        for gone in left:
            # Not waited for any more; a complete contribution still counts (its marks must be
            # merged so that replaying this departure makes its regions lose sync).
            merge.expect.discard(gone)
            merge.departed.add(gone)
        merge.pos += 1
        merge.queue.append((merge.pos, event))
        return self._merge_complete()

    def _merge_chunk(self, sender: MemberId, chunk: m.MergeChunk) -> list[Action]:
        merge = self._merge
        assert merge is not None
        if sender not in merge.expect and sender not in merge.departed:
            return []
        merge.parts[sender] = chunk.parts
        merge.points[sender] = chunk.point
        if chunk.parts:
            merge.chunks.setdefault(sender, {})[chunk.part] = chunk.data
        return self._merge_complete()

    def _merge_complete(self) -> list[Action]:
        merge = self._merge
        assert merge is not None
        for member in merge.expect:
            parts = merge.parts.get(member)
            if parts is None or (parts and len(merge.chunks.get(member, {})) < parts):
                return []
        self._merge = None
        nested = next((i for i, (_, event) in enumerate(merge.queue) if is_merge(event)), None)
        held = merge.queue if nested is None else merge.queue[:nested]
        later = [] if nested is None else merge.queue[nested:]
        end = merge.pos if nested is None else merge.queue[nested][0] - 1

        def complete(mm: MemberId) -> bool:
            parts = merge.parts.get(mm)
            return parts is not None and len(merge.chunks.get(mm, {})) >= parts

        contributors = sorted(
            mm for mm in merge.expect | merge.departed if merge.parts.get(mm) and complete(mm)
        )
        actions: list[Action] = []
        # Members that left before their contribution was complete are still accounted for
        # when a complete contribution of their side names them: as holding state (its replica
        # has their marks; the replayed departure loses sync of their regions) or not (no
        # marks).  Otherwise they may have held marks nobody knows about.
        holding: set[MemberId] = set()
        if self.phase is Phase.VALID:
            sides: list[tuple[RegionLog, set[int]]] = []
            named: set[MemberId] = set()
            for member in contributors:
                if member == self.me and merge.own is not None:
                    replica, book = self.log, merge.own
                else:
                    blob = b"".join(merge.chunks[member][i] for i in range(merge.parts[member]))
                    replica = self.log.blank_copy()
                    try:
                        book = ck.restore(replica, blob)
                    except ck.CheckpointError as exc:
                        log.error("merge contribution of node %d unusable: %s", member[0], exc)
                        continue
                holding.update(book.valid)
                named.update(book.valid)
                named.update((n, pid) for n, pid, _ in book.joiners)
                sides.append((replica, {n for n, _ in book.valid}))
            lost = self.log.merge_from(sides)
            unknown = sorted(mm for mm in merge.departed if not complete(mm) and mm not in named)
            if unknown:
                log.error(
                    "members %s left during a partition merge before their state "
                    "arrived: every region is resynchronised",
                    [n for n, _ in unknown],
                )
                lost = self.log.lose_all_sync()
            if lost:
                actions.append(Recover(lost))
                log.warning(
                    "partition merge: %d region(s) lost sync and will be recovered", len(lost)
                )
        self.index = max(merge.points.values(), default=0) + 1
        # Departed contributors (and departed members a contribution names as holding state)
        # stay valid until the queued change that reports their departure is replayed below: it
        # applies node_departed to their marks like any departure.
        self.valid = set(contributors) | (holding & merge.departed)
        self.joiners = {}
        if self.phase is Phase.VALID:
            rl = self.log
            if rl.has_disk and self.disk_server is not None:
                rl.rewrite_whole_log()  # by the (possibly new) server
                if self.disk_server == self.me[0]:
                    actions.append(WriteDisk(None, self.index))
            # Every event of the round has its position: the merge change is the merged
            # group's index ``base`` and each later event ``base + position`` — the numbering
            # members that joined during the round use too.
            base = self.index - 1
            # No checkpoint starts during the replay: the members that took part without state
            # become joiners only at the round's last event (that is where they count from), and
            # a snapshot taken earlier would not list them as joiners.  One checkpoint at the
            # end serves them and everybody who joined during the round.
            self._hold_duty = True
            for pos, event in held:
                actions += self._replay(base + pos, event)
            self._hold_duty = False
            self.index = base + end
            if not later:
                for member in merge.expect:
                    if member in self.members and member not in self.valid:
                        self.joiners.setdefault(member, base)  # took part without state
                actions += self._checkpoint_duty()
        else:
            # Still without state.  Every member that took part without state counts from the
            # merge change (0), the change members holding state name as its join.  They form
            # the oldest cohort after the members still holding state (contributors that left
            # during the round are gone: their departures are among the round's events);
            # members that joined during the round are younger, and the changes that admitted
            # them stay queued for a master among us to number their joins.
            self.valid -= merge.departed
            self.index = end
            self._queue = [(pos, event) for pos, event in held if isinstance(event, ConfChange)]
            self._elders = set(self.valid)
            self._cohort = (merge.expect & set(self.members)) - self.valid
            if not later:
                actions += self._maybe_master()
        # Another merge came during the round: the round ends just before it, and everything
        # from that change on is handled as it would have been after the round, the change
        # starting the next round (its newcomers started theirs at it already).
        for _, event in later:
            self.index += 1
            if isinstance(event, ConfChange):
                actions += self._on_confchg(event)
            else:
                actions += self._on_message(event.sender, event.message)
        return actions
