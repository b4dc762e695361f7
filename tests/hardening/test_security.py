"""Security properties of ulogd's local files and sockets that no other test pins
(docs/threat-model.rst lists where the rest is tested):

* a run directory the daemon creates is 0700, and so is its ``logs/``;
* state files are 0600 in a 0700 directory whatever the umask, and appear atomically: a
  creation that fails half-way leaves nothing, a leftover temporary file from a crash is
  removed and never loaded;
* the unix test transport's socket is 0600 whatever the umask (it is served like the kernel);
* a datagram whose sender port is not 0 changes nothing and gets no answer, whatever it
  claims in its headers (the netlink transport reports the real sender port).
"""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from ulogd.edges.transport.unixsock import UnixServerTransport
from ulogd.engine.server import Server
from ulogd.protocol import wire
from ulogd.protocol.spec import RequestType as T
from ulogd.state.statefile import StateDir
from ulogd.testing.driver import InProcess, LogDriver


@pytest.fixture
def loose_umask() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_state_files_are_private_whatever_the_umask(tmp_path: Path, loose_umask: None) -> None:
    directory = tmp_path / "logs"
    state_dir = StateDir(directory)
    state = state_dir.create("LVM-x", 1, 100, 8, "800 core 8")
    try:
        assert _mode(directory) == 0o700
        assert _mode(state.path) == 0o600
        assert [p.name for p in directory.iterdir()] == [state.path.name]
    finally:
        state.close()
    # an existing directory with loose permissions is tightened
    os.chmod(directory, 0o755)
    StateDir(directory)
    assert _mode(directory) == 0o700


def test_a_run_directory_ulogd_creates_is_private(tmp_path: Path) -> None:
    from tests.test_control import DaemonProcess

    run_dir = tmp_path / "new" / "run"  # neither exists yet
    with DaemonProcess(tmp_path, run_dir=run_dir):
        assert _mode(run_dir) == 0o700
        assert _mode(run_dir / "logs") == 0o700


def test_state_file_creation_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state_dir = StateDir(tmp_path)

    def crash(*_args: object) -> None:
        raise OSError(28, "No space left on device (injected)")

    with monkeypatch.context() as mp:
        mp.setattr(os, "rename", crash)
        with pytest.raises(OSError, match="injected"):
            state_dir.create("LVM-x", 1, 100, 8, "800 core 8")
    assert list(tmp_path.iterdir()) == [], "a failed creation left a file behind"
    # a crash between writing the temporary file and the rename leaves *.state.new:
    # removed at start-up, never loaded
    good = state_dir.create("LVM-y", 2, 100, 8, "800 core 8")
    good.close()
    leftover = tmp_path / "LVM-x@0000000000000001.state.new"
    leftover.write_bytes(good.path.read_bytes())
    states = StateDir(tmp_path).load_all()
    try:
        assert [s.identity.uuid for s in states] == ["LVM-y"]
        assert not leftover.exists()
    finally:
        for s in states:
            s.close()


def test_unix_transport_socket_is_private(tmp_path: Path, loose_umask: None) -> None:
    transport = UnixServerTransport(str(tmp_path / "u.sock"))
    try:
        assert _mode(tmp_path / "u.sock") & 0o077 == 0
    finally:
        transport.close()


def _fingerprint(server: Server) -> object:
    return sorted(
        (key, e.log.clean.tobytes(), e.log.sync.tobytes(), sorted(e.log.holders.items()),
         e.log.scalars())
        for key, e in server.logs.items()
    )  # fmt: skip


@pytest.mark.parametrize("port", [1, 4242, 2**31 - 1, 2**32 - 1])
def test_datagrams_from_a_nonzero_port_change_nothing(port: int) -> None:
    server = Server()
    d = LogDriver(InProcess(server), uuid="LVM-victim")
    d.create("131072 core 1024 nosync")
    d.mark([3])
    d.flush()
    before = _fingerprint(server)
    forged = [
        (T.SET_REGION_SYNC, struct.pack("=Qq", 5, 0)),
        (T.CLEAR_REGION, struct.pack("=Q", 3)),
        (T.PRESUSPEND, b""),
        (T.POSTSUSPEND, b""),
        (T.DTR, b""),
        (T.CTR, b"262144 core 1024 sync"),
        (T.CTR, b"131072 core 1024 nosync"),
    ]
    for rtype, data in forged:
        for luid in (0x1000, 0x2000):
            dg = wire.encode_request(rtype, uuid="LVM-victim", luid=luid, seq=99, data=data)
            assert server.receive(dg, port) == []
    assert _fingerprint(server) == before
    assert server.rejected.total() == len(forged) * 2
    assert d.is_clean(3) == 0 and d.sync_count() == 128  # the kernel is still served
