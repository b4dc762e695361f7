"""A log's life cycle in the engine: CTR, DTR, suspend, resume, restore (part of Server).

Theory of operation
-------------------
CTR makes a log (its state file, its device, its entry in the table); a reload (same uuid,
new luid) carries the previous instance's region state over when the geometry matches and no
``sync`` keyword asks for a full resync; the CTR of a reconnecting kernel (payload ending in
NUL) re-attaches to the log restored from its state file and never answers with a device
name.  A huge log's state file is built, and a restored one counted, by a ``Prepare`` job
off the loop.  DTR removes the log (a state file that cannot be removed stays tombstoned);
PRESUSPEND/POSTSUSPEND/RESUME drive the RegionLog's life-cycle rules, RESUME of a disk log
reading the device first.  :meth:`LifeCycle.restore` rebuilds the table from the state files
of a previous daemon.

:class:`LifeCycle` holds these steps; :class:`~ulogd.engine.server.Server` is one (it owns
the table and the plumbing they use, declared below for the type checker).
"""

from __future__ import annotations

import errno
import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ulogd.cluster import group as g
from ulogd.cluster.group import Group
from ulogd.engine.actions import (
    Action,
    Continuation,
    DeviceError,
    DeviceOpener,
    DiskRead,
    DiskWrite,
    Join,
    Leave,
    LogDevice,
    Prepare,
    Send,
)
from ulogd.engine.table import Entry, about, describe_oserror, error_of, tag
from ulogd.protocol import ctr, wire
from ulogd.protocol import spec as p
from ulogd.protocol.spec import RequestType as T
from ulogd.state import disklog
from ulogd.state.regionlog import RegionLog, Rejoin, Resume, initial_bit, initialise
from ulogd.state.statefile import LogState, MemoryState, StateDir, StateError, file_size

log = logging.getLogger("ulogd.engine.server")

#: the kind of rate-limited line of a refused constructor (see Server.limiter)
_CTR_REFUSED = "constructor refused"


class LifeCycle:
    """The life-cycle steps of :class:`~ulogd.engine.server.Server`."""

    if TYPE_CHECKING:
        state_dir: StateDir | None
        offload_bytes: int | None
        open_device: DeviceOpener | None
        local_node: int
        cluster: bool
        member_pid: int
        logs: dict[tuple[str, int], Entry]
        unremoved: dict[Path, int]
        _preparing: dict[int, Callable[[Any, BaseException | None], list[Action]]]
        _building: dict[tuple[str, int], list[wire.Request]]

        def _reply(self, request: wire.Request, error: int = 0, payload: bytes = b"") -> Send: ...
        def _token(self) -> int: ...
        def _admit(self, kind: str) -> bool: ...
        def _remove_state(self, state: LogState | MemoryState) -> OSError | None: ...
        def retry_removals(self) -> None: ...
        def _save(self, entry: Entry) -> None: ...
        def _drain(self, entry: Entry) -> list[Action]: ...
        def _io(
            self, entry: Entry, action: DiskRead | DiskWrite, then: Continuation
        ) -> list[Action]: ...
        def _write_then_reply(
            self, entry: Entry, request: wire.Request, error: int = 0
        ) -> list[Action]: ...
        def _group_actions(self, entry: Entry, actions: list[g.Action]) -> list[Action]: ...

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
        entry.state.save_scalars(entry.log.take_scalars())
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
                rl.device_missing()
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
        if error is not None:  # counted here instead: slower, never wrong
            log.error("%s counting the restored log failed (%s): counting it here",
                      tag(entry.key[0]), error)  # fmt: skip
        rl.counted(result if error is None else None)
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
            return [*actions, self._reply(request, error_of(failure))]
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
