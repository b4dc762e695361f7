"""The control socket of a real daemon process: root accepted, non-root refused, bad requests
answered with an error, and the daemon unharmed by any of it.

:class:`DaemonProcess` (also used by ``test_status`` and ``test_metrics``) runs
``python -m ulogd run -f --transport unix:PATH --run-dir DIR`` and waits until its control
socket answers ``ping``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from ulogd.ops import control, service

NOBODY = 65534

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (setuid to nobody)")


class DaemonProcess:
    """A ``dm-ulogd run -f`` child process on the unix test transport."""

    def __init__(self, base: Path, *extra: str, run_dir: Path | None = None) -> None:
        self.base = base
        self.run_dir = run_dir or base / "run"
        self.transport = str(base / "ulogd.sock")
        self.control = self.run_dir / control.SOCKET_NAME
        self.stderr_path = base / "daemon.log"
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> DaemonProcess:
        env = dict(os.environ)
        env.pop("NOTIFY_SOCKET", None)
        env.pop("WATCHDOG_USEC", None)
        with contextlib.suppress(FileNotFoundError):
            self.control.unlink()
        self._log = open(self.stderr_path, "ab")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ulogd",
                "run",
                "-f",
                "--transport",
                f"unix:{self.transport}",
                "--run-dir",
                str(self.run_dir),
                *self.extra,
            ],
            stderr=self._log,
            stdout=self._log,
            env=env,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}: {self.log()}")
            with contextlib.suppress(OSError, ValueError):
                if control.request(self.control, "ping", timeout=2)["ok"]:
                    return self
            time.sleep(0.05)
        raise AssertionError(f"daemon did not answer ping: {self.log()}")

    def log(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def request(self, command: str) -> dict:
        return control.request(self.control, command)

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> DaemonProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def raw_exchange(path: Path, data: bytes, *, shut: bool = False) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(data)
        if shut:
            sock.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply.endswith(b"\n"), reply
    return json.loads(reply)


def in_child_as_nobody(work) -> dict:  # type: ignore[no-untyped-def]
    """Run ``work()`` (returning a JSON-able dict) in a forked child as uid/gid nobody."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 0
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            os.write(write_end, json.dumps({"uid": os.getuid(), **work()}).encode())
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return json.loads(data)


def as_nobody(path: Path) -> dict:
    """``status`` over the control socket from a child that switched to uid/gid nobody."""

    def work() -> dict:
        try:
            return control.request(path, "status", timeout=5)
        except OSError as exc:
            return {"oserror": type(exc).__name__, "errno": exc.errno}

    return in_child_as_nobody(work)


@pytest.fixture
def daemon(tmp_path: Path):
    with DaemonProcess(tmp_path) as d:
        yield d


@pytest.fixture
def open_dir():
    """A world-traversable directory, as a RuntimeDirectoryMode=0755 run directory would be
    (pytest's own tmp_path is 0700 and would stop nobody before the socket)."""
    path = Path(tempfile.mkdtemp(prefix="ulogd-ctl-"))
    path.chmod(0o755)
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


def test_root_is_answered(daemon: DaemonProcess) -> None:
    answer = daemon.request("ping")
    assert answer["ok"] is True
    assert answer["pid"] == daemon.proc.pid
    status = daemon.request("status")
    assert status["ok"] and status["logs"] == []
    assert status["daemon"]["transport"] == "unix"


def test_socket_is_private_and_removed_on_stop(daemon: DaemonProcess) -> None:
    st = os.stat(daemon.control)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == 0
    assert daemon.stop() == 0
    assert not daemon.control.exists()


def test_non_root_refused_by_peer_credentials(open_dir: Path) -> None:
    run_dir = open_dir / "run"
    run_dir.mkdir(mode=0o755)
    run_dir.chmod(0o755)
    with DaemonProcess(open_dir, run_dir=run_dir) as d:
        # Widen the socket's permissions so that only SO_PEERCRED stands in the way.
        d.control.chmod(0o666)
        answer = as_nobody(d.control)
        assert answer["uid"] == NOBODY
        assert answer["ok"] is False
        assert "permission denied" in answer["error"]
        assert "root only" in answer["error"]
        assert str(NOBODY) in answer["error"]
        assert "logs" not in answer and "daemon" not in answer
        # Root still is served afterwards.
        assert d.request("status")["ok"] is True
    assert f"refused a client with uid {NOBODY}" in d.log()


def test_non_root_stopped_by_file_mode_too(open_dir: Path) -> None:
    run_dir = open_dir / "run"
    run_dir.mkdir(mode=0o755)
    run_dir.chmod(0o755)
    with DaemonProcess(open_dir, run_dir=run_dir) as d:
        answer = as_nobody(d.control)  # socket left at 0600
        assert answer == {"uid": NOBODY, "oserror": "PermissionError", "errno": 13}


def test_cli_as_non_root_gives_a_clear_error(daemon: DaemonProcess) -> None:
    def work() -> dict:
        import io

        from ulogd.ops import cli

        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = cli.main(["status", "--run-dir", str(daemon.run_dir)])
        return {"code": code, "stderr": err.getvalue()}

    result = in_child_as_nobody(work)
    assert result["code"] == 4, result
    assert "must be run as root" in result["stderr"]
    assert "Traceback" not in result["stderr"]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"this is not json\n", "malformed request (expected JSON)"),
        (b"\xff\xfe\n", "malformed request (expected JSON)"),
        (b"[1, 2, 3]\n", 'expected {"command": "..."}'),
        (b'{"cmd": "status"}\n', 'expected {"command": "..."}'),
        (b'{"command": 7}\n', 'expected {"command": "..."}'),
        (b'{"command": "reboot"}\n', "unknown command 'reboot'"),
    ],
)
def test_malformed_requests_get_an_error_reply(
    daemon: DaemonProcess, data: bytes, expected: str
) -> None:
    answer = raw_exchange(daemon.control, data)
    assert answer["ok"] is False
    assert expected in answer["error"]
    assert daemon.request("ping")["ok"]


def test_request_without_newline_is_answered_at_eof(daemon: DaemonProcess) -> None:
    answer = raw_exchange(daemon.control, b'{"command": "ping"}', shut=True)
    assert answer["ok"] is True


def test_oversized_request_refused(daemon: DaemonProcess) -> None:
    answer = raw_exchange(daemon.control, b"x" * (service.MAX_REQUEST + 10))
    assert answer["ok"] is False
    assert "larger than" in answer["error"]
    assert daemon.request("ping")["ok"]


def test_idle_clients_cannot_exhaust_the_daemon(daemon: DaemonProcess) -> None:
    idle = []
    try:
        for _ in range(service.MAX_CONNECTIONS + 10):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(daemon.control))
            idle.append(s)
        assert daemon.request("ping")["ok"]
        # Connections beyond the limit pushed the oldest out: they see EOF.
        idle[0].settimeout(5)
        assert idle[0].recv(10) == b""
    finally:
        for s in idle:
            s.close()
    assert daemon.request("status")["ok"]


def test_peer_without_credentials_is_refused() -> None:
    server = control.ControlServer.__new__(control.ControlServer)  # handle() needs no socket
    server.commands = {}
    reply = json.loads(server.handle(b'{"command": "status"}', None))
    assert reply["ok"] is False and "root only" in reply["error"]
    reply = json.loads(server.handle(b'{"command": "status"}', control.Peer(1, 1000, 1000)))
    assert reply["ok"] is False and "your uid is 1000" in reply["error"]


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, every thread included (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_at_the_descriptor_limit_the_listener_backs_off_and_recovers(
    daemon: DaemonProcess,
) -> None:
    pid = daemon.proc.pid
    limit = len(os.listdir(f"/proc/{pid}/fd")) + 3  # room for three connections, no more
    subprocess.run(["prlimit", f"--pid={pid}", f"--nofile={limit}:{limit}"], check=True)
    idle = []
    try:
        for _ in range(8):  # three accepted and held open, the rest queued
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(daemon.control))
            idle.append(s)
        deadline = time.monotonic() + 10
        while "cannot accept connections" not in daemon.log():
            assert time.monotonic() < deadline, daemon.log()
            time.sleep(0.05)
        # The episode lasts while the clients stay: a spinning loop would burn a core and
        # log a line per attempt; a paused listener costs next to nothing.
        before = _cpu_seconds(pid)
        time.sleep(2.0)
        spent = _cpu_seconds(pid) - before
        assert spent < 0.3, f"{spent:.2f} s of CPU in a 2 s episode"
    finally:
        for s in idle:
            s.close()
    # the descriptors are free again: the queued clients and a new status are answered
    assert control.request(daemon.control, "status", timeout=10)["ok"] is True
    deadline = time.monotonic() + 10
    while "accepting connections again" not in daemon.log():  # the episode's end
        assert time.monotonic() < deadline, daemon.log()
        time.sleep(0.05)
    text = daemon.log()
    assert text.count("cannot accept connections") == 1, text[-2000:]
    assert "Too many open files" in text
    assert text.count("accepting connections again") == 1
    assert daemon.request("ping")["ok"]
