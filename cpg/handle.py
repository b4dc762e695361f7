"""A connection to the local corosync's CPG service: :class:`Handle`.

Theory of operation
-------------------
A :class:`Handle` owns one ``cpg_handle_t`` (``cpg_model_initialize`` with ``CPG_MODEL_V1``).
It joins one group (``join``), multicasts in agreed order to it, and reports what corosync
delivers through callbacks given at construction:

* ``on_deliver(Message)``: each message of the group, in the same total order on every member,
  including our own;
* ``on_confchg(ConfChg)``: membership changes, ordered consistently with the messages;
* ``on_totem(TotemConfChg)``: ring changes, starting with the current ring on join
  (optional, fixed at :meth:`Handle.open`; a *local* view, keep it out of replicated state);
* ``on_lost(Lost)``: the local corosync went away.

Nothing happens behind the caller's back: callbacks run only inside :meth:`Handle.dispatch`,
which the caller's event loop invokes when :meth:`Handle.fileno` is readable (or hung up).
``dispatch`` uses ``CS_DISPATCH_ALL``, which never blocks.

Sending goes through the outbound queue (:mod:`cpg.outbound`): :meth:`Handle.send` enqueues and
tries to flush; a ``CS_ERR_TRY_AGAIN`` leaves the rest queued and :meth:`Handle.retry_after`
tells the loop to come back after a couple of milliseconds.  ``dispatch`` also flushes.
:meth:`Handle.mcast` is the raw call for callers that handle TRY_AGAIN themselves.

Losing corosync (``CS_ERR_LIBRARY`` / ``CS_ERR_BAD_HANDLE`` from dispatch or mcast, which is
what a hung-up fd turns into) is not an exception: the handle finalizes itself, drops its queue,
sets :attr:`Handle.lost` and calls ``on_lost`` once.  The caller unregisters the old fd
(``Lost.fd``; ``dispatch`` returns False) and calls :meth:`Handle.open` (or makes a new
handle) when corosync is back, then joins again.

Callbacks come from C through cffi; an exception raised by a Python callback is kept and
re-raised from ``dispatch`` once libcpg has returned (never across the C frames).
Messages longer than ``cpg_max_atomic_msgsize`` raise :class:`~cpg.errors.MessageTooLarge`.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Any

from ._connection import Connection
from ._ffi import LIBCPG, ffi, load
from .errors import CONNECTION_LOST, CpgError, MessageTooLarge, check
from .events import ConfChg, Lost, Member, Message, Reason, TotemConfChg
from .outbound import OutboundQueue, Parts

CPG_MODEL_V1 = 1
CPG_TYPE_AGREED = 2
CPG_MAX_NAME_LENGTH = 128
CPG_MEMBERS_MAX = 128
CPG_MODEL_V1_DELIVER_INITIAL_TOTEM_CONF = 1

DeliverCallback = Callable[[Message], object]
ConfChgCallback = Callable[[ConfChg], object]
TotemCallback = Callable[[TotemConfChg], object]
LostCallback = Callable[[Lost], object]

# Live handles by their cpg_handle_t value, for the C callbacks to find their Python object.
_live: weakref.WeakValueDictionary[int, Handle] = weakref.WeakValueDictionary()


def _members(entries: Any, count: int) -> tuple[Member, ...]:
    return tuple(
        Member(entries[i].nodeid, entries[i].pid, Reason.of(entries[i].reason))
        for i in range(count)
    )


def _group_bytes(name: Any) -> bytes:
    return ffi.unpack(name.value, min(int(name.length), CPG_MAX_NAME_LENGTH))


@ffi.callback("cpg_deliver_fn_t")
def _deliver_cb(h: int, group: Any, nodeid: int, pid: int, msg: Any, size: int) -> None:
    handle = _live.get(int(h))
    if handle is not None and handle.on_deliver is not None:
        data = ffi.unpack(ffi.cast("char *", msg), size)
        handle._call(handle.on_deliver, Message(_group_bytes(group), nodeid, pid, data))


@ffi.callback("cpg_confchg_fn_t")
def _confchg_cb(
    h: int, group: Any, mem: Any, n_mem: int, left: Any, n_left: int, joined: Any, n_joined: int
) -> None:
    handle = _live.get(int(h))
    if handle is not None and handle.on_confchg is not None:
        event = ConfChg(
            _group_bytes(group),
            _members(mem, n_mem),
            _members(left, n_left),
            _members(joined, n_joined),
        )
        handle._call(handle.on_confchg, event)


@ffi.callback("cpg_totem_confchg_fn_t")
def _totem_cb(h: int, ring_id: Any, n_nodes: int, nodes: Any) -> None:
    handle = _live.get(int(h))
    if handle is not None and handle.on_totem is not None:
        event = TotemConfChg(ring_id.nodeid, ring_id.seq, tuple(nodes[i] for i in range(n_nodes)))
        handle._call(handle.on_totem, event)


def group_name(group: bytes) -> Any:
    """A ``struct cpg_name`` for *group* (raw bytes; ulogd passes the log UUID plus a NUL)."""
    if not isinstance(group, bytes | bytearray):
        raise TypeError(f"group name must be bytes, not {type(group).__name__}")
    if not 0 < len(group) <= CPG_MAX_NAME_LENGTH:
        raise ValueError(f"group name must be 1..{CPG_MAX_NAME_LENGTH} bytes, got {len(group)}")
    name = ffi.new("struct cpg_name *")
    name.length = len(group)
    ffi.memmove(name.value, bytes(group), len(group))
    return name


class Handle(Connection):
    """One CPG connection, joined to at most one group.

    ``Handle(on_deliver=..., on_confchg=...)`` connects at once (pass ``open=False`` to connect
    later with :meth:`open`).  Use it as a context manager or call :meth:`close`.
    """

    _service = "cpg"
    _error = CpgError

    def __init__(
        self,
        on_deliver: DeliverCallback | None = None,
        on_confchg: ConfChgCallback | None = None,
        on_lost: LostCallback | None = None,
        on_totem: TotemCallback | None = None,
        *,
        open: bool = True,
    ) -> None:
        self.on_deliver = on_deliver
        self.on_confchg = on_confchg
        self.on_lost = on_lost
        self.on_totem = on_totem
        self.lost: Lost | None = None
        """Set (and ``on_lost`` called) when the local corosync went away."""
        self.group: bytes | None = None
        """The group joined through this handle, if any."""
        self._lib: Any = None
        self._h: int | None = None
        self._fd = -1
        self._max_msg = 0
        self._nodeid: int | None = None
        self._cb_error: BaseException | None = None
        self._outbound = OutboundQueue(self._send_parts)
        if open:
            self.open()

    # -- life cycle -------------------------------------------------------------------------

    def open(self) -> Handle:
        """Connect to the local corosync (raises :class:`CpgError`, CS_ERR_LIBRARY if absent)."""
        if self._h is not None:
            raise RuntimeError("handle is already open")
        self._lib = lib = load(LIBCPG)
        model = ffi.new("cpg_model_v1_data_t *")
        model.model = CPG_MODEL_V1
        model.cpg_deliver_fn = _deliver_cb
        model.cpg_confchg_fn = _confchg_cb
        if self.on_totem is not None:  # and deliver the current ring at once
            model.cpg_totem_confchg_fn = _totem_cb
            model.flags = CPG_MODEL_V1_DELIVER_INITIAL_TOTEM_CONF
        else:
            model.cpg_totem_confchg_fn = ffi.NULL
            model.flags = 0
        out = ffi.new("cpg_handle_t *")
        check(
            lib.cpg_model_initialize(
                out, CPG_MODEL_V1, ffi.cast("cpg_model_data_t *", model), ffi.NULL
            ),
            "cpg_model_initialize",
        )
        h = int(out[0])
        try:
            fd = ffi.new("int *")
            check(lib.cpg_fd_get(h, fd), "cpg_fd_get")
            size = ffi.new("uint32_t *")
            check(lib.cpg_max_atomic_msgsize_get(h, size), "cpg_max_atomic_msgsize_get")
        except CpgError:
            lib.cpg_finalize(h)
            raise
        self._h, self._fd, self._max_msg = h, int(fd[0]), int(size[0])
        self._nodeid = None
        self.lost = None
        self.group = None
        _live[h] = self
        return self

    def close(self) -> None:
        """Finalize the connection (idempotent); queued messages are dropped."""
        h, self._h = self._h, None
        if h is None:
            return
        _live.pop(h, None)
        self._outbound.clear()
        self._fd = -1
        self.group = None
        self._lib.cpg_finalize(h)

    def _unsent(self) -> int:
        return len(self._outbound)

    # -- event loop hooks -------------------------------------------------------------------

    def _dispatched(self) -> None:
        if self._outbound and self._h is not None:
            self.flush_outbound()

    def _call(self, callback: Callable[[Any], object], event: object) -> None:
        try:
            callback(event)
        except BaseException as exc:  # re-raised from dispatch(), outside the C frames
            if self._cb_error is None:
                self._cb_error = exc

    # -- group membership -------------------------------------------------------------------

    def join(self, group: bytes) -> None:
        """Join *group*; the first callback is then a ConfChg that lists us as JOIN."""
        h = self._handle()
        check(self._lib.cpg_join(h, group_name(group)), "cpg_join")
        self.group = bytes(group)

    def leave(self, group: bytes | None = None) -> None:
        """Leave *group* (default: the joined one).  Our own LEAVE confchg ends the stream."""
        h = self._handle()
        target = group if group is not None else self.group
        if target is None:
            raise ValueError("no group joined")
        check(self._lib.cpg_leave(h, group_name(target)), "cpg_leave")
        if target == self.group:
            self.group = None

    def membership_get(self, group: bytes | None = None) -> tuple[Member, ...]:
        """The group's current members as this node sees them (reason UNDEFINED)."""
        h = self._handle()
        target = group if group is not None else self.group
        if target is None:
            raise ValueError("no group joined")
        members = ffi.new("struct cpg_address[]", CPG_MEMBERS_MAX)
        count = ffi.new("int *", CPG_MEMBERS_MAX)
        check(
            self._lib.cpg_membership_get(h, group_name(target), members, count),
            "cpg_membership_get",
        )
        return tuple(Member(members[i].nodeid, members[i].pid) for i in range(count[0]))

    def local_get(self) -> int:
        """This node's corosync node id."""
        if self._nodeid is None:
            nodeid = ffi.new("unsigned int *")
            check(self._lib.cpg_local_get(self._handle(), nodeid), "cpg_local_get")
            self._nodeid = int(nodeid[0])
        return self._nodeid

    def max_atomic_msgsize(self) -> int:
        """Largest message corosync sends without fragmenting (and blocking) in libcpg."""
        self._handle()
        return self._max_msg

    def flow_control_enabled(self) -> bool:
        """True while corosync asks this client to stop sending."""
        state = ffi.new("cpg_flow_control_state_t *")
        check(
            self._lib.cpg_flow_control_state_get(self._handle(), state),
            "cpg_flow_control_state_get",
        )
        return bool(state[0])

    # -- sending ----------------------------------------------------------------------------

    def _check_size(self, parts: Parts) -> None:
        size = sum(len(p) for p in parts)
        if size > self._max_msg:
            raise MessageTooLarge(size, self._max_msg)

    def _send_parts(self, parts: Parts) -> int:
        h = self._handle()
        iov = ffi.new("struct iovec[]", len(parts))
        # Keep the from_buffer objects referenced until libcpg has copied the data.
        buffers = [ffi.from_buffer(p) for p in parts]
        for i, (buf, part) in enumerate(zip(buffers, parts, strict=True)):
            iov[i].iov_base = buf
            iov[i].iov_len = len(part)
        rc = int(self._lib.cpg_mcast_joined(h, CPG_TYPE_AGREED, iov, len(parts)))
        del buffers
        return rc

    def mcast(self, *parts: bytes) -> None:
        """Multicast one message now (agreed order), bypassing the queue.

        Raises :class:`CpgError` (including CS_ERR_TRY_AGAIN under flow control); a lost
        connection is reported through ``on_lost`` *and* raised.
        """
        self._handle()
        message = tuple(parts)
        self._check_size(message)
        rc = self._send_parts(message)
        if rc in CONNECTION_LOST:
            self._lose("cpg_mcast_joined", rc)
        check(rc, "cpg_mcast_joined")

    def send(self, *parts: bytes) -> bool:
        """Queue one message (its *parts* concatenated) and try to flush.

        Returns True when the queue is empty afterwards, False when messages wait (the loop
        should call :meth:`flush_outbound` after :meth:`retry_after` seconds or after the next
        dispatch) or the connection was lost (see :attr:`lost`).
        """
        self._handle()
        message = tuple(parts)
        self._check_size(message)
        self._outbound.push(message)
        return self.flush_outbound()

    def send_many(self, messages: Iterable[bytes]) -> bool:
        """Queue several single-part messages (none if any is too large), then flush once."""
        self._handle()
        batch = [(data,) for data in messages]
        for message in batch:  # all or nothing: refuse before queueing any
            self._check_size(message)
        for message in batch:
            self._outbound.push(message)
        return self.flush_outbound()

    def flush_outbound(self, limit: int | None = None) -> bool:
        """Hand queued messages to corosync until TRY_AGAIN; True when none wait."""
        if self._h is None:
            return not self._outbound
        try:
            return self._outbound.flush(limit)
        except CpgError as exc:
            if exc.connection_lost:
                self._lose("cpg_mcast_joined", int(exc.code))
                return False
            raise

    @property
    def pending(self) -> int:
        """Messages waiting in the outbound queue."""
        return len(self._outbound)

    @property
    def pending_bytes(self) -> int:
        return self._outbound.pending_bytes

    @property
    def try_again_count(self) -> int:
        """How often corosync answered TRY_AGAIN to this handle's queued sends."""
        return self._outbound.try_again

    def retry_after(self) -> float | None:
        """Poll timeout for the event loop: a few ms while messages wait, else None."""
        return self._outbound.retry_after() if self._h is not None else None
