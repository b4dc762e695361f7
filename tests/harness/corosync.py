"""Real corosync 3 clusters on one machine, for tests and benchmarks.

Theory of operation
-------------------
corosync is built to be the only one on a host: it hard-codes its lock file
``/run/corosync.pid`` and its client IPC uses fixed abstract unix sockets (``@cpg``,
``@quorum``, ...), which are per *network* namespace.  So:

* every corosync runs in a private mount namespace (``unshare --mount --propagation private``)
  with a per-node directory bind-mounted on ``/run``, and reads a generated config
  (``token: 1000``, ``token_coefficient: 0``, knet, crypto off) whose state dir and log file are
  in that node's directory under a temporary base dir;
* :class:`SingleNode` runs one corosync on loopback in the *current* network namespace, so the
  test process itself can open :class:`cpg.Handle` s.  It refuses to start when some corosync
  already answers there;
* :class:`MultiNode` builds a private network: a bridge namespace ``<prefix>-br`` holding
  ``br0`` and one veth ``bN`` per node, whose peer ``eth0`` lives in node namespace
  ``<prefix>-nN`` with address ``10.231.0.N/24``.  Nothing touches the root namespace's
  interfaces, and the 10.231.0.0/24 addresses exist only inside these namespaces.
  Client processes run inside a node's namespace (:meth:`Cluster.spawn`, :meth:`Cluster.exec`).
  Failures: :meth:`Cluster.kill` (SIGKILL corosync), :meth:`Cluster.revive`,
  :meth:`MultiNode.partition` (detach ``bN`` from the bridge: silent loss both ways) and
  :meth:`MultiNode.heal`.

The prefix is unique per cluster (``ulgc<pid>x<random>``) so leftovers of a crashed run never
collide with a new one; :func:`reap_stale` removes namespaces whose creating process is gone.
Teardown (:meth:`Cluster.stop`, also run by the context manager, the pytest fixtures and an
``atexit`` hook) kills every corosync it started, deletes its namespaces and clears
``/dev/shm/qb-*`` files of its own corosync pids (libqb leaves them after a SIGKILL).

:func:`ensure_installed` installs corosync (and the -dev packages for the header self-check)
from Debian's archive when missing.  Everything here needs root.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import fcntl
import glob
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.harness import apt

#: Debian packages: the daemon and its client libraries (enough for ABI mode).
RUNTIME_PACKAGES = ("corosync", "iproute2")
#: Headers for the API-mode self-check.
DEV_PACKAGES = ("libcpg-dev", "libcorosync-common-dev", "libquorum-dev")

NET = "10.231.0"
TOKEN_MS = 1000
REPO_ROOT = Path(__file__).resolve().parents[2]


class CorosyncError(RuntimeError):
    """A cluster could not be installed, started or driven."""


# -- installation ----------------------------------------------------------------------------


_install_lock = threading.Lock()
install_seconds: float | None = None
"""Time the last :func:`ensure_installed` spent installing (0.0 when nothing was missing)."""


def ensure_installed(dev: bool = True) -> float:
    """Install corosync (+ the -dev packages if *dev*) when missing; return seconds spent."""
    global install_seconds
    with _install_lock:
        wanted = list(RUNTIME_PACKAGES) + (list(DEV_PACKAGES) if dev else [])
        if not apt.missing(wanted):
            install_seconds = 0.0
            return 0.0
        start = time.monotonic()
        try:
            apt.install(wanted)
        except apt.AptError as exc:
            raise CorosyncError(str(exc)) from None
        if os.path.isdir("/run/systemd/system"):  # a distro corosync would own our sockets
            subprocess.run(["systemctl", "stop", "corosync"], capture_output=True)
        install_seconds = time.monotonic() - start
        return install_seconds


# -- helpers ---------------------------------------------------------------------------------


def _run(argv: Sequence[str], check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(argv), capture_output=True, text=True, **kw)
    if check and result.returncode != 0:
        raise CorosyncError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr}")
    return result


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def clean_shm(pid: int) -> int:
    """Delete libqb's ``/dev/shm`` leftovers of corosync *pid*; return how many went."""
    count = 0
    for pattern in (f"/dev/shm/qb-corosync-{pid}-*", f"/dev/shm/qb-{pid}-*"):
        for path in glob.glob(pattern):
            with contextlib.suppress(OSError):
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                else:
                    os.unlink(path)
                count += 1
    return count


def _netns_list() -> list[str]:
    out = _run(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _netns_kill_and_delete(ns: str) -> None:
    pids = _run(["ip", "netns", "pids", ns], check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    _run(["ip", "netns", "delete", ns], check=False)


def reap_stale() -> list[str]:
    """Remove what dead runs of this module left: namespaces (with their processes) and
    corosyncs whose config lives in a ``ulgc<pid>x...`` directory of a dead *pid*.

    Returns the names of the namespaces and ``corosync:<pid>`` entries it removed.
    """
    reaped = []
    for ns in _netns_list():
        m = re.fullmatch(r"ulgc(\d+)x[0-9a-f]+-(br|n\d+)", ns)
        if m and not _alive(int(m.group(1))):
            _netns_kill_and_delete(ns)
            reaped.append(ns)
    for cmdline in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            with open(cmdline, "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if not argv or not argv[0].endswith(b"corosync"):
            continue
        hit = re.search(rb"/ulgc(\d+)x[0-9a-f]+-[^/]*/", b" ".join(argv))
        if hit and not _alive(int(hit.group(1))):
            pid = int(cmdline.split("/")[2])
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            reaped.append(f"corosync:{pid}")
    return reaped


def corosync_conf(
    cluster_name: str,
    addrs: Sequence[str],
    base: Path,
    token: int = TOKEN_MS,
    two_node: bool = False,
) -> str:
    """A corosync.conf for nodes 1..N at *addrs*; state and log under *base*.

    ``two_node``: votequorum's two-node mode (the survivor of a pair keeps quorum; meant for
    clusters with fencing, as the two-guest e2e scenario's kill models)."""
    quorum_extra = "\n    two_node: 1" if two_node else ""
    nodes = "\n".join(
        f"    node {{\n        nodeid: {i}\n        name: node{i}\n        ring0_addr: {addr}\n"
        "    }"
        for i, addr in enumerate(addrs, start=1)
    )
    return f"""# generated by tests.harness.corosync
totem {{
    version: 2
    cluster_name: {cluster_name}
    transport: knet
    crypto_cipher: none
    crypto_hash: none
    token: {token}
    token_coefficient: 0
    interface {{
        linknumber: 0
        mcastport: 5405
    }}
}}
nodelist {{
{nodes}
}}
quorum {{
    provider: corosync_votequorum{quorum_extra}
}}
logging {{
    to_stderr: no
    to_syslog: no
    to_logfile: yes
    logfile: {base}/corosync.log
    timestamp: hires
}}
system {{
    state_dir: {base}/lib
    sched_rr: no
}}
"""


@dataclasses.dataclass
class Node:
    """One corosync: node id *index*, its address, namespace (None: current) and files."""

    index: int
    addr: str
    netns: str | None
    dir: Path
    proc: subprocess.Popen[bytes] | None = None
    pids: list[int] = dataclasses.field(default_factory=list)
    partitioned: bool = False

    @property
    def conf(self) -> Path:
        return self.dir / "corosync.conf"

    @property
    def log(self) -> Path:
        return self.dir / "corosync.log"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.running and self.proc is not None else None


class Reaper:
    """The one ``atexit`` hook of the harness: every object that owns processes (a corosync
    :class:`Cluster`, a :class:`tests.harness.cluster.UlogdCluster`) is stopped at exit if
    it is still running, newest first (the daemons before the corosync they run on)."""

    def __init__(self) -> None:
        self._live: dict[int, tuple[weakref.ref[Any], str]] = {}
        atexit.register(self._reap)

    def watch(self, thing: Any, stop: str) -> None:
        """Call ``thing.<stop>()`` at exit unless :meth:`forget` is called first."""
        key = id(thing)
        self._live[key] = (weakref.ref(thing, lambda _ref: self._live.pop(key, None)), stop)

    def forget(self, thing: Any) -> None:
        self._live.pop(id(thing), None)

    def _reap(self) -> None:
        for ref, stop in reversed(list(self._live.values())):
            thing = ref()
            if thing is not None:
                with contextlib.suppress(Exception):
                    getattr(thing, stop)()


REAPER = Reaper()


class Cluster:
    """Common machinery; use :class:`SingleNode` or :class:`MultiNode`."""

    name = "cluster"

    def __init__(
        self,
        size: int,
        base_dir: str | os.PathLike[str] | None = None,
        token: int = TOKEN_MS,
        ready_timeout: float = 20.0,
    ) -> None:
        self.size = size
        self.token = token
        self.ready_timeout = ready_timeout
        self.prefix = f"ulgc{os.getpid()}x{secrets.token_hex(3)}"
        self._own_base = base_dir is None
        self.base = Path(base_dir or tempfile.mkdtemp(prefix=f"{self.prefix}-"))
        self.nodes: list[Node] = []
        self.started = False
        self.start_seconds: float | None = None
        self.stop_seconds: float | None = None
        self._spawned: list[subprocess.Popen[Any]] = []

    # -- to be provided by subclasses --------------------------------------------------------

    def _addrs(self) -> list[str]:
        raise NotImplementedError

    def _netns(self, index: int) -> str | None:
        raise NotImplementedError

    def _setup_network(self) -> None:
        pass

    def _teardown_network(self) -> None:
        pass

    # -- life cycle --------------------------------------------------------------------------

    def __enter__(self) -> Cluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> Cluster:
        """Create namespaces, write configs, start every node and wait until all are joined."""
        if self.started:
            raise CorosyncError("cluster already started")
        ensure_installed(dev=False)
        begin = time.monotonic()
        REAPER.watch(self, "stop")
        self.started = True
        try:
            self._setup_network()
            addrs = self._addrs()
            for i, addr in enumerate(addrs, start=1):
                node_dir = self.base / f"n{i}"
                for sub in ("run", "lib"):
                    (node_dir / sub).mkdir(parents=True, exist_ok=True)
                node = Node(i, addr, self._netns(i), node_dir)
                node.conf.write_text(corosync_conf(self.prefix, addrs, node_dir, self.token))
                self.nodes.append(node)
            for node in self.nodes:
                self._launch(node)
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - begin
        return self

    def _prefix_argv(self, netns: str | None) -> list[str]:
        return ["ip", "netns", "exec", netns] if netns else []

    def _launch(self, node: Node) -> None:
        script = f"mount --bind {node.dir}/run /run && exec corosync -f -c {node.conf}"
        argv = [
            *self._prefix_argv(node.netns),
            "unshare", "--mount", "--propagation", "private", "sh", "-c", script,
        ]  # fmt: skip
        with open(node.dir / "stdout.log", "ab") as out:
            node.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        node.pids.append(node.proc.pid)  # ip, unshare and sh all exec: this is corosync's pid

    def node(self, n: int) -> Node:
        if not 1 <= n <= len(self.nodes):
            raise CorosyncError(f"no node {n} (cluster of {len(self.nodes)})")
        return self.nodes[n - 1]

    def stop(self, graceful: bool = False) -> None:
        """Tear everything down (idempotent, never raises for leftovers).

        By default corosyncs are SIGKILLed (instant); *graceful* sends SIGTERM first and waits
        up to 10 s (knet teardown takes 2-3 s).
        """
        begin = time.monotonic()
        for proc in self._spawned:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
        for proc in self._spawned:
            with contextlib.suppress(Exception):
                proc.wait(timeout=5)
        self._spawned.clear()
        running = [n for n in self.nodes if n.running]
        if graceful:
            for node in running:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(node.proc.pid, signal.SIGTERM)  # type: ignore[union-attr]
            deadline = time.monotonic() + 10
            for node in running:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    node.proc.wait(timeout=max(0.0, deadline - time.monotonic()))  # type: ignore[union-attr]
        for node in self.nodes:
            if node.running:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(node.proc.pid, signal.SIGKILL)  # type: ignore[union-attr]
                node.proc.wait()  # type: ignore[union-attr]
            for pid in node.pids:
                clean_shm(pid)
        with contextlib.suppress(Exception):
            self._teardown_network()
        if self._own_base and os.environ.get("ULOGD_KEEP_COROSYNC_DIR") != "1":
            shutil.rmtree(self.base, ignore_errors=True)
        self.started = False
        REAPER.forget(self)
        self.stop_seconds = time.monotonic() - begin

    # -- readiness ---------------------------------------------------------------------------

    def quorum_status(self, n: int) -> dict[str, str]:
        """``corosync-quorumtool -s`` of node *n* as a dict (empty when it does not answer)."""
        out = self.exec(n, ["corosync-quorumtool", "-s"], check=False, timeout=5)
        status: dict[str, str] = {}
        for line in out.stdout.splitlines():
            key, sep, value = line.partition(":")
            if sep and value.strip():
                status.setdefault(key.strip(), value.strip())
        return status

    def members(self, n: int) -> int | None:
        """How many nodes node *n* sees in its membership (None: not answering)."""
        value = self.quorum_status(n).get("Nodes")
        return int(value) if value and value.isdigit() else None

    def expected_view(self, n: int) -> int:
        """Members node *n* should see given what is running and partitioned."""
        node = self.node(n)
        if node.partitioned:
            return 1
        return sum(1 for m in self.nodes if m.running and not m.partitioned)

    def wait_ready(self, nodes: Sequence[int] | None = None, timeout: float | None = None) -> None:
        """Poll until each of *nodes* (default all running) sees its expected membership."""
        wanted = list(nodes) if nodes is not None else [n.index for n in self.nodes if n.running]
        deadline = time.monotonic() + (timeout or self.ready_timeout)
        pending = set(wanted)
        while pending:
            for n in sorted(pending):
                if not self.node(n).running:
                    raise CorosyncError(f"corosync {n} exited; log:\n{self.log_tail(n)}")
                if self.members(n) == self.expected_view(n):
                    pending.discard(n)
            if not pending:
                return
            if time.monotonic() > deadline:
                raise CorosyncError(
                    f"nodes {sorted(pending)} not ready; log of {min(pending)}:\n"
                    + self.log_tail(min(pending))
                )
            time.sleep(0.05)

    def log_tail(self, n: int, lines: int = 30) -> str:
        node = self.node(n)
        text = ""
        for path in (node.log, node.dir / "stdout.log"):
            with contextlib.suppress(OSError):
                text += "".join(path.read_text(errors="replace").splitlines(True)[-lines:])
        return text

    # -- failures ----------------------------------------------------------------------------

    def kill(self, n: int) -> None:
        """SIGKILL corosync *n* and wait until it is gone."""
        node = self.node(n)
        if not node.running:
            raise CorosyncError(f"corosync {n} is not running")
        assert node.proc is not None
        os.kill(node.proc.pid, signal.SIGKILL)
        node.proc.wait()
        clean_shm(node.proc.pid)

    def revive(self, n: int, wait: bool = True) -> None:
        """Start corosync *n* again (same config) and wait until it has its membership."""
        node = self.node(n)
        if node.running:
            raise CorosyncError(f"corosync {n} is running")
        self._launch(node)
        if wait:
            self.wait_ready([n])

    # -- running things inside a node's namespace --------------------------------------------

    def argv(self, n: int, argv: Sequence[str]) -> list[str]:
        """*argv* wrapped so that it runs in node *n*'s network namespace."""
        return [*self._prefix_argv(self.node(n).netns), *argv]

    def exec(
        self, n: int, argv: Sequence[str], check: bool = True, timeout: float | None = 30, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run *argv* to completion in node *n*'s namespace; output captured as text."""
        return _run(self.argv(n, argv), check=check, timeout=timeout, **kw)

    def spawn(self, n: int, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start *argv* in node *n*'s namespace; killed at teardown if still running."""
        proc = subprocess.Popen(self.argv(n, argv), **kw)
        self._spawned.append(proc)
        return proc

    def spawn_python(self, n: int, args: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start this interpreter (with the repository on ``PYTHONPATH``) in node *n*."""
        env = dict(kw.pop("env", None) or os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p
        )
        return self.spawn(n, [sys.executable, *args], env=env, **kw)


class SingleNode(Cluster):
    """One corosync on 127.0.0.1 in the current network namespace.

    Only one corosync can serve a network namespace, so single-node clusters of concurrent
    test runs take turns: :meth:`start` waits up to *lock_timeout* seconds for an exclusive
    ``flock`` keyed by the namespace, held until :meth:`stop`.
    """

    name = "single"

    def __init__(
        self,
        base_dir: str | os.PathLike[str] | None = None,
        lock_timeout: float = 300.0,
        **kw: Any,
    ) -> None:
        super().__init__(1, base_dir, **kw)
        self.lock_timeout = lock_timeout
        self._lock: Any = None

    def _acquire_lock(self) -> None:
        lock_dir = "/run/lock" if os.path.isdir("/run/lock") else tempfile.gettempdir()
        inode = os.stat("/proc/self/ns/net").st_ino
        lock = open(os.path.join(lock_dir, f"ulogd-corosync-net{inode}.lock"), "w")  # noqa: SIM115
        deadline = time.monotonic() + self.lock_timeout
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    lock.close()
                    raise CorosyncError(
                        f"another single-node cluster is busy in this network namespace "
                        f"(waited {self.lock_timeout} s)"
                    ) from None
                time.sleep(0.1)
        self._lock = lock

    def _addrs(self) -> list[str]:
        return ["127.0.0.1"]

    def _netns(self, index: int) -> str | None:
        return None

    def _setup_network(self) -> None:
        self._acquire_lock()
        probe = _run(["corosync-cfgtool", "-s"], check=False, timeout=5)
        if probe.returncode == 0:
            reap_stale()  # a corosync of a dead run of ours?
            time.sleep(0.2)
            probe = _run(["corosync-cfgtool", "-s"], check=False, timeout=5)
        if probe.returncode == 0:
            raise CorosyncError(
                "a corosync already answers in this network namespace; stop it first"
            )
        # Loopback must be up (it is on a normal host; in a fresh namespace it is not).
        _run(["ip", "link", "set", "lo", "up"], check=False)

    def _teardown_network(self) -> None:
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.close()


class MultiNode(Cluster):
    """*size* corosyncs, each in its own network namespace, bridged on 10.231.0.0/24."""

    name = "multi"

    def __init__(
        self, size: int = 3, base_dir: str | os.PathLike[str] | None = None, **kw: Any
    ) -> None:
        if not 1 <= size <= 32:
            raise ValueError("1..32 nodes")
        super().__init__(size, base_dir, **kw)

    @property
    def bridge_ns(self) -> str:
        return f"{self.prefix}-br"

    def _netns(self, index: int) -> str:
        return f"{self.prefix}-n{index}"

    def _addrs(self) -> list[str]:
        return [f"{NET}.{i}" for i in range(1, self.size + 1)]

    def _setup_network(self) -> None:
        reap_stale()
        br = self.bridge_ns
        _run(["ip", "netns", "add", br])
        _run(["ip", "-n", br, "link", "add", "br0", "type", "bridge"])
        _run(["ip", "-n", br, "link", "set", "br0", "up"])
        _run(["ip", "-n", br, "link", "set", "lo", "up"])
        for i in range(1, self.size + 1):
            ns = self._netns(i)
            _run(["ip", "netns", "add", ns])
            _run(["ip", "-n", br, "link", "add", f"b{i}", "type", "veth",
                  "peer", "name", "eth0", "netns", ns])  # fmt: skip
            _run(["ip", "-n", br, "link", "set", f"b{i}", "master", "br0"])
            _run(["ip", "-n", br, "link", "set", f"b{i}", "up"])
            _run(["ip", "-n", ns, "addr", "add", f"{NET}.{i}/24", "dev", "eth0"])
            _run(["ip", "-n", ns, "link", "set", "eth0", "up"])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])

    def _teardown_network(self) -> None:
        for i in range(1, self.size + 1):
            _netns_kill_and_delete(self._netns(i))
        _netns_kill_and_delete(self.bridge_ns)

    def partition(self, n: int) -> None:
        """Cut node *n* off the bridge (both directions, silently)."""
        _run(["ip", "-n", self.bridge_ns, "link", "set", f"b{n}", "nomaster"])
        self.node(n).partitioned = True

    def heal(self, n: int) -> None:
        """Put node *n* back on the bridge."""
        _run(["ip", "-n", self.bridge_ns, "link", "set", f"b{n}", "master", "br0"])
        self.node(n).partitioned = False


# -- scripted CPG members --------------------------------------------------------------------


class MemberClient:
    """Drives one ``python -m cpg.member`` process (see :mod:`cpg.member`) inside a node.

    Commands go to its stdin; a reader thread collects its JSON events in :attr:`events`;
    its stderr goes to :attr:`stderr_path` in the cluster's directory.
    """

    _count = 0

    def __init__(self, cluster: Cluster, n: int, ready_timeout: float = 10.0) -> None:
        self.cluster = cluster
        self.n = n
        self.events: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        MemberClient._count += 1
        self.stderr_path = cluster.base / f"member-n{n}-{MemberClient._count}.stderr"
        with open(self.stderr_path, "w") as err:  # a file: a full pipe would block the member
            self.proc = cluster.spawn_python(
                n, ["-m", "cpg.member"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=err, text=True, bufsize=1,
            )  # fmt: skip
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        ready = self.wait_for("ready", timeout=ready_timeout)
        self.nodeid: int = ready["nodeid"]
        self.pid: int = ready["pid"]
        self.max_msg: int = ready["max"]

    def _read(self) -> None:
        import json

        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                event = {"ev": "garbage", "line": line}
            with self._cond:
                self.events.append(event)
                self._cond.notify_all()
        with self._cond:
            self.events.append({"ev": "eof", "t": time.time()})
            self._cond.notify_all()

    @property
    def ident(self) -> tuple[int, int]:
        return (self.nodeid, self.pid)

    def stderr_tail(self, chars: int = 2000) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def mark(self) -> int:
        """Index of the next event (for ``wait_for(..., after=mark)``)."""
        with self._cond:
            return len(self.events)

    def of(self, ev: str, after: int = 0) -> list[dict[str, Any]]:
        with self._cond:
            return [e for e in self.events[after:] if e["ev"] == ev]

    def wait_for(
        self, ev: str, timeout: float = 10.0, pred: Any = None, after: int = 0
    ) -> dict[str, Any]:
        """The first event *ev* (index >= *after*) satisfying *pred*; raises on timeout/EOF."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for event in self.events[after:]:
                    if event["ev"] == ev and (pred is None or pred(event)):
                        return event
                    if event["ev"] == "eof" and ev != "eof":
                        raise CorosyncError(
                            f"member {self.n} exited waiting for {ev}: {self.stderr_tail()}"
                        )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CorosyncError(
                        f"member on node {self.n}: no {ev!r} in {timeout} s; last events: "
                        f"{self.events[-5:]}"
                    )
                self._cond.wait(left)

    def request(self, line: str, ev: str, timeout: float = 10.0) -> dict[str, Any]:
        """Send *line* and wait for the next *ev* event after it."""
        with self._cond:
            mark = len(self.events)
        self.send(line)
        return self.wait_for(ev, timeout, after=mark)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.send("exit")
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.kill()


def member(cluster: Cluster, n: int) -> MemberClient:
    """Start a scripted CPG member in node *n* (killed at the cluster's teardown)."""
    return MemberClient(cluster, n)
