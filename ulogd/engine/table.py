"""The table of logs: one :class:`Entry` per log instance, and how log lines name a log.

:class:`~ulogd.engine.server.Server` keys its entries by ``(uuid, luid)``; an entry holds the
log's :class:`~ulogd.state.regionlog.RegionLog`, its state file, its device, its queue of
requests waiting for I/O or for the group, and its group.  :func:`tag` and :func:`about` are
how every line about a log names it.
"""

from __future__ import annotations

import errno
import os
from collections import deque
from dataclasses import dataclass, field

from ulogd.cluster.group import Group
from ulogd.engine.actions import (
    LogDevice,
)
from ulogd.protocol import wire
from ulogd.state.regionlog import RegionLog, Rejoin
from ulogd.state.statefile import LogState, MemoryState


@dataclass(eq=False)
class Entry:
    """One log instance in the table."""

    log: RegionLog
    state: LogState | MemoryState
    device: LogDevice | None
    key: tuple[str, int] = ("", 0)
    predecessor: tuple[str, int] | None = None
    queue: deque[wire.Request] = field(default_factory=deque)
    busy: bool = False
    group: Group | None = None
    resume_request: wire.Request | None = None  # RESUME waiting for the group's state
    carried: bool = False  # region state came from a reload's previous instance
    orphaned: Group | None = None  # a group whose corosync connection was lost
    cycling: bool = False  # a suspend/resume of the local mirror driven by ulogd is running
    #: what this node's kernel holds when the log joins its group (see RegionLog.node_rejoined)
    rejoin: Rejoin = Rejoin.FRESH
    #: restored from a state file in cluster mode: (resumed, halted, override) of this node's
    #: kernel, kept while the log rejoins its group; requests wait until it has
    restored_flags: tuple[bool, bool, bool] | None = None
    #: a restored huge log whose bitmaps are being counted off the event loop
    preparing: bool = False
    #: write-behind writes (clears only, already answered) not yet landed
    behind: int = 0

    @property
    def waiting(self) -> bool:
        """Requests must queue: disk I/O in flight, the group's state not here yet, or a
        restored log not counted yet."""
        return (
            self.busy
            or self.preparing
            or self.resume_request is not None
            or self.orphaned is not None
            or self.restored_flags is not None
        )


def tag(uuid: str) -> str:
    """How log lines name a log: the uuid's tail, as operators grep for it."""
    return f"[{uuid[-8:] or '?'}]"


def about(key: tuple[str, int]) -> dict[str, object]:
    """``extra=`` for a log record about one log: its whole identity, so that the control
    socket's last-error table (``ulogd.ops.control.LastErrors``) attributes the record to that
    log and no other (two uuids may share the tail a line shows)."""
    return {"ulogd_log": key}


def describe_oserror(exc: OSError) -> str:
    """``EROFS (Read-only file system)``: the cause of a resource fault, in one phrase."""
    code = exc.errno or errno.EIO
    return f"{errno.errorcode.get(code, f'errno {code}')} ({exc.strerror or os.strerror(code)})"


def error_of(exc: OSError) -> int:
    """The reply error for an OSError: its negated errno (``-EIO`` if it has none)."""
    return -(exc.errno or errno.EIO)
