"""The per-handle outbound queue: flow control without busy loops.

Theory of operation
-------------------
``cpg_mcast_joined`` returns ``CS_ERR_TRY_AGAIN`` when corosync's send queue for this client is
full (corosync's flow control).  Retrying on the spot would spin a core that corosync itself
needs; sleeping would stall the daemon's event loop.  So a message is never handed to libcpg
directly by the cluster layer: :meth:`OutboundQueue.push` appends it, and
:meth:`OutboundQueue.flush` hands messages to the send function in order until it answers
TRY_AGAIN, then stops and leaves the rest queued.

The event loop calls ``flush`` again after each dispatch of the handle (inbound traffic is
usually what frees corosync's queue) and, while :attr:`OutboundQueue.blocked` is true or the
queue is non-empty, polls with a short timeout (:data:`RETRY_AFTER`) instead of waiting
indefinitely.  Order is preserved because only the head of the queue is ever sent.

The queue knows nothing of libcpg: the send function returns a ``cs_error_t`` code, which makes
the logic testable without corosync.  Any code other than OK and TRY_AGAIN raises
:class:`~cpg.errors.CpgError` and leaves the failed message at the head of the queue.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from typing import TypeAlias

from .errors import CpgError, CsError

#: One message: its parts are sent as one iovec array and delivered as one message.
Parts: TypeAlias = tuple[bytes, ...]

#: Suggested poll timeout (seconds) while messages wait for corosync's queue to drain.
RETRY_AFTER = 0.002


class OutboundQueue:
    """FIFO of messages waiting for ``cpg_mcast_joined`` to accept them."""

    def __init__(self, send: Callable[[Parts], int], op: str = "cpg_mcast_joined") -> None:
        self._send = send
        self._op = op
        self._queue: collections.deque[Parts] = collections.deque()
        self._bytes = 0
        self.blocked = False
        """True when the last attempt was refused with TRY_AGAIN."""
        self.sent = 0
        """Messages accepted by the send function so far."""
        self.try_again = 0
        """TRY_AGAIN answers seen so far (each one ends a flush)."""

    def __len__(self) -> int:
        return len(self._queue)

    def __bool__(self) -> bool:
        return bool(self._queue)

    @property
    def pending_bytes(self) -> int:
        """Payload bytes still queued."""
        return self._bytes

    def push(self, parts: Sequence[bytes]) -> None:
        """Queue one message (its *parts* are concatenated on the wire)."""
        message = tuple(parts)
        self._queue.append(message)
        self._bytes += sum(len(p) for p in message)

    def flush(self, limit: int | None = None) -> bool:
        """Send queued messages in order; return True when the queue is empty.

        Stops at the first TRY_AGAIN (sets :attr:`blocked`), after *limit* messages if given
        (so one busy handle cannot starve the event loop), or by raising :class:`CpgError` for
        any other failure with the message left at the head.
        """
        count = 0
        while self._queue:
            if limit is not None and count >= limit:
                return False
            head = self._queue[0]
            rc = self._send(head)
            if rc == CsError.CS_ERR_TRY_AGAIN:
                self.blocked = True
                self.try_again += 1
                return False
            if rc != CsError.CS_OK:
                raise CpgError(rc, self._op)
            self._queue.popleft()
            self._bytes -= sum(len(p) for p in head)
            self.sent += 1
            count += 1
        self.blocked = False
        return True

    def clear(self) -> list[Parts]:
        """Drop and return everything still queued (e.g. after the connection was lost)."""
        dropped = list(self._queue)
        self._queue.clear()
        self._bytes = 0
        self.blocked = False
        return dropped

    def retry_after(self) -> float | None:
        """Poll timeout the event loop should use: None when nothing waits."""
        return RETRY_AFTER if self._queue else None
