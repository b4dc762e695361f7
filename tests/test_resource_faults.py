"""Resource faults of a real daemon process (issue 14): a full run directory (a real, small
tmpfs), the descriptor limit (a real ``RLIMIT_NOFILE``) and many logs.  Each fault costs the
request that met it an error reply and one log line; every other log keeps its state and is
served; a restart after ``kill -9`` restores everything that was made."""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ulogd.edges.transport.unixsock import UnixClient
from ulogd.protocol import wire
from ulogd.protocol.spec import RequestType as T
from ulogd.state import statefile
from ulogd.state.statefile import StateDir
from ulogd.testing.driver import LogDriver

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mount, rlimits)")

BIG = 1 << 20  # regions: a 397 312-byte state file
BIG_CTR = f"{BIG * 8} core 8 nosync"


class Daemon:
    """``ulogd run -f`` on the unix test transport, optionally under a descriptor limit."""

    def __init__(self, base: Path, run_dir: Path) -> None:
        self.base = base
        self.run_dir = run_dir
        self.sock = str(base / "ulogd.sock")
        self.log_path = base / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, nofile: tuple[int, int] | None = None, *, wait: bool = True) -> Daemon:
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}

        def limit() -> None:
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, nofile)

        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ulogd", "run", "-f", "--transport", f"unix:{self.sock}",
                 "--run-dir", str(self.run_dir), "--log-level", "info"],
                stdout=out, stderr=out, env=env, preexec_fn=limit, close_fds=True,
            )  # fmt: skip
        if wait:
            self.wait_serving()
        return self

    def wait_serving(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}: {self.log()}")
            with contextlib.suppress(OSError), UnixClient(self.sock, timeout=1) as c:
                probe = wire.encode_request(T.GET_SYNC_COUNT, uuid="LVM-probe", seq=1)
                if wire.decode_reply(c.request(probe)).error == -errno.ESRCH:
                    return
            time.sleep(0.05)
        raise AssertionError(f"daemon does not serve: {self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill9()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path, tmp_path / "run")
    yield d
    d.stop()


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A real 2 MiB tmpfs as the run directory (room for five logs of 2^20 regions)."""
    mnt = tmp_path / "run"
    mnt.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _driver(client: UnixClient, i: int | str) -> LogDriver:
    return LogDriver(client, uuid=f"LVM-res-{i}", luid=1)


def _lines(text: str, needle: str) -> list[str]:
    return [line for line in text.splitlines() if needle in line]


# ---------------------------------------------------------------------------------- space


def test_a_full_run_directory_refuses_one_ctr_and_the_restart_works(
    daemon: Daemon, small_tmpfs: Path, tmp_path: Path
) -> None:
    daemon.start()
    made: list[LogDriver] = []
    with UnixClient(daemon.sock) as c:
        for i in range(10):
            d = _driver(c, i)
            reply = d.ctr(BIG_CTR)
            if reply.error:
                break
            d.ok(T.RESUME)
            d.mark([i, BIG - 1 - i])
            made.append(d)
        assert reply.error == -errno.ENOSPC, reply
        assert len(made) >= 4
        refused = d.uuid
        # Every other log keeps its state and is served; nothing half-made is left.
        for i, d in enumerate(made):
            assert d.is_clean(i) == 0 and d.is_clean(BIG - 1 - i) == 0 and d.is_clean(BIG // 2)
        assert daemon.proc is not None and daemon.proc.poll() is None
    assert list((small_tmpfs / "logs").glob("*.new")) == []
    assert len(list((small_tmpfs / "logs").glob("*.state"))) == len(made)
    lines = _lines(daemon.log(), refused[-8:])
    assert len(lines) == 1 and "No space left on device" in lines[0], lines
    daemon.kill9()

    # A file an older daemon made sparse (ftruncate) that the full tmpfs cannot back.
    elsewhere = StateDir(tmp_path / "elsewhere")
    st = elsewhere.create("LVM-sparse", 1, BIG, 8, BIG_CTR)
    st.close()
    sparse = small_tmpfs / "logs" / st.path.name
    with open(sparse, "wb") as fh:
        fh.write(st.path.read_bytes()[: statefile.HEADER_SIZE])
        fh.truncate(statefile.file_size(BIG))

    daemon.start()  # the restart works
    with UnixClient(daemon.sock) as c:
        for i, d in enumerate(made):
            d.link = c
            assert d.is_clean(i) == 0 and d.is_clean(BIG - 1 - i) == 0 and d.is_clean(BIG // 2)
        assert LogDriver(c, uuid="LVM-sparse", luid=1).call(T.GET_SYNC_COUNT).error == (
            -errno.ESRCH
        )
    assert sparse.with_suffix(".unbacked").exists() and not sparse.exists()
    assert len(_lines(daemon.log(), "moved aside as .unbacked")) == 1
    daemon.kill9()
    daemon.start()  # and again
    daemon.stop()


# ---------------------------------------------------------------------------------- descriptors


def _make_logs(daemon: Daemon, count: int, text: str = "512 core 8 nosync") -> None:
    with UnixClient(daemon.sock) as c:
        for i in range(count):
            d = _driver(c, i)
            assert d.ctr(text).error == 0, i
            d.ok(T.RESUME)
            d.mark([i % 64])


def _check_logs(daemon: Daemon, count: int) -> None:
    with UnixClient(daemon.sock) as c:
        for i in range(count):
            d = _driver(c, i)
            assert d.is_clean(i % 64) == 0, i
            assert d.is_clean((i + 1) % 64) == 1, i


def test_the_fd_limit_at_restore_fails_the_start_cleanly_and_renames_nothing(
    daemon: Daemon,
) -> None:
    daemon.start()
    _make_logs(daemon, 60)
    daemon.kill9()
    logs = daemon.run_dir / "logs"
    before = sorted(p.name for p in logs.iterdir())
    daemon.start((64, 64), wait=False)
    assert daemon.proc is not None
    assert daemon.proc.wait(timeout=60) == 3  # EXIT_SETUP
    text = daemon.log()
    assert "Traceback" not in text
    (line,) = _lines(text, "cannot start")
    assert "cannot restore" in line and "Too many open files" in line, line
    assert sorted(p.name for p in logs.iterdir()) == before  # nothing renamed
    daemon.start()  # a start with enough descriptors restores every log
    _check_logs(daemon, 60)


def test_descriptor_limits_at_start_up_never_cost_a_traceback(daemon: Daemon) -> None:
    """From too few descriptors to start at all to enough: every start either serves or
    exits with one 'cannot start' line, and no state file is touched."""
    daemon.start()
    _make_logs(daemon, 3)
    daemon.kill9()
    logs = daemon.run_dir / "logs"
    before = sorted(p.name for p in logs.iterdir())
    outcomes = []
    for limit in range(8, 24):
        daemon.log_path.write_bytes(b"")
        daemon.start((limit, limit), wait=False)
        assert daemon.proc is not None
        try:
            daemon.wait_serving()
        except AssertionError:
            assert daemon.proc.wait(timeout=30) == 3, daemon.log()
            text = daemon.log()
            assert "Traceback" not in text, text
            (line,) = _lines(text, "cannot start")
            assert "Too many open files" in line, line
            outcomes.append("cannot start")
        else:
            outcomes.append("serving")
            _check_logs(daemon, 3)
            daemon.kill9()
        assert sorted(p.name for p in logs.iterdir()) == before
    assert outcomes[0] == "cannot start" and outcomes[-1] == "serving", outcomes


def test_the_pid_file_at_the_fd_limit_is_a_clean_start_error(tmp_path: Path) -> None:
    """Every descriptor taken (a real RLIMIT_NOFILE, in a child): writing the pid file fails
    with a RuntimeError that names it, and leaves no half-written file."""
    script = f"""
import os, resource
from pathlib import Path
from ulogd.edges.daemon import Daemon
from ulogd.engine.server import Server
from ulogd.edges.transport.unixsock import UnixServerTransport
run = Path({str(tmp_path / "run")!r})
d = Daemon(Server(), UnixServerTransport({str(tmp_path / "s")!r}), run_dir=run)
d.lock_run_dir()
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
held = []
try:
    while True:
        held.append(os.open("/dev/null", os.O_RDONLY))
except OSError:
    pass
try:
    d.announce_ready()
except RuntimeError as exc:
    print("refused:", exc)
for fd in held:
    os.close(fd)
print(sorted(p.name for p in run.iterdir()))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    refused, names = done.stdout.splitlines()
    assert refused.startswith("refused: cannot write the pid file") and "Too many open" in refused
    assert names == "['ulogd.lock']"


def test_at_the_fd_limit_a_ctr_gets_emfile_and_each_log_holds_one_descriptor(
    daemon: Daemon,
) -> None:
    daemon.start((100, 100))
    assert daemon.proc is not None
    base = len(os.listdir(f"/proc/{daemon.proc.pid}/fd"))
    made = 0
    with UnixClient(daemon.sock) as c:
        while True:
            d = _driver(c, made)
            reply = d.ctr("512 core 8 nosync")
            if reply.error:
                break
            d.ok(T.RESUME)
            d.mark([made % 64])
            made += 1
            assert made < 100
        assert reply.error == -errno.EMFILE
        refused = d.uuid
        held = len(os.listdir(f"/proc/{daemon.proc.pid}/fd")) - base
        assert held == made  # one descriptor per log
        assert made >= 100 - base - 1
        lines = _lines(daemon.log(), refused[-8:])
        assert len(lines) == 1 and "Too many open files" in lines[0], lines
        # Every log made is served; one removed frees a descriptor for the next CTR.
        for i in range(made):
            assert _driver(c, i).is_clean(i % 64) == 0
        assert _driver(c, 0).call(T.DTR).error == 0
        assert d.ctr("512 core 8 nosync").error == 0


# ---------------------------------------------------------------------------------- many logs


def _many(daemon: Daemon, count: int) -> None:
    # As systemd starts a service by default: a soft limit of 1024 under a higher hard one
    # (524288 there; what this machine allows here); ulogd takes the hard one.
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    assert hard >= count + 100, f"this machine's hard limit {hard} is too low for the test"
    daemon.start((1024, hard))
    _make_logs(daemon, count)
    daemon.kill9()
    daemon.start((1024, hard))
    _check_logs(daemon, count)
    assert f"ready: {count} log(s) restored" in daemon.log()


def test_more_logs_than_the_default_soft_limit_are_made_and_restored(daemon: Daemon) -> None:
    _many(daemon, 1500)


@pytest.mark.slow
def test_the_supported_10000_logs_are_made_and_restored_after_kill_9(daemon: Daemon) -> None:
    _many(daemon, 10_000)
