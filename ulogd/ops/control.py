"""The control socket: ``<run dir>/control.sock``, root only, one JSON request per connection.

Theory of operation
-------------------
``dm-ulogd status`` (and scripts) connect to a Unix *stream* socket in the run directory, send one
JSON object ending in a newline — ``{"command": "status"}`` — and read one JSON object ending
in a newline; the daemon then closes the connection.  Commands:

``status``   the daemon and every log (see :func:`snapshot`; the schema is documented in
             ``docs/operations.rst``);
``metrics``  the Prometheus text exposition (``{"ok": true, "text": ...}``), so metrics can be
             read even when no HTTP listener is configured;
``ping``     version and pid (a liveness check for scripts and pacemaker resource agents).

Every answer has ``"ok"``; a failure carries ``"error"`` with a sentence for the operator.

Access control: the peer's credentials are read with ``SO_PEERCRED`` when the connection is
accepted; a peer whose uid is not 0 is answered ``permission denied`` (after its request was
read, so the client sees the reason instead of a reset) and nothing else.  The socket file is
mode 0600 and the run directory 0700 as well, so in practice a non-root user is already stopped
by the file system; the credential check is what holds when either is widened (e.g. a
``RuntimeDirectoryMode=0755``) or a process keeps ``CAP_DAC_OVERRIDE`` without being root.

Everything is served from the daemon's selector loop (:class:`StreamService`: non-blocking
accept, read until the terminator, write, close), so the server's state is only ever read on
the loop thread.  A request larger than 64 KiB is refused; at most 64 connections are open at
once (the oldest is dropped), so a stuck client cannot exhaust descriptors.

At the descriptor limit (``accept()`` fails with EMFILE, ENFILE, ENOBUFS or ENOMEM) the
pending connection stays queued and the listener stays readable: polling it would spin.  The
listener is then taken out of the loop for :data:`BACKOFF_FIRST` seconds, doubling up to
:data:`BACKOFF_MAX`, and polled again; one line reports the episode when it starts and one
when it ends (every queued connection accepted).  Queued clients are answered once
descriptors free up.

The last error seen for each log is derived from the daemon's own log records
(:class:`LastErrors`): every server message about a log starts with its uuid tail
(``[abcd1234]``), which is what operators grep for, and carries the log's whole identity
(uuid and luid), which is what the table is keyed by.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import json
import logging
import os
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ulogd import __version__

if TYPE_CHECKING:
    from ulogd.edges.daemon import Daemon

log = logging.getLogger(__name__)

SOCKET_NAME = "control.sock"
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
            return _reply({"ok": False, "error": f"internal error: {type(exc).__name__}: {exc}"})

    def too_large(self) -> bytes:
        return self._too_large or _reply(
            {"ok": False, "error": f"request larger than {MAX_REQUEST} bytes"}
        )

    def close(self) -> None:
        for conn in list(self.connections.values()):
            conn.close()
        if self.sock.fileno() >= 0:
            self.daemon.remove_fd(self.sock.fileno())
            self.sock.close()


def _reply(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


class LastErrors(logging.Handler):
    """Remembers the newest warning or error for each log and for the daemon.

    A record is about a log when it carries that log's whole identity (``extra=about(key)``,
    see :func:`ulogd.engine.server.about`): the ``[tail]`` a line starts with is for operators and
    may be shared by two logs.  Any other error is the daemon's."""

    LIMIT = 4096

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.by_log: collections.OrderedDict[tuple[str, int], dict[str, Any]] = (
            collections.OrderedDict()
        )
        self.daemon: dict[str, Any] | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:
            return
        entry = {"time": record.created, "level": record.levelname.lower(), "message": message}
        key = getattr(record, "ulogd_log", None)
        if not isinstance(key, tuple):
            if record.levelno >= logging.ERROR:
                self.daemon = entry
            return
        self.by_log.pop(key, None)
        self.by_log[key] = entry
        while len(self.by_log) > self.LIMIT:
            self.by_log.popitem(last=False)

    def for_log(self, uuid: str, luid: int) -> dict[str, Any] | None:
        return self.by_log.get((uuid, luid))


def snapshot(
    daemon: Daemon, errors: LastErrors | None = None, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The ``status`` answer: the daemon and every log (JSON-ready)."""
    server = daemon.server
    logs = []
    orphans = server.orphan_report(time.time())
    for (uuid, luid), entry in sorted(server.logs.items()):
        rl = entry.log
        config = rl.config
        n = rl.region_count
        logs.append(
            {
                "uuid": uuid,
                "luid": luid,
                "type": config.type_word,
                "target_sectors": config.target_sectors,
                "regions": n,
                "region_size": config.region_size,
                "sync_mode": config.sync.value or "default",
                "block_on_error": config.block_on_error,
                "in_sync": rl.sync_count,
                "in_sync_percent": round(100.0 * rl.sync_count / n, 2) if n else 100.0,
                "marked": len(rl.holders),
                "orphans": [
                    {"node": node, "regions": held, "since": since}
                    for k, node, held, since in orphans
                    if k == (uuid, luid)
                ],
                "recovering": rl.recovering if rl.recovering >= 0 else None,
                "recoverer": rl.recoverer if rl.recovering >= 0 else None,
                "recovery_halted": rl.recovery_halted,
                "state": "active" if rl.resumed else "suspended",
                "log_device": config.log_device,
                "device_id": rl.device_id,
                "health": rl.health() if rl.has_disk else None,
                "queued": len(entry.queue),
                "server": server.local_node,
                "members": sorted(rl.members),
                "cluster": None,
                "last_error": errors.for_log(uuid, luid) if errors else None,
            }
        )
        group = getattr(entry, "group", None)
        if group is not None:  # a clustered log in cluster mode: the group knows better
            logs[-1].update(_group_info(group))
    info: dict[str, Any] = {
        "version": __version__,
        "pid": os.getpid(),
        "transport": daemon.transport.name,
        "run_dir": str(daemon.run_dir) if daemon.run_dir else None,
        "node": server.local_node,
        "logs": len(logs),
        "datagrams": daemon.served,
        "rejected": server.rejected.total(),
        "errors_replied": sum(c for (_, r), c in server.results.items() if r != "0"),
        "last_error": errors.daemon if errors else None,
    }
    info.update(extra or {})
    return {"ok": True, "daemon": info, "logs": logs}


def _group_info(group: Any) -> dict[str, Any]:
    """What ``status`` shows of a log's process group (``ulogd.cluster.group.Group``)."""
    members = getattr(group, "members", ())
    phase = getattr(group, "phase", None)
    return {
        "server": getattr(group, "disk_server", None),
        "members": sorted({node for node, _pid in members}),
        "cluster": {
            "phase": getattr(phase, "name", str(phase)).lower(),
            "quorate": getattr(group, "quorate", None),
            "members": [f"{node}/{pid}" for node, pid in members],
            "in_flight": getattr(group, "in_flight", None),
            "unsent": len(getattr(group, "outbox", ())),
            "dropped": getattr(group, "dropped", None),
        },
    }


class ControlServer:
    """Serves the control socket of one daemon (see the module docstring)."""

    def __init__(
        self,
        daemon: Daemon,
        path: str | os.PathLike[str],
        *,
        info: dict[str, Any] | None = None,
        errors: LastErrors | None = None,
    ) -> None:
        self.daemon = daemon
        self.path = Path(path)
        self.info = dict(info or {})
        self.errors = errors
        self.started = time.time()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            sock.bind(str(self.path))
        except OSError:
            sock.close()
            raise
        finally:
            os.umask(old)
        sock.listen(MAX_CONNECTIONS)
        self.service = StreamService(daemon, sock, self.handle)
        daemon.at_shutdown(self._unlink)
        self.commands: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
            "status": self._status,
            "metrics": self._metrics,
            "ping": self._ping,
        }

    def handle(self, request: bytes, peer: Peer | None) -> bytes:
        if peer is None or peer.uid != 0:
            uid = "unknown" if peer is None else peer.uid
            log.warning("control: refused a client with uid %s (pid %s)", uid, peer and peer.pid)
            return _reply(
                {
                    "ok": False,
                    "error": f"permission denied: the ulogd control socket is for root only "
                    f"(your uid is {uid})",
                }
            )
        try:
            message = json.loads(request.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return _reply({"ok": False, "error": f"malformed request (expected JSON): {exc}"})
        if not isinstance(message, dict) or not isinstance(message.get("command"), str):
            return _reply({"ok": False, "error": 'malformed request: expected {"command": "..."}'})
        command = self.commands.get(message["command"])
        if command is None:
            known = ", ".join(sorted(self.commands))
            return _reply(
                {"ok": False, "error": f"unknown command {message['command']!r} (known: {known})"}
            )
        return _reply(command(message))

    def _status(self, _message: dict[str, Any]) -> dict[str, Any]:
        extra = dict(self.info)
        extra["started"] = self.started
        extra["uptime"] = round(time.time() - self.started, 3)
        return snapshot(self.daemon, self.errors, extra)

    def _metrics(self, _message: dict[str, Any]) -> dict[str, Any]:
        from ulogd.ops.metrics import render

        return {"ok": True, "text": render(self.daemon).decode()}

    def _ping(self, _message: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, "version": __version__, "pid": os.getpid()}

    def _unlink(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def close(self) -> None:
        self.service.close()
        self._unlink()


def request(
    path: str | os.PathLike[str], command: str, timeout: float = 10.0, **fields: Any
) -> dict[str, Any]:
    """Client side: send one command, return the decoded answer; raises OSError/ValueError."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        while True:
            try:
                sock.connect(str(path))
                break
            except BlockingIOError:  # backlog full: the daemon is accepting; try again
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"{path}: the daemon accepts no connection") from None
                time.sleep(0.01)
        sock.sendall(_reply({"command": command, **fields}))
        data = bytearray()
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    if not data:
        raise ValueError("the daemon closed the control connection without answering")
    answer = json.loads(data.decode("utf-8"))
    if not isinstance(answer, dict):
        raise ValueError("the daemon's answer is not a JSON object")
    return answer


def attach_services(daemon: Daemon, run_dir: Path | None, settings: Any | None = None) -> None:
    """Give a daemon its operator interfaces: the control socket in ``run_dir``, the
    last-error tracker and, when ``settings.metrics_listen`` names an address, the HTTP
    metrics listener (``settings`` is a :class:`ulogd.ops.config.Settings`)."""
    errors = LastErrors()
    logger = logging.getLogger("ulogd")
    logger.addHandler(errors)
    daemon.at_shutdown(lambda: logger.removeHandler(errors))
    info: dict[str, Any] = {}
    if settings is not None:
        info = {
            "cluster": settings.cluster,
            "config": settings.source,
            "metrics_listen": settings.metrics_listen,
        }
    if settings is not None and settings.metrics_listen:
        from ulogd.ops.config import parse_listen
        from ulogd.ops.metrics import HttpListener

        host, port = parse_listen(settings.metrics_listen)
        listener = HttpListener(daemon, host, port)
        info["metrics_listen"] = "{}:{}".format(*listener.address)
    if run_dir is not None:
        ControlServer(daemon, Path(run_dir) / SOCKET_NAME, info=info, errors=errors)
