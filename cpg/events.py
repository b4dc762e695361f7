"""Plain-data events the bindings hand to callbacks (no cffi objects escape the package)."""

from __future__ import annotations

import dataclasses
import enum

from .errors import CsError


class Reason(enum.IntEnum):
    """``cpg_reason_t``: why a member appears in a configuration change."""

    UNDEFINED = 0
    JOIN = 1
    LEAVE = 2
    NODEDOWN = 3
    NODEUP = 4
    PROCDOWN = 5

    @classmethod
    def of(cls, value: int) -> Reason:
        """Map a raw reason; values unknown to this table become UNDEFINED."""
        try:
            return cls(value)
        except ValueError:
            return cls.UNDEFINED


@dataclasses.dataclass(frozen=True, slots=True)
class Member:
    """One process in a group: identity is ``(nodeid, pid)``; *reason* only in confchg lists."""

    nodeid: int
    pid: int
    reason: Reason = Reason.UNDEFINED

    @property
    def ident(self) -> tuple[int, int]:
        return (self.nodeid, self.pid)


@dataclasses.dataclass(frozen=True, slots=True)
class Message:
    """One agreed-order delivery."""

    group: bytes
    nodeid: int
    pid: int
    data: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class ConfChg:
    """A group membership change, in the same order relative to messages on every member."""

    group: bytes
    members: tuple[Member, ...]
    left: tuple[Member, ...]
    joined: tuple[Member, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class TotemConfChg:
    """The totem ring changed (local notification; its position relative to messages differs
    between members, so it must not take part in replicated state)."""

    ring_nodeid: int
    ring_seq: int
    nodes: tuple[int, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class Lost:
    """The connection to the local corosync is gone.

    *op* is the call that noticed it, *code* what it returned, *unsent* the messages that were
    still in the outbound queue (dropped: after a reconnect the cluster layer resynchronises),
    *fd* the descriptor the event loop was polling: it is already closed (the handle finalized
    itself), so unregister it by this number; ``fileno()`` no longer answers.
    """

    op: str
    code: CsError | int
    unsent: int
    fd: int = -1


@dataclasses.dataclass(frozen=True, slots=True)
class QuorumChange:
    """votequorum's verdict for this partition, with the node ids it counts."""

    quorate: bool
    ring_seq: int
    nodes: tuple[int, ...]
