"""What the cluster group model returns and keeps: its actions, events and round records (pure).

:class:`~ulogd.cluster.group.Group` returns *actions* (:class:`Answer`, :class:`Multicast`,
:class:`WriteDisk`, :class:`Ready`, :class:`LeaveNow`, :class:`Recover`) and keeps the events it
cannot apply yet (:class:`ConfChange`, :class:`Delivery`) while it joins or while a partition
merge round is open (:class:`MergeRound`); a joiner assembles its checkpoint in an
:class:`Assembly`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from ulogd.cluster import checkpoint as ck
from ulogd.cluster import messages as m
from ulogd.protocol import wire

MemberId = tuple[int, int]  # (nodeid, pid)


class Phase(enum.Enum):
    JOINING = "joining"  # in the group, waiting for state
    VALID = "valid"  # holds the group's state
    LEFT = "left"


@dataclass(slots=True)
class Answer:
    request: wire.Request
    error: int = 0
    payload: bytes = b""


@dataclass(slots=True)
class Multicast:
    data: bytes


@dataclass(slots=True)
class WriteDisk:
    """The disk server must write these chunks (None = everything) and then multicast
    ``DISK_DONE(index)`` via :meth:`Group.disk_written`."""

    chunks: set[int] | None
    index: int


@dataclass(slots=True)
class LeaveNow:
    """Everything this member sent has been delivered: leave the group, then answer the
    POSTSUSPEND that asked for it."""

    request: wire.Request


@dataclass(slots=True)
class Recover:
    """Regions lost sync because a member left holding them: this node's kernel must be made
    to ask for resync work again (it stops asking once it has seen every region in sync)."""

    regions: list[int]


@dataclass(slots=True)
class Ready:
    """This member now holds the group's state.  ``master``: nobody else had it — load it
    locally (own replica, or the disk for a disk log) before answering."""

    master: bool


Action = Answer | Multicast | WriteDisk | Ready | LeaveNow | Recover

#: checkpoint chunk size: well below corosync's atomic message size (~1 MiB)
CHUNK_SIZE = 256 * 1024


def targets_of(members: set[MemberId] | tuple[MemberId, ...]) -> tuple[m.Target, ...]:
    return tuple(m.Target(n, pid, 0) for n, pid in sorted(members))


@dataclass(frozen=True, slots=True)
class ConfChange:
    """A configuration change as the group keeps it (queued while joining or merging)."""

    members: tuple[MemberId, ...]
    left: tuple[MemberId, ...]
    joined: tuple[MemberId, ...]
    nodeup: tuple[MemberId, ...]
    procdown: tuple[MemberId, ...]


@dataclass(frozen=True, slots=True)
class Delivery:
    """A delivered message as the group keeps it (queued while joining or merging)."""

    sender: MemberId
    message: m.Message


Event = ConfChange | Delivery


def is_merge(event: Event) -> bool:
    """A configuration change that brings members of another partition (NODEUP)."""
    return isinstance(event, ConfChange) and any(mm in event.members for mm in event.nodeup)


@dataclass
class MergeRound:
    change: frozenset[MemberId]  # the merge change's members (its chunks name them)
    expect: set[MemberId]
    departed: set[MemberId] = field(default_factory=set)
    pos: int = 0  # position of the latest event in the round (the merge change is 0)
    parts: dict[MemberId, int] = field(default_factory=dict)
    points: dict[MemberId, int] = field(default_factory=dict)
    chunks: dict[MemberId, dict[int, bytes]] = field(default_factory=dict)
    queue: list[tuple[int, Event]] = field(default_factory=list)
    own: ck.GroupBook | None = None  # the book of this member's own contribution


@dataclass
class Assembly:
    point: int
    parts: int
    joined_at: int
    chunks: dict[int, bytes] = field(default_factory=dict)
    sender: MemberId = (0, 0)  # points are per sender's numbering: never mix two senders
