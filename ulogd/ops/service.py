"""A stream-socket service on the daemon's selector loop: one request, one answer (edges of ops).

Theory of operation
-------------------
:class:`StreamService` serves a listening stream socket (the control socket, the metrics
listener) from the daemon's selector loop: non-blocking accept, read until the terminator,
answer through a handler, write, close; the daemon's state is only ever read on the loop
thread.  A request larger than 64 KiB is refused; at most 64 connections are open at once
(the oldest is dropped), so a stuck client cannot exhaust descriptors.

At the descriptor limit (``accept()`` fails with EMFILE, ENFILE, ENOBUFS or ENOMEM) the
pending connection stays queued and the listener stays readable: polling it would spin.  The
listener is then taken out of the loop for :data:`BACKOFF_FIRST` seconds, doubling up to
:data:`BACKOFF_MAX`, and polled again; one line reports the episode when it starts and one
when it ends (every queued connection accepted).  Queued clients are answered once
descriptors free up.
"""

from __future__ import annotations

import collections
import errno
import json
import logging
import socket
import struct
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ulogd.edges.daemon import Daemon

log = logging.getLogger(__name__)

MAX_REQUEST = 65536
MAX_CONNECTIONS = 64
#: seconds the listener rests after an accept() that failed for want of a resource, doubling
#: at each further failure up to BACKOFF_MAX
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 1.0
_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_UCRED = struct.Struct("3i")

Handler = Callable[[bytes, "Peer"], bytes]


class Peer:
    """Credentials of the process at the other end of a Unix socket (``SO_PEERCRED``)."""

    __slots__ = ("gid", "pid", "uid")

    def __init__(self, pid: int, uid: int, gid: int) -> None:
        self.pid, self.uid, self.gid = pid, uid, gid

    @classmethod
    def of(cls, sock: socket.socket) -> Peer | None:
        if sock.family != socket.AF_UNIX:
            return None
        pid, uid, gid = _UCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        )
        return cls(pid, uid, gid)


class _Connection:
    def __init__(self, service: StreamService, sock: socket.socket) -> None:
        self.service = service
        self.sock = sock
        self.peer = Peer.of(sock)
        self.inbox = bytearray()
        self.outbox = b""
        self.closed = False

    def readable(self) -> None:
        if self.closed:
            return
        try:
            chunk = self.sock.recv(16384)
        except BlockingIOError:
            return
        except OSError:
            self.close()
            return
        self.inbox += chunk
        terminator = self.service.terminator
        if terminator in self.inbox:
            request = bytes(self.inbox[: self.inbox.index(terminator)])
            self.respond(self.service.answer(request, self.peer))
        elif len(self.inbox) > MAX_REQUEST:
            self.respond(self.service.too_large())
        elif not chunk:  # EOF without a terminator: answer what came
            self.respond(self.service.answer(bytes(self.inbox), self.peer))

    def respond(self, data: bytes) -> None:
        self.outbox = data
        self.service.daemon.add_writer(self.sock.fileno(), self.writable)
        self.writable()

    def writable(self) -> None:
        if self.closed:
            return
        try:
            sent = self.sock.send(self.outbox)
        except BlockingIOError:
            return
        except OSError:
            self.close()
            return
        self.outbox = self.outbox[sent:]
        if not self.outbox:
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.service.daemon.remove_fd(self.sock.fileno())
        self.sock.close()
        self.service.connections.pop(id(self), None)


class StreamService:
    """A listening stream socket served from the daemon loop: one request, one answer."""

    def __init__(
        self,
        daemon: Daemon,
        sock: socket.socket,
        handler: Handler,
        *,
        terminator: bytes = b"\n",
        too_large: bytes = b"",
    ) -> None:
        self.daemon = daemon
        self.sock = sock
        self.handler = handler
        self.terminator = terminator
        self._too_large = too_large
        self.connections: collections.OrderedDict[int, _Connection] = collections.OrderedDict()
        #: accept() failures for want of a resource: in all, and in the current episode
        self.accept_failures = 0
        self._episode_failures = 0
        self._episode_started = 0.0
        self._backoff = BACKOFF_FIRST
        self._paused = False
        self.name = "control" if sock.family == socket.AF_UNIX else "metrics"
        sock.setblocking(False)
        daemon.add_reader(sock.fileno(), self._accept)
        daemon.at_shutdown(self.close)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                if self._episode_failures:  # every queued client accepted: the episode ends
                    log.warning(
                        "%s: accepting connections again (%d attempt(s) failed for want of "
                        "a resource in %.1f s)",
                        self.name,
                        self._episode_failures,
                        time.monotonic() - self._episode_started,
                    )
                    self._episode_failures = 0
                    self._backoff = BACKOFF_FIRST
                return
            except OSError as exc:
                if exc.errno in _RESOURCE_ERRORS:
                    self._pause(exc)
                return
            conn.setblocking(False)
            while len(self.connections) >= MAX_CONNECTIONS:
                _, oldest = self.connections.popitem(last=False)
                oldest.close()
            c = _Connection(self, conn)
            self.connections[id(c)] = c
            self.daemon.add_reader(conn.fileno(), c.readable)

    def _pause(self, exc: OSError) -> None:
        """Stop polling the listener for a while (see the module docstring)."""
        self.accept_failures += 1
        if not self._episode_failures:
            self._episode_started = time.monotonic()
            log.error(
                "%s: cannot accept connections: %s; the listener pauses and retries every "
                "%g-%g s until it can",
                self.name,
                exc,
                BACKOFF_FIRST,
                BACKOFF_MAX,
            )
        else:
            self._backoff = min(self._backoff * 2, BACKOFF_MAX)
        self._episode_failures += 1
        self._paused = True
        self.daemon.remove_fd(self.sock.fileno())
        self.daemon.call_later(self._backoff, self._resume)

    def _resume(self) -> None:
        if self._paused and self.sock.fileno() >= 0:
            self._paused = False
            self.daemon.add_reader(self.sock.fileno(), self._accept)
            self._accept()  # at once: an empty queue ends the episode too

    def answer(self, request: bytes, peer: Peer | None) -> bytes:
        try:
            return self.handler(request, peer)  # type: ignore[arg-type]
        except Exception as exc:
            log.exception("control: internal error answering a request")
            return reply_bytes(
                {"ok": False, "error": f"internal error: {type(exc).__name__}: {exc}"}
            )

    def too_large(self) -> bytes:
        return self._too_large or reply_bytes(
            {"ok": False, "error": f"request larger than {MAX_REQUEST} bytes"}
        )

    def close(self) -> None:
        for conn in list(self.connections.values()):
            conn.close()
        if self.sock.fileno() >= 0:
            self.daemon.remove_fd(self.sock.fileno())
            self.sock.close()


def reply_bytes(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"
