"""Perform a server's actions to completion on the calling thread (tests, replay, fuzzing).

Theory of operation
-------------------
The daemon performs disk I/O and heavy jobs on worker threads; the in-process driver
(:mod:`ulogd.testing.driver`), the replay tool and the fuzz targets perform them at once, in
order, on their own thread.  :class:`SyncRunner` is that one interpreter: it takes the
actions a :class:`~ulogd.engine.server.Server` returns, collects the reply datagrams
(:class:`Send`), performs every :class:`DiskRead` / :class:`DiskWrite` (an ``OSError`` is
reported back as the I/O's outcome, as a worker would) and :class:`Prepare` job, feeds the
outcome back (:meth:`Server.disk_done`, :meth:`Server.prepared`) and goes on with what that
returns, first in first out.  Subclasses change how a device is read or written
(:meth:`read`, :meth:`write`: injected faults, replay's image bookkeeping) and what happens to
the actions it does not perform (:meth:`other`: cluster actions; ignored by default).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Any

from ulogd.engine.actions import Action, DiskRead, DiskWrite, Prepare, Send
from ulogd.engine.server import Server


class SyncRunner:
    """See the module docstring."""

    def __init__(self, server: Server) -> None:
        self.server = server

    def read(self, action: DiskRead) -> bytes:
        return action.device.read(action.nbytes)

    def write(self, action: DiskWrite) -> None:
        action.device.write_extents(action.extents, action.durable)

    def other(self, action: Action) -> None:
        """An action this runner does not perform (Join, ClusterSend, Leave, Cycle)."""

    def run(self, actions: Iterable[Action]) -> list[bytes]:
        """Perform ``actions`` and everything that follows; return the replies, in order."""
        server = self.server
        replies: list[bytes] = []
        queue = deque(actions)
        while queue:
            action = queue.popleft()
            if isinstance(action, Send):
                replies.append(action.data)
            elif isinstance(action, DiskRead | DiskWrite):
                data: bytes | None = None
                error: OSError | None = None
                try:
                    if isinstance(action, DiskRead):
                        data = self.read(action)
                    else:
                        self.write(action)
                except OSError as exc:
                    error = exc
                queue.extend(server.disk_done(action.token, data, error))
            elif isinstance(action, Prepare):
                result: Any = None
                failure: Exception | None = None
                try:
                    result = action.job()
                except Exception as exc:
                    failure = exc
                queue.extend(server.prepared(action.token, result, failure))
            else:
                self.other(action)
        return replies
