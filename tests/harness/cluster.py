"""Real ulogd daemons on a real corosync cluster, for the cluster tests and benchmarks.

Theory of operation
-------------------
:class:`UlogdCluster` runs one ``python -m ulogd run -f`` per node of a
:class:`~tests.harness.corosync.Cluster` (:class:`~tests.harness.corosync.MultiNode` nodes run
inside their network namespace, :class:`~tests.harness.corosync.SingleNode` in the current one).
Every daemon gets its own directory ``<base>/uN`` holding:

* ``run/`` — its ``--run-dir`` (state files, pid file, the control socket for ``status``);
* ``u.sock`` — its test transport (``--transport unix:PATH``).  Unix sockets are named by path,
  so the test process in the root namespace reaches a daemon inside any node's namespace;
* ``ulogd.log`` — its stderr (``--log-level debug`` by default), appended across restarts.

:class:`KernelLink` is the kernel stand-in behind each :class:`~ulogd.testing.driver.LogDriver`:
it sends with ``sendto`` (so it survives a daemon restart that re-binds the socket), waits at
most ``timeout`` seconds for an answer, and discards replies whose sequence number is not the
one it waits for (a late answer to a request that timed out never poses as the next one).

:class:`MirrorKernel` is one node's kernel for one log across its daemon's death, as
``dm-log-userspace`` behaves (``dm-log-userspace-transfer.c``, ``-base.c``): a request without an
answer in ``timeout`` (the kernel's 15 s) is sent again with a new seq; a send that finds no
server (netlink says ``-ESRCH``; here the socket refuses) or an ``-ESRCH`` answer starts the
reconnect loop — every 2 s a CTR with the stored text and its NUL until one returns 0, then a
RESUME — and then the request again; an answered request is never sent again (so neither is an
acknowledged MARK).  CTR, DTR, (PRE|POST)SUSPEND and RESUME themselves never reconnect.

Life cycle: :meth:`UlogdCluster.start` (all or one node), :meth:`kill` (SIGKILL, like a crash),
:meth:`stop` (SIGTERM), :meth:`restart`.  :meth:`close` — also run by the context manager and at
interpreter exit — kills every daemon still running; the corosync cluster is torn down by its
own owner.  :meth:`logs` returns every daemon's log for failure reports; :func:`wait_until`
bounds every wait.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from tests.harness.corosync import REAPER, Cluster
from ulogd.ops import control
from ulogd.protocol import wire
from ulogd.protocol.spec import RequestType as RT
from ulogd.testing.driver import LogDriver

T = TypeVar("T")

_CN_SEQ = struct.Struct("=I")  # cn_msg.seq at offset 24 of a kernel datagram


class ClusterTestError(AssertionError):
    """A daemon did not start, answer or reach a state in time."""


def wait_until(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll *predicate* until it returns a true value (returned); raise after *timeout* s."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except (OSError, ClusterTestError, ValueError) as exc:
            last_exc = exc
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_exc})" if last_exc else ""
            raise ClusterTestError(f"timed out after {timeout} s waiting for {what}{detail}")
        time.sleep(interval)


class KernelLink:
    """A kernel stand-in on the test transport (see the module docstring)."""

    def __init__(self, server_path: str | os.PathLike[str], timeout: float = 10.0) -> None:
        self.server_path = str(server_path)
        self.timeout = timeout
        self._dir = tempfile.mkdtemp(prefix="ulogd-kl-")
        self.path = os.path.join(self._dir, "k.sock")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            self._sock.bind(self.path)
        except BaseException:
            self.close()
            raise
        self.stale = 0  # replies discarded because they answered an older request

    def request(self, datagram: bytes, timeout: float | None = None) -> bytes:
        (seq,) = _CN_SEQ.unpack_from(datagram, 24)
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        self._sock.sendto(datagram, self.server_path)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ClusterTestError(
                    f"no reply to seq {seq} from {self.server_path} in {limit} s"
                )
            self._sock.settimeout(left)
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            if wire.decode_reply(data).seq == seq:
                return data
            self.stale += 1

    def close(self) -> None:
        self._sock.close()
        shutil.rmtree(self._dir, ignore_errors=True)


#: what the kernel sees when it sends to a daemon that is not there (netlink: -ESRCH)
_NO_SERVER = (ConnectionRefusedError, FileNotFoundError)
#: the calls that go straight to dm_consult_userspace(): they never reconnect
_DIRECT = frozenset({RT.CTR, RT.DTR, RT.PRESUSPEND, RT.POSTSUSPEND, RT.RESUME})


class MirrorKernel(LogDriver):
    """One node's ``dm-log-userspace`` for one log (see the module docstring)."""

    def __init__(
        self, daemon: Daemon, uuid: str, ctr_text: str, *, luid: int | None = None,
        timeout: float = 15.0, reconnect_sleep: float = 2.0,
    ) -> None:  # fmt: skip
        super().__init__(
            KernelLink(daemon.sock, timeout), uuid=uuid, luid=daemon.n if luid is None else luid
        )
        self.ctr_text = ctr_text
        self.timeout = timeout
        self.reconnect_sleep = reconnect_sleep
        self.timeouts = 0  # requests sent again after the kernel's timeout
        self.reconnects = 0  # reconnect loops run (CTR + RESUME after -ESRCH)

    def call(self, rtype: int, data: bytes = b"") -> wire.Reply:
        assert isinstance(self.link, KernelLink)
        while True:
            try:
                reply = wire.decode_reply(self.link.request(self.datagram(rtype, data)))
            except ClusterTestError:
                self.timeouts += 1  # "Request timed out ... retrying"
                continue
            except _NO_SERVER:
                if rtype in _DIRECT:
                    return wire.Reply(0, -errno.ESRCH, b"")
                self._reconnect()
                continue
            if reply.error == -errno.ESRCH and rtype not in _DIRECT:
                self._reconnect()
                continue
            return reply

    def _reconnect(self) -> None:
        """After "log server not found": CTR every 2 s until one returns 0, then RESUME."""
        self.reconnects += 1
        text = self.ctr_text.encode() + b"\0"
        while True:
            time.sleep(self.reconnect_sleep)
            try:
                reply = wire.decode_reply(self.link.request(self.datagram(RT.CTR, text)))
            except (ClusterTestError, *_NO_SERVER):
                continue
            if reply.error == 0:
                break
        try:
            wire.decode_reply(self.link.request(self.datagram(RT.RESUME)))
        except (ClusterTestError, *_NO_SERVER):
            pass  # the original request fails or succeeds on its own next time


class Daemon:
    """One ulogd process of a :class:`UlogdCluster` (node *n*)."""

    def __init__(self, owner: UlogdCluster, n: int) -> None:
        self.owner = owner
        self.n = n
        self.dir = owner.base / f"u{n}"
        self.run_dir = self.dir / "run"
        self.sock = self.dir / "u.sock"
        self.log_path = self.dir / "ulogd.log"
        self.proc: subprocess.Popen[Any] | None = None
        self.starts = 0
        self.links: list[KernelLink] = []

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.running and self.proc is not None else None

    def argv(self) -> list[str]:
        o = self.owner
        return [
            "-m", "ulogd", "run", "-f", "--cluster", o.mode, "--run-dir", str(self.run_dir),
            "--transport", f"unix:{self.sock}", "--log-level", o.log_level, *o.extra_args,
        ]  # fmt: skip

    def start(self, timeout: float = 15.0) -> None:
        self.launch()
        self.wait_ready(timeout)

    def launch(self) -> None:
        """Start the process without waiting for it (see :meth:`wait_ready`)."""
        if self.running:
            raise ClusterTestError(f"ulogd {self.n} is already running")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        pidfile = self.run_dir / "ulogd.pid"
        with contextlib.suppress(FileNotFoundError):
            pidfile.unlink()
        with open(self.log_path, "ab") as log:
            log.write(f"=== start {self.starts + 1} of ulogd {self.n} ===\n".encode())
            log.flush()
            self.proc = self.owner.corosync.spawn_python(
                self.n, self.argv(), stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        self.starts += 1

    def wait_ready(self, timeout: float = 15.0) -> None:
        pidfile = self.run_dir / "ulogd.pid"

        def ready() -> bool:
            if not self.running:
                raise ClusterTestError(f"ulogd {self.n} exited during start-up:\n{self.log_tail()}")
            return pidfile.exists() and self.sock.exists()

        wait_until(ready, timeout, f"ulogd {self.n} to be ready")

    def kill(self) -> None:
        """SIGKILL (a crash): no goodbye to the group, state files stay as they were."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM and wait; returns the exit status (SIGKILL after *timeout*)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode

    def link(self, timeout: float = 10.0) -> KernelLink:
        k = KernelLink(self.sock, timeout)
        self.links.append(k)
        return k

    def driver(self, uuid: str, luid: int | None = None, timeout: float = 10.0) -> LogDriver:
        """A kernel stand-in for log *uuid* on this node (luid defaults to the node number)."""
        return LogDriver(self.link(timeout), uuid=uuid, luid=self.n if luid is None else luid)

    def kernel(self, uuid: str, ctr_text: str, **kw: Any) -> MirrorKernel:
        """This node's kernel for log *uuid* (see :class:`MirrorKernel`)."""
        k = MirrorKernel(self, uuid, ctr_text, **kw)
        assert isinstance(k.link, KernelLink)
        self.links.append(k.link)
        return k

    def status(self, timeout: float = 5.0) -> dict[str, Any]:
        """The daemon's ``dm-ulogd status --json`` snapshot (over its control socket)."""
        answer = control.request(self.run_dir / control.SOCKET_NAME, "status", timeout=timeout)
        if not answer.get("ok"):
            raise ClusterTestError(f"ulogd {self.n} status failed: {answer}")
        return answer

    def log_status(self, uuid: str) -> dict[str, Any] | None:
        for entry in self.status()["logs"]:
            if entry["uuid"] == uuid:
                return entry  # type: ignore[no-any-return]
        return None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "".join(self.log_text().splitlines(True)[-lines:])

    def close(self) -> None:
        self.kill()
        for k in self.links:
            k.close()
        self.links.clear()




class UlogdCluster:
    """A ulogd daemon per node of a started corosync *cluster* (see the module docstring)."""

    def __init__(
        self,
        corosync: Cluster,
        *,
        mode: str = "corosync",
        log_level: str = "debug",
        base: str | os.PathLike[str] | None = None,
        extra_args: Iterable[str] = (),
    ) -> None:
        self.corosync = corosync
        self.mode = mode
        self.log_level = log_level
        self.extra_args = list(extra_args)
        self._own_base = base is None
        self.base = Path(base) if base else Path(tempfile.mkdtemp(prefix="ulogd-cluster-"))
        self.daemons = {n: Daemon(self, n) for n in range(1, corosync.size + 1)}
        REAPER.watch(self, "close")

    def __enter__(self) -> UlogdCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getitem__(self, n: int) -> Daemon:
        return self.daemons[n]

    def start(self, nodes: Iterable[int] | None = None) -> None:
        """Start the daemons of *nodes* (default all) in parallel; wait until each serves."""
        chosen = [self.daemons[n] for n in (nodes if nodes is not None else self.daemons)]
        for d in chosen:
            d.launch()
        for d in chosen:
            d.wait_ready()

    def kill(self, n: int) -> None:
        self.daemons[n].kill()

    def restart(self, n: int) -> None:
        d = self.daemons[n]
        d.stop()
        d.start()

    def logs(self, lines: int | None = None) -> str:
        parts = []
        for n, d in self.daemons.items():
            text = d.log_text() if lines is None else d.log_tail(lines)
            parts.append(f"----- ulogd {n} ({d.log_path}) -----\n{text}")
        return "\n".join(parts)

    def close(self) -> None:
        for d in self.daemons.values():
            with contextlib.suppress(Exception):
                d.close()
        REAPER.forget(self)
        if self._own_base and os.environ.get("ULOGD_KEEP_CLUSTER_DIR") != "1":
            shutil.rmtree(self.base, ignore_errors=True)


def regions_view(driver: LogDriver, regions: Iterable[int]) -> dict[int, tuple[int, int]]:
    """``region -> (IS_CLEAN, IN_SYNC)`` as this node's replica answers."""
    return {r: (driver.is_clean(r), driver.in_sync(r)) for r in regions}
