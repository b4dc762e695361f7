"""Is this partition quorate?  :class:`Quorum`, a libquorum client in the style of the CPG handle.

Theory of operation
-------------------
CPG keeps working in a minority partition: an isolated node simply sees itself as the only
member.  A daemon that must not act in a minority asks corosync's quorum service.  libquorum
(``quorum.h``, the v0 model) offers exactly what is needed: ``quorum_getquorate`` for the
current verdict and, after ``quorum_trackstart(CS_TRACK_CHANGES)``, a notification whenever it
or the set of counted nodes changes.  The verdict itself comes from the configured provider
(``corosync_votequorum`` in our configs).

As with :class:`cpg.Handle`, notifications run only inside :meth:`Quorum.dispatch`, called
when :meth:`Quorum.fileno` is readable; losing corosync is not an exception: ``dispatch``
returns False, the handle finalizes itself and ``on_lost(Lost)`` gets the closed fd to
unregister.
:attr:`Quorum.quorate` holds the latest known verdict (from the last notification or query).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

from ._connection import Connection
from ._ffi import LIBQUORUM, ffi, load
from .errors import CONNECTION_LOST, QuorumError, check
from .events import Lost, QuorumChange

CS_TRACK_CHANGES = 0x02
QUORUM_SET = 1

ChangeCallback = Callable[[QuorumChange], object]
LostCallback = Callable[[Lost], object]

_live: weakref.WeakValueDictionary[int, Quorum] = weakref.WeakValueDictionary()


@ffi.callback("quorum_notification_fn_t")
def _notify_cb(h: int, quorate: int, ring_seq: int, n_nodes: int, nodes: Any) -> None:
    q = _live.get(int(h))
    if q is None:
        return
    event = QuorumChange(bool(quorate), int(ring_seq), tuple(nodes[i] for i in range(n_nodes)))
    q.quorate = event.quorate
    q.last_change = event
    if q.on_change is not None:
        try:
            q.on_change(event)
        except BaseException as exc:  # re-raised from dispatch()
            if q._cb_error is None:
                q._cb_error = exc


class Quorum(Connection):
    """A connection to corosync's quorum service.

    ``Quorum(on_change=...)`` connects, reads the current verdict and starts tracking changes.
    """

    _service = "quorum"
    _error = QuorumError

    def __init__(
        self,
        on_change: ChangeCallback | None = None,
        on_lost: LostCallback | None = None,
        *,
        track: bool = True,
        open: bool = True,
    ) -> None:
        self.on_change = on_change
        self.on_lost = on_lost
        self.track = track
        self.quorate: bool | None = None
        """Latest known verdict (None before the first query)."""
        self.last_change: QuorumChange | None = None
        self.provider_set = False
        """False when corosync runs without a quorum provider (then always quorate)."""
        self.lost: Lost | None = None
        self._lib: Any = None
        self._h: int | None = None
        self._fd = -1
        self._cb_error: BaseException | None = None
        if open:
            self.open()

    def open(self) -> Quorum:
        if self._h is not None:
            raise RuntimeError("quorum handle is already open")
        self._lib = lib = load(LIBQUORUM)
        callbacks = ffi.new("quorum_callbacks_t *")
        callbacks.quorum_notify_fn = _notify_cb
        out = ffi.new("quorum_handle_t *")
        qtype = ffi.new("uint32_t *")
        check(lib.quorum_initialize(out, callbacks, qtype), "quorum_initialize", QuorumError)
        h = int(out[0])
        try:
            fd = ffi.new("int *")
            check(lib.quorum_fd_get(h, fd), "quorum_fd_get", QuorumError)
            if self.track:
                check(lib.quorum_trackstart(h, CS_TRACK_CHANGES), "quorum_trackstart", QuorumError)
        except QuorumError:
            lib.quorum_finalize(h)
            raise
        self._h, self._fd = h, int(fd[0])
        self.provider_set = int(qtype[0]) == QUORUM_SET
        self.lost = None
        _live[h] = self
        self.is_quorate()
        return self

    def close(self) -> None:
        h, self._h = self._h, None
        if h is None:
            return
        _live.pop(h, None)
        self._fd = -1
        self._lib.quorum_finalize(h)

    def is_quorate(self) -> bool:
        """Ask corosync now (a synchronous IPC round trip) and remember the answer."""
        quorate = ffi.new("int *")
        rc = self._lib.quorum_getquorate(self._handle(), quorate)
        if rc in CONNECTION_LOST:
            self._lose("quorum_getquorate", rc)
        check(rc, "quorum_getquorate", QuorumError)
        self.quorate = bool(quorate[0])
        return self.quorate
