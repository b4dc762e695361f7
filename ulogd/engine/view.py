"""A plain, read-only view of the server's logs: what status, metrics and the dump show.

Theory of operation
-------------------
Operators read the engine's state three ways — the control socket's ``status``
(:func:`ulogd.ops.control.snapshot`), the Prometheus metrics (:mod:`ulogd.ops.metrics`) and
the SIGUSR1 dump (:meth:`ulogd.engine.server.Server.dump`).  All three read the same frozen
dataclasses, built by :meth:`ulogd.engine.server.Server.view` on the loop thread, so none of
them reaches into
a :class:`~ulogd.state.regionlog.RegionLog` or a :class:`~ulogd.cluster.group.Group`, and
what one shows the others show alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ulogd.cluster.group import Group


@dataclass(frozen=True, slots=True)
class GroupView:
    """A clustered log's process group as this member sees it."""

    phase: str  # "joining", "valid", "left"
    quorate: bool
    members: tuple[tuple[int, int], ...]  # (node, pid), sorted
    disk_server: int | None
    in_flight: int
    unsent: int
    dropped: int

    @classmethod
    def of(cls, group: Group) -> GroupView:
        return cls(
            phase=group.phase.name.lower(),
            quorate=group.quorate,
            members=tuple(group.members),
            disk_server=group.disk_server,
            in_flight=group.in_flight,
            unsent=len(group.outbox),
            dropped=group.dropped,
        )


@dataclass(frozen=True, slots=True)
class OrphanView:
    """A node whose daemon is gone while its marks are kept (see ``Server.orphan_report``)."""

    node: int
    regions: int
    since: float


@dataclass(frozen=True, slots=True)
class LogView:
    """One log instance, as the operator sees it."""

    uuid: str
    luid: int
    type_word: str
    target_sectors: int
    regions: int
    region_size: int
    sync_mode: str
    block_on_error: bool
    in_sync: int
    marked: int
    recovering: int | None
    recoverer: int | None
    recovery_halted: bool
    resumed: bool
    log_device: str | None
    device_id: str | None
    has_disk: bool
    health: str
    disk_failed: bool
    queued: int
    members: tuple[int, ...]  # node ids of the region log's members, sorted
    orphans: tuple[OrphanView, ...]
    group: GroupView | None
    description: str  # RegionLog.describe(): the one-line summary of the dump and the logs

    @property
    def key(self) -> tuple[str, int]:
        return (self.uuid, self.luid)
