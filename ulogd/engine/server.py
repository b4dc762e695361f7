"""The request engine: kernel datagrams in, actions out (sans-IO).

Theory of operation
-------------------
:class:`Server` owns the table of logs, keyed by ``(uuid, luid)``, and turns each decoded
request into calls on that log's :class:`~ulogd.state.regionlog.RegionLog` — which holds every rule
about region state — and into *actions* for the caller to perform:

* :class:`Send` — a reply datagram for the kernel;
* :class:`DiskRead` / :class:`DiskWrite` — I/O on a log device.  The caller performs it
  (the daemon in a per-device worker thread, the replay tool against an in-memory image) and
  reports back with :meth:`Server.disk_done`, which yields the actions that follow — usually
  the reply the kernel is waiting for.

While a log has disk I/O outstanding, further requests for *that* log wait in its queue, so
each log sees its requests in arrival order; other logs are served meanwhile.  The one
exception is a FLUSH whose write only records clears (not durable, see ulogd.state.regionlog):
it is answered together with its :class:`DiskWrite` (*write-behind*), and only the requests
that may close or hand over the device wait for that write to land.

Policies that are not about region state live here and in its life cycle
(:mod:`ulogd.engine.lifecycle`: CTR, DTR, suspend, resume, restore, reloads): a request that
names an unknown log is answered ``-ESRCH``, the one error that makes the kernel re-send CTR and
RESUME; every other request is served through its row of :data:`ulogd.state.requests.OPERATIONS`
(:meth:`Server._dispatch`).  Scalar state is saved to the log's state file before the reply
that depends on it.

Faults and floods: an ``OSError`` while handling a request (EMFILE, EROFS, ENOSPC, ...) is
answered with its ``-errno`` and one line naming the log and the cause; a DTR whose state file
cannot be removed leaves it tombstoned (never restored) and retries the removal
(:meth:`Server.retry_removals`).  Lines that a flood could multiply — rejected datagrams,
requests for unknown logs, regions out of range, refused constructors, resource faults — go
through one rate limit per kind (:mod:`ulogd.engine.ratelimit`, fed :attr:`Server.clock`), whose
"suppressed N similar lines" summaries keep nothing silent.  Every warning or error about a
log carries its identity (:func:`about`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ulogd.cluster import group as g
from ulogd.cluster.group import Group
from ulogd.engine.actions import (
    Action,
    ClusterSend,
    Continuation,
    Cycle,
    DeviceOpener,
    DiskRead,
    DiskWrite,
    Join,
    Leave,
    Send,
)
from ulogd.engine.lifecycle import LifeCycle
from ulogd.engine.ratelimit import RateLimiter
from ulogd.engine.table import Entry, about, describe_oserror, error_of, tag
from ulogd.engine.view import GroupView, LogView, OrphanView
from ulogd.protocol import spec as p
from ulogd.protocol import wire
from ulogd.protocol.spec import RequestType as T
from ulogd.state import disklog
from ulogd.state.regionlog import Rejoin
from ulogd.state.requests import OPERATIONS, ORDERED
from ulogd.state.statefile import LogState, MemoryState, StateDir

log = logging.getLogger(__name__)

_CTR = int(T.CTR)  # a plain int: compared on every request
_FLUSH = int(T.FLUSH)
#: requests that wait for a log's write-behind (see Server._write_behind) to land: the ones
#: that may close or hand over its device, or start from what is on it
_AFTER_BEHIND = frozenset(int(t) for t in (T.DTR, T.PRESUSPEND, T.POSTSUSPEND, T.RESUME, T.CTR))
#: the kinds of rate-limited lines (see Server.limiter)
_FOREIGN = "rejected datagram not from the kernel"
_MALFORMED = "rejected datagram"
_UNKNOWN = "request for an unknown log"
_OUT_OF_RANGE = "region out of range"
_FAULT = "request failed on a resource fault"
_REGION_TYPES = frozenset(
    int(t)
    for t in (
        T.MARK_REGION,
        T.CLEAR_REGION,
        T.FLUSH,
        T.IS_CLEAN,
        T.IN_SYNC,
        T.SET_REGION_SYNC,
        T.IS_REMOTE_RECOVERING,
    )
)


#: requests that change replicated state: ordered through the group unless alone
GROUP_TYPES = ORDERED


class Server(LifeCycle):
    """The table of logs and the request dispatcher (see the module docstring)."""

    def __init__(
        self,
        *,
        state_dir: StateDir | None = None,
        open_device: DeviceOpener | None = None,
        local_node: int = 0,
        layout: wire.Layout = wire.CURRENT,
        cluster: bool = False,
        member_pid: int = 0,
        clock: Callable[[], float] = time.monotonic,
        offload_bytes: int | None = None,
    ) -> None:
        self.state_dir = state_dir
        #: state files of at least this size are built and counted by :class:`Prepare`
        #: actions (None: always here, as tests and the replay tool want)
        self.offload_bytes = offload_bytes
        self._preparing: dict[int, Callable[[Any, BaseException | None], list[Action]]] = {}
        self._building: dict[tuple[str, int], list[wire.Request]] = {}
        self.open_device = open_device
        self.local_node = local_node
        #: clustered-* logs join a process group (else they run as a group of one)
        self.cluster = cluster
        self.member_pid = member_pid
        self.layout = layout
        self.logs: dict[tuple[str, int], Entry] = {}
        self._pending: dict[int, tuple[Entry, Continuation]] = {}
        self._behind: set[int] = set()  # tokens of write-behind writes
        self._next_token = 1
        self._counts: dict[tuple[int, int], int] = {}  # (type, error) → replies
        self.rejected: Counter[str] = Counter()
        #: the clock of the rate limits (seconds; tests pass their own)
        self.clock = clock
        #: lines a flood could multiply: rejected datagrams, unknown logs, regions out of
        #: range, refused constructors, resource faults (a window per kind; ulogd.engine.ratelimit)
        self.limiter = RateLimiter()
        self._orphan_since: dict[tuple[tuple[str, int], int], float] = {}
        #: state files of destroyed logs whose removal failed: path → inode (see
        #: :meth:`retry_removals`); each also carries the DESTROYED tombstone
        self.unremoved: dict[Path, int] = {}
        #: the life-cycle requests (rows without a RegionLog operation: ulogd.state.requests)
        self._lifecycle: dict[int, Callable[[Entry, wire.Request], list[Action]]] = {
            T.DTR: self._dtr,
            T.PRESUSPEND: self._presuspend,
            T.POSTSUSPEND: self._postsuspend,
            T.RESUME: self._resume,
        }

    # ------------------------------------------------------------------ entry points
    def receive(
        self, datagram: bytes | bytearray | memoryview, sender_port: int = 0
    ) -> list[Action]:
        """Handle one datagram from the transport."""
        request = wire.decode(datagram, self.layout, sender_port)
        if isinstance(request, wire.Rejected):
            return self._rejected(request)
        return self.handle(request)

    def handle(self, request: wire.Request) -> list[Action]:
        if request.request_type == _CTR:
            try:
                return self._ctr(request)
            except OSError as exc:
                return self._failed(request, exc)
        entry = self.logs.get((request.uuid, request.luid))
        if entry is None:
            if self._admit(_UNKNOWN):
                log.info(
                    "%s %s for unknown log luid=%#x: -ESRCH (the kernel will reconnect)",
                    tag(request.uuid),
                    p.type_name(request.request_type),
                    request.luid,
                )
            return [self._reply(request, p.ESRCH)]
        if entry.waiting or (
            entry.behind and (entry.queue or request.request_type in _AFTER_BEHIND)
        ):
            entry.queue.append(request)
            return []
        return self._dispatch(entry, request)

    def disk_done(self, token: int, data: Any, error: BaseException | None) -> list[Action]:
        """The outcome of a :class:`DiskRead`/:class:`DiskWrite` (or of a :class:`Prepare`);
        returns what follows."""
        if token in self._preparing:
            return self.prepared(token, data, error)
        assert error is None or isinstance(error, OSError)
        entry, continuation = self._pending.pop(token)
        if token in self._behind:
            self._behind.discard(token)
            entry.behind -= 1
        else:
            entry.busy = False
        return continuation(data, error) + self._drain(entry)

    def prepared(self, token: int, result: Any, error: BaseException | None) -> list[Action]:
        """The outcome of a :class:`Prepare` job; returns what follows."""
        return self._preparing.pop(token)(result, error)

    def _drain(self, entry: Entry) -> list[Action]:
        actions: list[Action] = []
        while not entry.waiting and entry.queue:
            if entry.behind and entry.queue[0].request_type in _AFTER_BEHIND:
                break
            actions += self._dispatch(entry, entry.queue.popleft())
        return actions

    # ------------------------------------------------------------------ plumbing
    def _admit(self, kind: str) -> bool:
        """Whether a line of ``kind`` is to be logged now (after the summaries due)."""
        now = self.clock()
        self.log_summaries(now)
        return self.limiter.admit(kind, now)

    def log_summaries(self, now: float | None = None) -> None:
        """Log "suppressed N similar lines" for each rate-limit window that is over (the
        daemon calls this periodically; every limited line does too)."""
        for summary in self.limiter.expired(self.clock() if now is None else now):
            log.warning("%s", summary.line())

    def _rejected(self, rejected: wire.Rejected) -> list[Action]:
        self.rejected[rejected.reason.split(" ", 1)[0]] += 1
        level = logging.WARNING if rejected.foreign else logging.ERROR
        if self._admit(_FOREIGN if rejected.foreign else _MALFORMED):
            log.log(
                level,
                "rejected datagram: %s%s",
                rejected.reason,
                "" if rejected.reply else " (no reply possible)",
            )
        return [Send(rejected.reply)] if rejected.reply else []

    def _reply(self, request: wire.Request, error: int = 0, payload: bytes = b"") -> Send:
        counts, key = self._counts, (request.request_type, error)
        counts[key] = counts.get(key, 0) + 1
        if error == p.EINVAL and request.request_type in _REGION_TYPES:
            self._out_of_range(request)
        return Send(wire.encode_reply(request, error, payload))

    def _out_of_range(self, request: wire.Request) -> None:
        """A region request answered -EINVAL: a region beyond the log's end (the only
        reason region requests are refused)."""
        if not self._admit(_OUT_OF_RANGE):
            return
        entry = self.logs.get(request.key)
        count = entry.log.region_count if entry is not None else 0
        data = request.data[:8] if request.request_type == T.SET_REGION_SYNC else request.data
        regions = memoryview(data[: len(data) - len(data) % 8]).cast("Q")
        beyond = next((r for r in regions if r >= count), None)
        log.warning(
            "%s %s luid=%#x: region %s is out of range (the log has %d regions): -EINVAL",
            tag(request.uuid),
            p.type_name(request.request_type),
            request.luid,
            beyond,
            count,
            extra=about(request.key),
        )

    @property
    def results(self) -> Counter[tuple[str, str]]:
        """Replies sent, by (request type name, errno name), for status and metrics."""
        named: Counter[tuple[str, str]] = Counter()
        for (rtype, error), count in self._counts.items():
            named[(p.type_name(rtype), p.errno_name(error))] += count
        return named

    def _dispatch(self, entry: Entry, request: wire.Request) -> list[Action]:
        """Serve one request through its row of :data:`ulogd.state.requests.OPERATIONS`: the
        group orders it, or the engine runs a life-cycle request, or the row's RegionLog
        operation answers it here."""
        row = OPERATIONS[request.request_type]
        apply = row.apply
        group = entry.group
        rl = entry.log
        try:
            if group is not None and row.ordered and not group.direct:
                actions = self._group_actions(entry, group.submit(request))
            elif apply is None:
                actions = self._lifecycle[request.request_type](entry, request)
            else:
                values = row.decode(request.data)
                err, payload = apply(rl, self.local_node, values)
                if err:
                    actions = [self._reply(request, err, payload)]
                else:
                    acknowledge = row.acknowledge
                    if acknowledge is not None:
                        acknowledge(rl, values)
                    if row.writes_disk:
                        actions = self._write_then_reply(entry, request)
                    else:
                        actions = [self._reply(request, 0, payload)]
        except OSError as exc:
            actions = self._failed(request, exc)
        if rl.scalars_changed:  # saved before the reply that depends on them
            entry.state.save_scalars(rl.take_scalars())
        return actions

    def _failed(self, request: wire.Request, exc: OSError) -> list[Action]:
        """A resource fault (EMFILE, EROFS, ENOSPC, ...) while handling ``request``: one
        line naming the log and the cause, and the error reply the kernel is waiting for."""
        if self._admit(_FAULT):
            log.error(
                "%s %s luid=%#x failed: %s",
                tag(request.uuid),
                p.type_name(request.request_type),
                request.luid,
                describe_oserror(exc),
                extra=about(request.key),
            )
        return [self._reply(request, error_of(exc))]

    def _remove_state(self, state: LogState | MemoryState) -> OSError | None:
        """Remove a destroyed log's state file; on failure, the file keeps the DESTROYED
        tombstone (written first, through the mapping) and its removal is retried."""
        state.mark_destroyed()
        try:
            state.remove()
        except OSError as exc:
            if isinstance(state, LogState):
                with contextlib.suppress(OSError):  # nothing there: nothing to retry
                    self.unremoved[state.path] = os.stat(state.path).st_ino
            return exc
        return None

    def retry_removals(self) -> None:
        """Try again to remove the files of destroyed logs (the daemon calls this from a
        timer; CTR too).  A file replaced since (a new log of the same identity: another
        inode) is left alone."""
        for path, inode in list(self.unremoved.items()):
            try:
                if os.stat(path).st_ino == inode:
                    path.unlink()
                    log.info("state file %s of a destroyed log removed at last", path)
            except FileNotFoundError:
                pass
            except OSError:
                continue  # still failing: already reported when the log was destroyed
            del self.unremoved[path]

    def _io(self, entry: Entry, action: DiskRead | DiskWrite, then: Continuation) -> list[Action]:
        entry.busy = True
        self._pending[action.token] = (entry, then)
        return [action]

    def _token(self) -> int:
        token = self._next_token
        self._next_token += 1
        return token

    def _write_then_reply(
        self, entry: Entry, request: wire.Request, error: int = 0
    ) -> list[Action]:
        """Write the log's changed disk chunks (if any), then reply."""
        rl = entry.log
        work, durable = rl.take_disk_write()
        if work is False:
            return [self._reply(request, error)]
        if entry.device is None:
            return [self._reply(request, rl.disk_written(False))]
        chunks = None if work is None or work is True else work
        extents = disklog.plan_write(rl.clean, rl.region_count, chunks, entry.device.block_size)
        if not durable and request.request_type == _FLUSH and entry.group is None:
            return self._write_behind(entry, request, extents, error)

        def written(_data: bytes | None, exc: OSError | None) -> list[Action]:
            if exc is not None:
                log.error(
                    "%s %s: writing the log device failed: %s",
                    tag(request.uuid),
                    p.type_name(request.request_type),
                    exc,
                    extra=about(request.key),
                )
            result = rl.disk_written(exc is None)
            self._save(entry)
            return [self._reply(request, error or result)]

        return self._io(
            entry,
            DiskWrite(self._token(), entry.device, extents, request.uuid, durable),
            written,
        )

    def _write_behind(
        self, entry: Entry, request: wire.Request, extents: list[tuple[int, bytes]], error: int
    ) -> list[Action]:
        """A FLUSH whose write only records clears: answered at once, written behind it.

        A lost clear costs only a needless resync (see ulogd.state.regionlog), so the kernel
        need not wait for it.  The write is queued before the reply goes out, on the worker
        that does this device's writes in order, so a later durable write lands after it;
        requests that may close or hand over the device (:data:`_AFTER_BEHIND`) wait until it
        has landed.  If it fails, the log is marked failed and its next flush writes the whole
        unit durably (and answers for it)."""
        assert entry.device is not None
        rl = entry.log
        token = self._token()

        def landed(_data: bytes | None, exc: OSError | None) -> list[Action]:
            if exc is not None:
                log.error(
                    "%s FLUSH: writing the cleared regions to the log device failed: %s; the "
                    "next flush writes the whole log",
                    tag(request.uuid),
                    exc,
                    extra=about(request.key),
                )
                rl.disk_written(False)
                self._save(entry)
            return []

        entry.behind += 1
        self._behind.add(token)
        self._pending[token] = (entry, landed)
        write = DiskWrite(token, entry.device, extents, request.uuid, durable=False)
        return [write, self._reply(request, error)]

    def _save(self, entry: Entry) -> None:
        if entry.log.scalars_changed:
            entry.state.save_scalars(entry.log.take_scalars())

    # ------------------------------------------------------------------ cluster
    def group_confchg(
        self,
        key: tuple[str, int],
        members: list[tuple[int, int]],
        left: list[tuple[int, int]],
        joined: list[tuple[int, int]],
        nodeup: list[tuple[int, int]] | None = None,
        procdown: list[tuple[int, int]] | None = None,
    ) -> list[Action]:
        entry = self.logs.get(key)
        if entry is None or entry.group is None:
            return []
        change = entry.group.confchg(members, left, joined, nodeup or (), procdown or ())
        return self._group_actions(entry, change)

    def ring_changed(self, key: tuple[str, int], nodes: list[int]) -> list[Action]:
        """The totem ring as this log's handle sees it (corosync's totem confchg)."""
        entry = self.logs.get(key)
        if entry is None or entry.group is None:
            return []
        return self._group_actions(entry, entry.group.ring_changed(nodes))

    def group_deliver(
        self, key: tuple[str, int], sender: tuple[int, int], data: bytes
    ) -> list[Action]:
        entry = self.logs.get(key)
        if entry is None or entry.group is None:
            return []
        return self._group_actions(entry, entry.group.deliver(sender, data))

    def group_lost(self, key: tuple[str, int]) -> None:
        """The local corosync went away: hold this log's requests until it is back."""
        entry = self.logs.get(key)
        if entry is None or entry.group is None:
            return
        if entry.orphaned is None:  # keep the first incarnation: it holds the pending work
            log.error(
                "%s lost the local corosync: requests wait until it returns",
                tag(key[0]),
                extra=about(key),
            )
            entry.orphaned = entry.group
            entry.orphaned.own_marks = entry.log.marks_of(self.local_node)
        entry.group = None

    def rejoin(self, key: tuple[str, int]) -> list[Action]:
        """Join again after corosync returned; held requests are sent once state is back."""
        entry = self.logs.get(key)
        if entry is None or entry.orphaned is None:
            return []
        entry.group = Group(entry.log, (self.local_node, self.member_pid), rejoin=Rejoin.REPLACE)
        return [Join(key, key[0].encode() + b"\0")]

    def cycle_done(self, key: tuple[str, int], ok: bool, why: str = "") -> None:
        """The cycle of :class:`Cycle` ended; a failure is logged here, once, with ``why``."""
        entry = self.logs.get(key)
        if entry is not None:
            entry.cycling = False
            if not ok:
                log.error(
                    "%s the recovery cycle of the local mirror failed%s: regions lost by a "
                    "departed member are recovered at its next resume",
                    tag(key[0]),
                    f" ({why})" if why else "",
                    extra=about(key),
                )

    def set_quorate(self, quorate: bool) -> list[Action]:
        actions: list[Action] = []
        for entry in self.logs.values():
            if entry.group is not None:
                actions += self._group_actions(entry, entry.group.set_quorate(quorate))
        return actions

    def _group_actions(self, entry: Entry, actions: list[g.Action]) -> list[Action]:
        out: list[Action] = []
        key = entry.key
        for action in actions:
            if isinstance(action, g.Answer):
                out.append(self._reply(action.request, action.error, action.payload))
            elif isinstance(action, g.Multicast):
                out.append(ClusterSend(key, action.data))
            elif isinstance(action, g.WriteDisk):
                out += self._group_write(entry, action)
            elif isinstance(action, g.Ready):
                out += self._group_ready(entry, action.master)
            elif isinstance(action, g.Recover):
                if not entry.cycling:
                    entry.cycling = True
                    log.warning(
                        "%s %d region(s) must be recovered: cycling the local mirror so "
                        "its kernel asks for resync work",
                        tag(key[0]),
                        len(action.regions),
                        extra=about(key),
                    )
                    out.append(Cycle(key))
            elif isinstance(action, g.LeaveNow):
                entry.group = None
                out.append(Leave(key))
                entry.log.postsuspend()
                self._save(entry)
                out.append(self._reply(action.request))
        return out

    def _group_write(self, entry: Entry, action: g.WriteDisk) -> list[Action]:
        """This member is the disk server: write, then tell the group."""
        rl = entry.log
        group = entry.group
        if entry.device is None or group is None:
            return (
                self._group_actions(entry, group.disk_written(action.index, False)) if group else []
            )
        extents = disklog.plan_write(
            rl.clean, rl.region_count, action.chunks, entry.device.block_size
        )

        def written(_data: bytes | None, exc: OSError | None) -> list[Action]:
            if exc is not None:
                log.error(
                    "%s writing the shared log device failed: %s",
                    tag(entry.key[0]),
                    exc,
                    extra=about(entry.key),
                )
            if entry.group is None:
                return []
            return self._group_actions(entry, entry.group.disk_written(action.index, exc is None))

        write = DiskWrite(self._token(), entry.device, extents, entry.key[0])
        return self._io(entry, write, written)

    def _group_ready(self, entry: Entry, master: bool) -> list[Action]:
        rl = entry.log
        request = entry.resume_request
        entry.resume_request = None
        orphan, entry.orphaned = entry.orphaned, None
        actions: list[Action] = []
        if master:
            if not rl.resumed and not entry.carried:
                # First to resume: what the others wrote while this node was away is on the
                # shared device, not in this replica.
                rl.reread_disk_at_resume()
            entry.carried = False
            log.info(
                "%s first member of its group: its own state is the group's",
                tag(entry.key[0]),
            )
            if request is not None:
                actions += self._resume_locally(entry, request)
        elif entry.restored_flags is not None:
            # A restarted daemon: this node's kernel did not resume; its own flags stand.
            rl.rejoined_after_restart(*entry.restored_flags)
            self._save(entry)
            log.info("%s rejoined its group after a restart: %s", tag(entry.key[0]), rl.describe())
        else:
            rl.resume_member()
            self._save(entry)
            log.info("%s received the group's state: %s", tag(entry.key[0]), rl.describe())
            if request is not None:
                actions.append(self._reply(request))
        entry.restored_flags = None
        if orphan is not None and entry.group is not None:
            actions += self._group_actions(entry, entry.group.adopt_pending(orphan))
        return actions + self._drain(entry)

    # ------------------------------------------------------------------ introspection
    def orphan_report(self, now: float) -> list[tuple[tuple[str, int], int, int, float]]:
        """``(log, node, regions held, since)`` for every node whose daemon is gone while its
        marks are kept; ``since`` is when this daemon first reported it (``now`` the clock
        of the caller, which calls this periodically)."""
        report = []
        seen = set()
        for key, entry in sorted(self.logs.items()):
            rl = entry.log
            for node in sorted(rl.orphans):
                since = self._orphan_since.setdefault((key, node), now)
                held = sum(1 for h in rl.holders.values() if node in h)
                report.append((key, node, held, since))
                seen.add((key, node))
        for gone in set(self._orphan_since) - seen:
            del self._orphan_since[gone]
        return report

    def view(self, now: float) -> list[LogView]:
        """Every log, sorted by identity, as status, metrics and the dump show it (``now``: the
        caller's wall clock, which dates first-seen orphans: :meth:`orphan_report`)."""
        orphans: dict[tuple[str, int], list[OrphanView]] = {}
        for key, node, held, since in self.orphan_report(now):
            orphans.setdefault(key, []).append(OrphanView(node, held, since))
        views = []
        for (uuid, luid), entry in sorted(self.logs.items()):
            rl = entry.log
            config = rl.config
            recovering = rl.recovering >= 0
            views.append(
                LogView(
                    uuid=uuid,
                    luid=luid,
                    type_word=config.type_word,
                    target_sectors=config.target_sectors,
                    regions=rl.region_count,
                    region_size=config.region_size,
                    sync_mode=config.sync.value or "default",
                    block_on_error=config.block_on_error,
                    in_sync=rl.sync_count,
                    marked=len(rl.holders),
                    recovering=rl.recovering if recovering else None,
                    recoverer=rl.recoverer if recovering else None,
                    recovery_halted=rl.recovery_halted,
                    resumed=rl.resumed,
                    log_device=config.log_device,
                    device_id=rl.device_id,
                    has_disk=rl.has_disk,
                    health=rl.health(),
                    disk_failed=rl.disk_failed,
                    queued=len(entry.queue),
                    members=tuple(sorted(rl.members)),
                    orphans=tuple(orphans.get((uuid, luid), ())),
                    group=GroupView.of(entry.group) if entry.group is not None else None,
                    description=rl.describe(),
                )
            )
        return views

    def dump(self, now: float) -> list[str]:
        """One line per log (SIGUSR1)."""
        return [
            f"{tag(v.uuid)} luid={v.luid:#x} {v.description}"
            + (f" queued={v.queued}" if v.queued else "")
            for v in self.view(now)
        ]

    def close(self) -> None:
        for entry in self.logs.values():
            if entry.device is not None:
                entry.device.close()
            entry.state.close()
