"""The request engine: kernel datagrams in, actions out (sans-IO).

Theory of operation
-------------------
:class:`Server` owns the table of logs, keyed by ``(uuid, luid)``, and turns each decoded
request into calls on that log's :class:`~ulogd.regionlog.RegionLog` — which holds every rule
about region state — and into *actions* for the caller to perform:

* :class:`Send` — a reply datagram for the kernel;
* :class:`DiskRead` / :class:`DiskWrite` — I/O on a log device.  The caller performs it
  (the daemon in a per-device worker thread, the replay tool against an in-memory image) and
  reports back with :meth:`Server.disk_done`, which yields the actions that follow — usually
  the reply the kernel is waiting for.

While a log has disk I/O outstanding, further requests for *that* log wait in its queue, so
each log sees its requests in arrival order; other logs are served meanwhile.  The one
exception is a FLUSH whose write only records clears (not durable, see ulogd.regionlog): it
is answered together with its :class:`DiskWrite` (*write-behind*), and only the requests that
may close or hand over the device wait for that write to land.

Policies that are not about region state live here: CTR/DTR and the table of logs; a reload
(same uuid, new luid) carries the previous instance's region state over when the geometry
matches and no ``sync`` keyword asks for a full resync; a request that names an unknown log is
answered ``-ESRCH``, the one error that makes the kernel re-send CTR and RESUME; the CTR of
a reconnecting kernel (payload ending in NUL) re-attaches to the log restored from its state
file and never answers with a device name (the kernel gives that CTR no reply buffer).
Scalar state is saved to the log's state file before the reply that depends on it.

Faults and floods: an ``OSError`` while handling a request (EMFILE, EROFS, ENOSPC, ...) is
answered with its ``-errno`` and one line naming the log and the cause; a DTR whose state file
cannot be removed leaves it tombstoned (never restored) and retries the removal
(:meth:`Server.retry_removals`).  Lines that a flood could multiply — rejected datagrams,
requests for unknown logs, regions out of range, refused constructors, resource faults — go
through one rate limit per kind (:mod:`ulogd.ratelimit`, fed :attr:`Server.clock`), whose
"suppressed N similar lines" summaries keep nothing silent.  Every warning or error about a
log carries its identity (:func:`about`).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import struct
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ulogd import ctr, disklog, wire
from ulogd import protocol as p
from ulogd.cluster import group as g
from ulogd.cluster.group import Group
from ulogd.protocol import RequestType as T
from ulogd.ratelimit import RateLimiter
from ulogd.regionlog import RegionLog, Rejoin, Resume, initial_bit, initialise
from ulogd.statefile import LogState, MemoryState, StateDir, StateError, file_size

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
_CTR_REFUSED = "constructor refused"
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
_U64 = struct.Struct("=Q")
_S64 = struct.Struct("=q")
_PAIR = struct.Struct("=qQ")
_REGION_SYNC = struct.Struct("=Qq")


class LogDevice(Protocol):
    """What the server needs of an opened log device (see ``ulogd.disklog``)."""

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
    #: stay in the device's cache; see ulogd.regionlog)
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

#: requests that change replicated state: ordered through the group unless alone
GROUP_TYPES = frozenset(
    {
        T.MARK_REGION,
        T.CLEAR_REGION,
        T.FLUSH,
        T.GET_RESYNC_WORK,
        T.SET_REGION_SYNC,
        T.IS_REMOTE_RECOVERING,
    }
)
Continuation = Callable[[bytes | None, OSError | None], list[Action]]


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
    socket's last-error table (``ulogd.control.LastErrors``) attributes the record to that
    log and no other (two uuids may share the tail a line shows)."""
    return {"ulogd_log": key}


def describe_oserror(exc: OSError) -> str:
    """``EROFS (Read-only file system)``: the cause of a resource fault, in one phrase."""
    code = exc.errno or errno.EIO
    return f"{errno.errorcode.get(code, f'errno {code}')} ({exc.strerror or os.strerror(code)})"


def _error_of(exc: OSError) -> int:
    """The reply error for an OSError: its negated errno (``-EIO`` if it has none)."""
    return -(exc.errno or errno.EIO)


class Server:
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
        #: range, refused constructors, resource faults (a window per kind; ulogd.ratelimit)
        self.limiter = RateLimiter()
        self._orphan_since: dict[tuple[tuple[str, int], int], float] = {}
        #: state files of destroyed logs whose removal failed: path → inode (see
        #: :meth:`retry_removals`); each also carries the DESTROYED tombstone
        self.unremoved: dict[Path, int] = {}
        self._handlers: dict[int, Callable[[Entry, wire.Request], list[Action]]] = {
            T.DTR: self._dtr,
            T.PRESUSPEND: self._presuspend,
            T.POSTSUSPEND: self._postsuspend,
            T.RESUME: self._resume,
            T.GET_REGION_SIZE: self._get_region_size,
            T.IS_CLEAN: self._is_clean,
            T.IN_SYNC: self._in_sync,
            T.FLUSH: self._flush,
            T.MARK_REGION: self._mark,
            T.CLEAR_REGION: self._clear,
            T.GET_RESYNC_WORK: self._get_resync_work,
            T.SET_REGION_SYNC: self._set_region_sync,
            T.GET_SYNC_COUNT: self._get_sync_count,
            T.STATUS_INFO: self._status_info,
            T.STATUS_TABLE: self._status_table,
            T.IS_REMOTE_RECOVERING: self._is_remote_recovering,
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
        group = entry.group
        try:
            if group is not None and request.request_type in GROUP_TYPES and not group.direct:
                actions = self._group_actions(entry, group.submit(request))
            else:
                actions = self._handlers[request.request_type](entry, request)
        except OSError as exc:
            actions = self._failed(request, exc)
        rl = entry.log
        if rl.scalars_changed:
            entry.state.save_scalars(rl.scalars())
            rl.scalars_changed = False
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
        return [self._reply(request, _error_of(exc))]

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

    # ------------------------------------------------------------------ life cycle
    def _ctr(self, request: wire.Request) -> list[Action]:
        if self.unremoved:
            self.retry_removals()
        reconnect = request.data.endswith(b"\0")
        try:
            config = ctr.parse(request.data)
        except ctr.CtrError as exc:
            if self._admit(_CTR_REFUSED):
                log.error(
                    "%s CTR %r refused: %s",
                    tag(request.uuid),
                    request.data,
                    exc,
                    extra=about(request.key),
                )
            return [self._reply(request, exc.reply_error)]
        if not request.uuid:
            log.error("CTR without a uuid refused")
            return [self._reply(request, p.EINVAL)]
        existing = self.logs.get(request.key)
        if existing is not None:
            if existing.log.config.text != config.text:
                log.error(
                    "%s CTR %r: log luid=%#x already exists as %r",
                    tag(request.uuid),
                    config.text,
                    request.luid,
                    existing.log.config.text,
                    extra=about(request.key),
                )
                return [self._reply(request, p.EEXIST)]
            log.info(
                "%s CTR %s: re-attached to the existing log",
                tag(request.uuid),
                "(reconnect)" if reconnect else "(repeated)",
            )
            return [self._ctr_reply(request, config, reconnect, existing.device)]
        building = self._building.get(request.key)
        if building is not None:
            building.append(request)  # answered once its state file is ready
            return []
        try:
            device = self._open_device(config) if config.log_device else None
        except DeviceError as exc:
            log.error(
                "%s CTR %r: log device: %s",
                tag(request.uuid),
                config.text,
                exc,
                extra=about(request.key),
            )
            return [self._reply(request, -exc.errno)]
        offload = self.offload_bytes
        if (
            self.state_dir is not None
            and offload is not None
            and file_size(config.region_count) >= offload
        ):
            return self._ctr_offloaded(request, config, device, reconnect)
        try:
            entry = self._create(request.uuid, request.luid, config, device)
        except (OSError, StateError, MemoryError) as exc:
            return [self._ctr_failed(request, config, device, exc)]
        return self._ctr_finish(request, config, reconnect, entry)

    def _ctr_failed(
        self, request: wire.Request, config: ctr.LogConfig, device: LogDevice | None,
        exc: BaseException,
    ) -> Send:  # fmt: skip
        """The log's state file could not be made (full run directory, descriptor limit...):
        one line, an error reply; nothing of the log is left."""
        if device is not None:
            device.close()
        if isinstance(exc, OSError):
            err = exc.errno or errno.EIO
        else:
            err = errno.ENOMEM if isinstance(exc, MemoryError) else errno.EINVAL
        log.error(
            "%s CTR luid=%#x %r refused: its state file (%d bytes) cannot be made: %s",
            tag(request.uuid),
            request.luid,
            config.text,
            file_size(config.region_count),
            describe_oserror(exc) if isinstance(exc, OSError) else exc,
            extra=about(request.key),
        )
        return self._reply(request, -err)

    def _ctr_offloaded(
        self,
        request: wire.Request,
        config: ctr.LogConfig,
        device: LogDevice | None,
        reconnect: bool,
    ) -> list[Action]:
        """A huge log: its state file is built by a :class:`Prepare` job; the CTR (and any
        repeat of it) is answered when the file is ready."""
        assert self.state_dir is not None
        key = request.key
        self._building[key] = [request]
        job = functools.partial(
            self.state_dir.create,
            request.uuid,
            request.luid,
            config.region_count,
            config.region_size,
            config.text,
            initial_bit(config),
        )

        def built(state: Any, error: BaseException | None) -> list[Action]:
            waiting = self._building.pop(key)
            if error is not None:
                failed: list[Action] = [self._ctr_failed(request, config, device, error)]
                return failed + [self._reply(r, -errno.EAGAIN) for r in waiting[1:]]
            entry = self._entry(config, state, device, key)
            actions = self._ctr_finish(request, config, reconnect, entry)
            for later in waiting[1:]:
                actions += self._ctr(later)
            return actions

        token = self._token()
        self._preparing[token] = built
        log.info(
            "%s CTR luid=%#x: building its %d-byte state file beside the other logs",
            tag(request.uuid),
            request.luid,
            file_size(config.region_count),
        )
        return [Prepare(token, job, request.uuid)]

    def _ctr_finish(
        self, request: wire.Request, config: ctr.LogConfig, reconnect: bool, entry: Entry
    ) -> list[Action]:
        if reconnect:
            # The kernel reconnected but nothing of this log was kept: it may be writing
            # regions the group holds for this node; they stay its marks.
            entry.rejoin = Rejoin.UNION
        if _ctr_device_name(request, config, entry.device, reconnect) is None:
            log.error(
                "%s CTR %r: log device name too long",
                tag(request.uuid),
                config.text,
                extra=about(request.key),
            )
            if entry.device is not None:
                entry.device.close()
            self._remove_state(entry.state)
            return [self._reply(request, -errno.ENAMETOOLONG)]
        predecessor = self._predecessor(request.uuid, request.luid, config)
        if predecessor is not None:
            entry.predecessor, previous = predecessor
            entry.log.adopt(previous.log)
            log.info(
                "%s reload: carried region state over from luid=%#x (%d/%d in sync)",
                tag(request.uuid),
                entry.predecessor[1],
                entry.log.sync_count,
                entry.log.region_count,
            )
        self.logs[request.key] = entry
        entry.state.save_scalars(entry.log.scalars())
        entry.log.scalars_changed = False
        log.info(
            "%s CTR luid=%#x %s: %d regions of %d sectors",
            tag(request.uuid),
            request.luid,
            config.text,
            config.region_count,
            config.region_size,
        )
        return [self._ctr_reply(request, config, reconnect, entry.device)]

    def _ctr_reply(
        self,
        request: wire.Request,
        config: ctr.LogConfig,
        reconnect: bool,
        device: LogDevice | None = None,
    ) -> Send:
        # Protocol >= 2 registers the named log device with the kernel; the reconnect CTR has
        # no reply buffer, so it must be answered without a payload.
        name = _ctr_device_name(request, config, device, reconnect)
        if name is None:
            return self._reply(request, -errno.ENAMETOOLONG)
        return self._reply(request, 0, name)

    def _create(
        self, uuid: str, luid: int, config: ctr.LogConfig, device: LogDevice | None
    ) -> Entry:
        if self.state_dir is not None:
            state: LogState | MemoryState = self.state_dir.create(
                uuid, luid, config.region_count, config.region_size, config.text,
                initial_bit(config),
            )  # fmt: skip
        else:
            state = MemoryState(config.region_count)
            initialise(config, state.clean, state.sync)
        return self._entry(config, state, device, (uuid, luid))

    def _entry(
        self,
        config: ctr.LogConfig,
        state: LogState | MemoryState,
        device: LogDevice | None,
        key: tuple[str, int],
    ) -> Entry:
        """A new log on bitmaps built with :func:`initial_bit` (not counted again)."""
        rl = RegionLog(
            config,
            state.clean,
            state.sync,
            local_node=self.local_node,
            device_id=_device_id(device, config),
            mine=state.mine,
            sync_count=config.region_count * initial_bit(config),
        )
        return Entry(rl, state, device, key)

    def _open_device(self, config: ctr.LogConfig) -> LogDevice:
        assert config.log_device is not None
        if self.open_device is None:
            raise DeviceError(errno.ENODEV, "this server has no access to log devices")
        device = self.open_device(config.log_device)
        try:
            disklog.check_device_size(device.size_bytes, config.region_count, device.block_size)
        except disklog.DiskFormatError as exc:
            device.close()
            raise DeviceError(errno.ENOSPC, str(exc)) from None
        return device

    def _predecessor(
        self, uuid: str, luid: int, config: ctr.LogConfig
    ) -> tuple[tuple[str, int], Entry] | None:
        if config.sync is ctr.SyncMode.SYNC:
            return None  # the table asks for a full resync
        for key, entry in self.logs.items():
            if key[0] == uuid and key[1] != luid and entry.log.config.same_geometry(config):
                return key, entry
        return None

    def restore(self, states: list[LogState]) -> list[Action]:
        """Re-create the logs of a previous daemon from their state files.

        This node's kernel still holds the marks it was acknowledged (its own-marks bitmap).
        In cluster mode a clustered log rejoins its group at once, before it answers any
        request (they wait, as for a joiner): the kernel will not reconnect by itself, and
        its marks must be re-asserted in the group before anything else is applied."""
        actions: list[Action] = []
        for state in states:
            ident = state.identity
            if state.destroyed:
                self._restore_destroyed(state)
                continue
            try:
                config = ctr.parse(ident.ctr_text.encode())
                if (config.region_count, config.region_size) != (
                    ident.region_count,
                    ident.region_size,
                ):
                    raise ctr.CtrError(22, "geometry differs from the constructor text")
                scalars = state.load_scalars()
            except (ctr.CtrError, StateError) as exc:
                state.close()
                if self.state_dir is not None:
                    self.state_dir.set_aside(state.path, f"{tag(ident.uuid)} {exc}")
                continue
            device = None
            if config.log_device:
                try:
                    device = self._open_device(config)
                except (DeviceError, OSError) as exc:
                    log.error(
                        "%s restored log: log device %s unavailable (%s); flushes will "
                        "fail with -EIO",
                        tag(ident.uuid),
                        config.log_device,
                        exc,
                        extra=about((ident.uuid, ident.luid)),
                    )
            # A huge log is counted by a Prepare job (requests for it wait meanwhile); a
            # clustered one in cluster mode rejoins its group at once, so it is counted here.
            deferred = (
                self.offload_bytes is not None
                and state.size >= self.offload_bytes
                and not (self.cluster and config.clustered)
            )
            try:
                rl = RegionLog(
                    config,
                    state.clean,
                    state.sync,
                    local_node=self.local_node,
                    device_id=_device_id(device, config),
                    mine=state.mine,
                    sync_count=0 if deferred else None,
                )
                rl.restore_scalars(scalars)
            except ValueError as exc:
                if device is not None:
                    device.close()
                state.close()
                if self.state_dir is not None:
                    self.state_dir.set_aside(state.path, f"{tag(ident.uuid)} {exc}")
                continue
            if config.log_device and device is None:
                rl.disk_failed = True
            key = (ident.uuid, ident.luid)
            entry = Entry(rl, state, device, key, rejoin=Rejoin.REPLACE)
            self.logs[key] = entry
            if deferred:
                entry.preparing = True
                token = self._token()
                self._preparing[token] = functools.partial(self._counted, entry)
                actions.append(Prepare(token, state.census, ident.uuid))
                log.info(
                    "%s restored luid=%#x from %s: counting its %d regions beside the other logs",
                    tag(ident.uuid),
                    ident.luid,
                    state.path.name,
                    rl.region_count,
                )
                continue
            rl.restore_own_marks()
            log.info(
                "%s restored luid=%#x from %s: %s",
                tag(ident.uuid),
                ident.luid,
                state.path.name,
                rl.describe(),
            )
            if self.cluster and config.clustered and rl.resumed:
                entry.restored_flags = (rl.resumed, rl.recovery_halted, rl.in_sync_override)
                entry.group = Group(rl, (self.local_node, self.member_pid), rejoin=Rejoin.REPLACE)
                log.info(
                    "%s restored log rejoins its process group before it answers",
                    tag(ident.uuid),
                )
                actions.append(Join(key, ident.uuid.encode() + b"\0"))
        return actions

    def _restore_destroyed(self, state: LogState) -> None:
        """A tombstoned file (its log's DTR could not remove it): never restored."""
        ident = state.identity
        failure = self._remove_state(state)
        if failure is None:
            log.info(
                "%s state file %s of luid=%#x, destroyed before the restart: removed, not restored",
                tag(ident.uuid),
                state.path.name,
                ident.luid,
            )
        else:
            log.error(
                "%s state file %s of luid=%#x belongs to a destroyed log: not restored; "
                "removing it failed (%s), retried later",
                tag(ident.uuid),
                state.path.name,
                ident.luid,
                describe_oserror(failure),
                extra=about((ident.uuid, ident.luid)),
            )

    def _counted(self, entry: Entry, result: Any, error: BaseException | None) -> list[Action]:
        """A restored huge log's census is in: it answers from now on."""
        rl = entry.log
        if entry.state is not getattr(self.logs.get(entry.key), "state", None):
            return []  # removed meanwhile
        if error is None:
            rl.sync_count, marks = result
            rl.restore_own_marks(marks)
        else:  # counted here instead: slower, never wrong
            log.error("%s counting the restored log failed (%s): counting it here",
                      tag(entry.key[0]), error)  # fmt: skip
            rl.sync_count = rl.sync.count(1, 0, rl.region_count)
            rl.restore_own_marks()
        entry.preparing = False
        log.info("%s restored luid=%#x: %s", tag(entry.key[0]), entry.key[1], rl.describe())
        return self._drain(entry)

    def _dtr(self, entry: Entry, request: wire.Request) -> list[Action]:
        actions: list[Action] = []
        if entry.group is not None:
            log.warning(
                "%s DTR before POSTSUSPEND: leaving the group",
                tag(request.uuid),
                extra=about(request.key),
            )
            entry.group.leave_now()
            entry.group = None
            actions.append(Leave(request.key))
        del self.logs[request.key]
        if entry.device is not None:
            try:
                entry.device.close()
            except OSError as exc:  # the log goes all the same, its file with it
                log.warning(
                    "%s DTR: closing the log device failed: %s",
                    tag(request.uuid),
                    describe_oserror(exc),
                    extra=about(request.key),
                )
        failure = self._remove_state(entry.state)
        if failure is not None:
            # The kernel has forgotten the log whatever the reply says; the file's tombstone
            # keeps it from coming back at the next start.
            log.error(
                "%s DTR luid=%#x: its state file could not be removed (%s); it is marked "
                "destroyed, never restored, and its removal is retried",
                tag(request.uuid),
                request.luid,
                describe_oserror(failure),
                extra=about(request.key),
            )
            return [*actions, self._reply(request, _error_of(failure))]
        log.info("%s DTR luid=%#x", tag(request.uuid), request.luid)
        return [*actions, self._reply(request)]

    def _presuspend(self, entry: Entry, request: wire.Request) -> list[Action]:
        return [self._reply(request, entry.log.presuspend())]

    def _postsuspend(self, entry: Entry, request: wire.Request) -> list[Action]:
        if entry.group is not None and entry.cycling:
            return [self._reply(request)]  # our own recovery cycle: stay in the group
        if entry.group is not None:
            return self._group_actions(entry, entry.group.postsuspend(request))
        entry.log.postsuspend()
        return self._write_then_reply(entry, request)

    def _resume(self, entry: Entry, request: wire.Request) -> list[Action]:
        rl = entry.log
        if entry.predecessor is not None and not rl.resumed:
            previous = self.logs.get(entry.predecessor)
            if previous is not None:
                rl.adopt(previous.log)  # its final state, now that it is suspended
                entry.carried = True
            entry.predecessor = None
        if entry.cycling and entry.group is not None and entry.group.phase is g.Phase.VALID:
            rl.resume_member()  # the kernel resets its hint and asks for resync work again
            return [self._reply(request)]
        if self.cluster and rl.config.clustered and entry.group is None:
            entry.group = Group(rl, (self.local_node, self.member_pid), rejoin=entry.rejoin)
            entry.resume_request = request
            log.info("%s RESUME: joining the log's process group", tag(request.uuid))
            return [Join(request.key, request.uuid.encode() + b"\0")]
        return self._resume_locally(entry, request)

    def _resume_locally(self, entry: Entry, request: wire.Request) -> list[Action]:
        rl = entry.log
        if rl.resume() is Resume.DONE:
            return [self._reply(request)]
        if entry.device is None:
            rl.load_disk(None, 0, read_failed=True)
            return [self._reply(request, p.EIO)]
        device = entry.device
        nbytes = disklog.io_size(rl.region_count, device.block_size)

        def loaded(data: bytes | None, error: OSError | None) -> list[Action]:
            if error is not None or data is None:
                log.error(
                    "%s RESUME: reading the log device failed: %s",
                    tag(request.uuid),
                    error,
                    extra=about(request.key),
                )
                rl.load_disk(None, 0, read_failed=True)
            else:
                try:
                    image = disklog.parse_image(data, rl.region_count)
                except disklog.DiskFormatError as exc:
                    log.error(
                        "%s RESUME: on-disk log unusable (%s): resyncing every region",
                        tag(request.uuid),
                        exc,
                        extra=about(request.key),
                    )
                    rl.load_disk(None, 0, read_failed=False)
                else:
                    if not image.valid:
                        log.info(
                            "%s RESUME: no valid log on the device: initialising it",
                            tag(request.uuid),
                        )
                    rl.load_disk(
                        image.clean if image.valid else None, image.nr_regions, read_failed=False
                    )
            log.info("%s RESUME: %s", tag(request.uuid), rl.describe())
            self._save(entry)
            return self._write_then_reply(entry, request)

        return self._io(entry, DiskRead(self._token(), device, nbytes, request.uuid), loaded)

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

        A lost clear costs only a needless resync (see ulogd.regionlog), so the kernel need not
        wait for it.  The write is queued before the reply goes out, on the worker that does
        this device's writes in order, so a later durable write lands after it; requests that
        may close or hand over the device (:data:`_AFTER_BEHIND`) wait until it has landed.
        If it fails, the log is marked failed and its next flush writes the whole unit
        durably (and answers for it)."""
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
            entry.state.save_scalars(entry.log.scalars())
            entry.log.scalars_changed = False

    # ------------------------------------------------------------------ region requests
    def _get_region_size(self, entry: Entry, request: wire.Request) -> list[Action]:
        return [self._reply(request, 0, _U64.pack(entry.log.config.region_size))]

    def _is_clean(self, entry: Entry, request: wire.Request) -> list[Action]:
        err, value = entry.log.is_clean(_U64.unpack(request.data)[0])
        return [self._reply(request, err, _S64.pack(value))]

    def _in_sync(self, entry: Entry, request: wire.Request) -> list[Action]:
        err, value = entry.log.in_sync(_U64.unpack(request.data)[0])
        return [self._reply(request, err, _S64.pack(value))]

    def _flush(self, entry: Entry, request: wire.Request) -> list[Action]:
        marks = _regions(request.data)
        rl = entry.log
        err = rl.flush(self.local_node, marks)
        if err:
            return [self._reply(request, err)]
        if marks:
            rl.kernel_marked(marks)
        return self._write_then_reply(entry, request)

    def _mark(self, entry: Entry, request: wire.Request) -> list[Action]:
        regions = _regions(request.data)
        err = entry.log.mark(self.local_node, regions)
        if not err:
            entry.log.kernel_marked(regions)
        return [self._reply(request, err)]

    def _clear(self, entry: Entry, request: wire.Request) -> list[Action]:
        regions = _regions(request.data)
        err = entry.log.clear(self.local_node, regions)
        if not err:
            entry.log.kernel_cleared(regions)
        return [self._reply(request, err)]

    def _get_resync_work(self, entry: Entry, request: wire.Request) -> list[Action]:
        return [self._reply(request, 0, _PAIR.pack(*entry.log.get_resync_work(self.local_node)))]

    def _set_region_sync(self, entry: Entry, request: wire.Request) -> list[Action]:
        region, in_sync = _REGION_SYNC.unpack(request.data)
        return [
            self._reply(request, entry.log.set_region_sync(self.local_node, region, bool(in_sync)))
        ]

    def _get_sync_count(self, entry: Entry, request: wire.Request) -> list[Action]:
        return [self._reply(request, 0, _U64.pack(entry.log.sync_count))]

    def _status_info(self, entry: Entry, request: wire.Request) -> list[Action]:
        return [self._reply(request, 0, entry.log.status_info().encode() + b"\0")]

    def _status_table(self, entry: Entry, request: wire.Request) -> list[Action]:
        return [self._reply(request, 0, entry.log.status_table().encode() + b"\0")]

    def _is_remote_recovering(self, entry: Entry, request: wire.Request) -> list[Action]:
        region = _U64.unpack(request.data)[0]
        err, recovering, hint = entry.log.is_remote_recovering(self.local_node, region)
        return [self._reply(request, err, _PAIR.pack(recovering, hint))]

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
            entry.orphaned.own_marks = sorted(
                r for r, nodes in entry.log.holders.items() if self.local_node in nodes
            )
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

    def dump(self) -> list[str]:
        """One line per log (SIGUSR1)."""
        return [
            f"{tag(uuid)} luid={luid:#x} {entry.log.describe()}"
            + (f" queued={len(entry.queue)}" if entry.queue else "")
            for (uuid, luid), entry in sorted(self.logs.items())
        ]

    def close(self) -> None:
        for entry in self.logs.values():
            if entry.device is not None:
                entry.device.close()
            entry.state.close()


def _regions(data: bytes) -> memoryview | tuple[()]:
    return memoryview(data).cast("Q") if data else ()


def _ctr_device_name(
    request: wire.Request, config: ctr.LogConfig, device: LogDevice | None, reconnect: bool
) -> bytes | None:
    """The CTR reply payload: the log device's name for protocol >= 2 (b"" otherwise), as
    ``MAJ:MIN`` when the path does not fit the kernel's 128-byte buffer; None if nothing fits."""
    if not config.log_device or request.version < 2 or reconnect:
        return b""
    name = config.log_device.encode() + b"\0"
    if len(name) > _CTR_REPLY_CAPACITY and device is not None and device.rdev is not None:
        name = f"{device.rdev[0]}:{device.rdev[1]}".encode() + b"\0"
    return name if len(name) <= _CTR_REPLY_CAPACITY else None


_CTR_REPLY_CAPACITY = p.SPECS[T.CTR].reply_capacity


def _device_id(device: LogDevice | None, config: ctr.LogConfig) -> str | None:
    if not config.log_device:
        return None
    if device is not None and device.rdev is not None:
        return f"{device.rdev[0]}:{device.rdev[1]}"
    return config.log_device
