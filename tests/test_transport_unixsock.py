"""The unix test transport's client: what it leaves behind."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from tests.harness.cluster import KernelLink
from ulogd.edges.transport.unixsock import UnixClient, UnixServerTransport


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Clients make their socket directory here instead of the shared /tmp."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def test_a_client_that_cannot_connect_leaves_no_directory(private_tmp: Path) -> None:
    for _ in range(3):
        with pytest.raises(FileNotFoundError):
            UnixClient(str(private_tmp / "no-daemon.sock"))
    assert list(private_tmp.iterdir()) == []


def test_a_closed_client_leaves_no_directory(private_tmp: Path) -> None:
    served = UnixServerTransport(str(private_tmp / "daemon.sock"))
    try:
        with UnixClient(served.path) as client:
            assert Path(client.path).parent.name.startswith("ulogd-client-")
        link = KernelLink(served.path)
        link.close()
        assert [p.name for p in private_tmp.iterdir()] == ["daemon.sock"]
    finally:
        served.close()
