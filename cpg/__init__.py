"""cpg: corosync closed process groups (libcpg) and quorum (libquorum) for ulogd, via cffi.

Theory of operation
-------------------
ulogd replicates each mirror log's state over its own CPG group.  This package is the thin,
event-loop friendly edge between that cluster layer and corosync's C client libraries:

* :mod:`cpg._ffi`: the C declarations, opened in cffi ABI mode at run time (no compiler, no
  headers needed to run ulogd); a test checks them against the real headers in API mode.
* :class:`Handle` (:mod:`cpg.handle`): one CPG connection: join/leave, agreed multicast through
  an outbound queue that absorbs ``CS_ERR_TRY_AGAIN`` (:mod:`cpg.outbound`), deliveries and
  configuration changes as plain data (:mod:`cpg.events`), loss of corosync as an event.
* :class:`Quorum` (:mod:`cpg.quorum`): the partition's quorum verdict and its changes.
* :class:`CpgError` (:mod:`cpg.errors`): every failing call, naming its ``CS_ERR_*`` code.

Typical event-loop use::

    h = cpg.Handle(on_deliver=..., on_confchg=..., on_lost=...)
    h.join(uuid + b"\\0")
    sel.register(h.fileno(), selectors.EVENT_READ, h)
    ...
    h.send(payload)                       # never blocks, never spins
    events = sel.select(h.retry_after())  # short timeout while messages wait
    for key, _ in events: key.data.dispatch()   # also flushes the queue
    h.flush_outbound()
"""

from __future__ import annotations

from .errors import CONNECTION_LOST, CpgError, CsError, MessageTooLarge, QuorumError
from .events import ConfChg, Lost, Member, Message, QuorumChange, Reason, TotemConfChg
from .handle import Handle
from .outbound import RETRY_AFTER, OutboundQueue
from .quorum import Quorum

CpgHandle = Handle

__all__ = [
    "CONNECTION_LOST",
    "RETRY_AFTER",
    "ConfChg",
    "CpgError",
    "CpgHandle",
    "CsError",
    "Handle",
    "Lost",
    "Member",
    "Message",
    "MessageTooLarge",
    "OutboundQueue",
    "Quorum",
    "QuorumChange",
    "QuorumError",
    "Reason",
    "TotemConfChg",
]
