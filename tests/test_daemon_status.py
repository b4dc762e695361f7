"""What the daemon tells systemd (Type=notify): READY=1 with a status line, and STATUS= again
whenever the line changes (logs served, the cluster's state), as ``systemctl status`` shows."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ulogd.edges.corosync import CorosyncLink
from ulogd.edges.transport.unixsock import UnixClient
from ulogd.engine.server import Server
from ulogd.protocol.spec import RequestType as T
from ulogd.testing.driver import LogDriver

UUID = "LVM-statusSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSS0001"


class Notifications:
    """A NOTIFY_SOCKET of our own: the datagrams the daemon sends, as systemd receives them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(30)

    def next(self) -> dict[str, str]:
        data = self.sock.recv(4096).decode()
        return dict(line.split("=", 1) for line in data.splitlines() if "=" in line)

    def next_status(self) -> str:
        while "STATUS" not in (message := self.next()):
            pass
        return message["STATUS"]


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[Notifications, str]]:
    notes = Notifications(tmp_path / "notify")
    transport = str(tmp_path / "t.sock")
    env = dict(os.environ, NOTIFY_SOCKET=str(notes.path))
    env.pop("WATCHDOG_USEC", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "ulogd", "run", "-f", "--transport", f"unix:{transport}",
         "--run-dir", str(tmp_path / "run")],
        env=env, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        yield notes, transport
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        notes.sock.close()


def test_ready_carries_the_status_and_each_change_is_sent(
    daemon: tuple[Notifications, str],
) -> None:
    notes, transport = daemon
    ready = notes.next()
    assert ready.get("READY") == "1", ready
    assert ready["STATUS"] == "serving 0 logs over unix; cluster off"
    with UnixClient(transport) as link:
        log = LogDriver(link, uuid=UUID, luid=7)
        log.create("131072 clustered-core 1024")
        assert notes.next_status() == "serving 1 log over unix; cluster off"
        assert log.call(T.DTR).error == 0
        assert notes.next_status() == "serving 0 logs over unix; cluster off"


def test_the_cluster_part_names_quorum_and_groups() -> None:
    link = CorosyncLink(Server(local_node=3), lambda _: None, lambda *_: None, require_quorum=False)
    assert link.describe() == "corosync node 3, quorum not required, 0 groups"
    link.want_quorum = True  # wanted, but no quorum connection (yet)
    link.lost.add((UUID, 1))
    assert link.describe() == "corosync node 3, no quorum link (retrying), 0 groups, 1 rejoining"
