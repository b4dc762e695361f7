"""What the request engine hands its caller: the actions, and what it needs of a log device.

Theory of operation
-------------------
:class:`~ulogd.engine.server.Server` is sans-IO: every request, configuration change and
I/O completion returns a list of *actions* for the caller to perform — :class:`Send` a reply,
:class:`DiskRead` / :class:`DiskWrite` on a log device (reported back with
``Server.disk_done``), :class:`Prepare` heavy state-file work off the loop, :class:`Join` /
:class:`ClusterSend` / :class:`Leave` a log's process group, :class:`Cycle` the local mirror.
The daemon (:mod:`ulogd.edges.daemon`), the corosync edge, the synchronous runner
(:mod:`ulogd.engine.runner`) and the tests perform them; nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol


class LogDevice(Protocol):
    """What the server needs of an opened log device (see ``ulogd.state.disklog``)."""

    block_size: int
    size_bytes: int
    rdev: tuple[int, int] | None

    def read(self, nbytes: int) -> bytes: ...
    def write_extents(self, extents: list[tuple[int, bytes]], flush: bool = True) -> None: ...
    def close(self) -> None: ...


class DeviceError(Exception):
    """Opening a log device failed; ``errno`` is positive."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err


DeviceOpener = Callable[[str], LogDevice]


@dataclass(slots=True)
class Send:
    data: bytes


@dataclass(slots=True)
class DiskRead:
    token: int
    device: LogDevice
    nbytes: int
    uuid: str


@dataclass(slots=True)
class DiskWrite:
    token: int
    device: LogDevice
    extents: list[tuple[int, bytes]]
    uuid: str
    #: on stable storage before completion (False: a write that only records clears may
    #: stay in the device's cache; see ulogd.state.regionlog)
    durable: bool = True


@dataclass(slots=True)
class Join:
    """Join the log's process group (cluster mode): the caller opens a CPG handle and feeds
    its events to :meth:`Server.group_confchg` / :meth:`Server.group_deliver`."""

    key: tuple[str, int]
    name: bytes


@dataclass(slots=True)
class ClusterSend:
    key: tuple[str, int]
    data: bytes


@dataclass(slots=True)
class Leave:
    key: tuple[str, int]


@dataclass(slots=True)
class Cycle:
    """Suspend and resume this node's mirror that uses the log, so its kernel recovers the
    regions a departed member left out of sync; report back with :meth:`Server.cycle_done`."""

    key: tuple[str, int]


@dataclass(slots=True)
class Prepare:
    """Heavy state-file work for a worker thread: building a huge log's file at its CTR, or
    counting a restored one.  The caller runs ``job()`` off the event loop (it releases the
    interpreter lock in system calls or every few milliseconds) and reports its result or
    exception with :meth:`Server.prepared`; meanwhile every other log is served."""

    token: int
    job: Callable[[], Any]
    uuid: str


Action = Send | DiskRead | DiskWrite | Join | ClusterSend | Leave | Cycle | Prepare


Continuation = Callable[[bytes | None, OSError | None], list[Action]]
