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

Everything is served from the daemon's selector loop (:class:`ulogd.ops.service.StreamService`),
so the server's state is only ever read on the loop thread.

The last error seen for each log is derived from the daemon's own log records
(:class:`LastErrors`): every server message about a log starts with its uuid tail
(``[abcd1234]``), which is what operators grep for, and carries the log's whole identity
(uuid and luid), which is what the table is keyed by.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ulogd import __version__
from ulogd.ops.metrics import HttpListener, render
from ulogd.ops.service import MAX_CONNECTIONS, Peer, StreamService, reply_bytes

if TYPE_CHECKING:
    from ulogd.edges.daemon import Daemon
    from ulogd.engine.view import GroupView, LogView

log = logging.getLogger(__name__)

SOCKET_NAME = "control.sock"


class LastErrors(logging.Handler):
    """Remembers the newest warning or error for each log and for the daemon.

    A record is about a log when it carries that log's whole identity (``extra=about(key)``,
    see :func:`ulogd.engine.table.about`): the ``[tail]`` a line starts with is for operators and
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
    logs = [_log_info(v, server.local_node, errors) for v in server.view(time.time())]
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


def _log_info(v: LogView, node: int, errors: LastErrors | None) -> dict[str, Any]:
    """One log of the ``status`` answer (the schema of ``docs/operations.rst``)."""
    n = v.regions
    info: dict[str, Any] = {
        "uuid": v.uuid,
        "luid": v.luid,
        "type": v.type_word,
        "target_sectors": v.target_sectors,
        "regions": n,
        "region_size": v.region_size,
        "sync_mode": v.sync_mode,
        "block_on_error": v.block_on_error,
        "in_sync": v.in_sync,
        "in_sync_percent": round(100.0 * v.in_sync / n, 2) if n else 100.0,
        "marked": v.marked,
        "orphans": [{"node": o.node, "regions": o.regions, "since": o.since} for o in v.orphans],
        "recovering": v.recovering,
        "recoverer": v.recoverer,
        "recovery_halted": v.recovery_halted,
        "state": "active" if v.resumed else "suspended",
        "log_device": v.log_device,
        "device_id": v.device_id,
        "health": v.health if v.has_disk else None,
        "queued": v.queued,
        "server": node,
        "members": list(v.members),
        "cluster": None,
        "last_error": errors.for_log(v.uuid, v.luid) if errors else None,
    }
    if v.group is not None:  # a clustered log in cluster mode: the group knows better
        info.update(_group_info(v.group))
    return info


def _group_info(group: GroupView) -> dict[str, Any]:
    """What ``status`` shows of a log's process group."""
    return {
        "server": group.disk_server,
        "members": sorted({node for node, _pid in group.members}),
        "cluster": {
            "phase": group.phase,
            "quorate": group.quorate,
            "members": [f"{node}/{pid}" for node, pid in group.members],
            "in_flight": group.in_flight,
            "unsent": group.unsent,
            "dropped": group.dropped,
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
            return reply_bytes(
                {
                    "ok": False,
                    "error": f"permission denied: the ulogd control socket is for root only "
                    f"(your uid is {uid})",
                }
            )
        try:
            message = json.loads(request.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return reply_bytes({"ok": False, "error": f"malformed request (expected JSON): {exc}"})
        if not isinstance(message, dict) or not isinstance(message.get("command"), str):
            return reply_bytes(
                {"ok": False, "error": 'malformed request: expected {"command": "..."}'}
            )
        command = self.commands.get(message["command"])
        if command is None:
            known = ", ".join(sorted(self.commands))
            return reply_bytes(
                {"ok": False, "error": f"unknown command {message['command']!r} (known: {known})"}
            )
        return reply_bytes(command(message))

    def _status(self, _message: dict[str, Any]) -> dict[str, Any]:
        extra = dict(self.info)
        extra["started"] = self.started
        extra["uptime"] = round(time.time() - self.started, 3)
        return snapshot(self.daemon, self.errors, extra)

    def _metrics(self, _message: dict[str, Any]) -> dict[str, Any]:
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
        sock.sendall(reply_bytes({"command": command, **fields}))
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

        host, port = parse_listen(settings.metrics_listen)
        listener = HttpListener(daemon, host, port)
        info["metrics_listen"] = "{}:{}".format(*listener.address)
    if run_dir is not None:
        ControlServer(daemon, Path(run_dir) / SOCKET_NAME, info=info, errors=errors)
