"""The netlink transport on this host's kernel: it binds, joins group 7, refuses to run
beside another listener (two servers would race for every request), and refuses to start
without CAP_NET_ADMIN and CAP_SYS_ADMIN, naming what is missing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ulogd.edges.transport import TransportError
from ulogd.edges.transport.netlink import (
    NetlinkTransport,
    check_capabilities,
    effective_capabilities,
    group_listeners,
    missing_capabilities,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="joining connector group 7 needs root")


def test_binds_and_subscribes_to_group_7() -> None:
    t = NetlinkTransport()
    try:
        assert t.port != 0
        assert t.port in group_listeners()
    finally:
        t.close()


def test_refuses_a_second_listener() -> None:
    first = NetlinkTransport()
    try:
        with pytest.raises(TransportError, match="already listens on connector group 7"):
            NetlinkTransport()
    finally:
        first.close()
    NetlinkTransport().close()  # free again once the first is gone


def test_group_listeners_parses_proc_net_netlink(tmp_path: Path) -> None:
    table = tmp_path / "netlink"
    table.write_text(
        "sk               Eth Pid        Groups   Rmem     Wmem     Dump  Locks    Drops    Inode\n"
        "0000000033d24bf9 11  83912360   00000040 0        0        0     2        0        1\n"
        "0000000015a66cbb 11  0          00000000 0        0        0     2        0        2\n"
        "00000000aaaaaaaa 0   4242       00000040 0        0        0     2        0        3\n"
        "00000000bbbbbbbb 11  77         00000001 0        0        0     2        0        4\n"
    )
    assert group_listeners(table) == [83912360]


STATUS = """Name:\tpython3
Umask:\t0022
CapInh:\t0000000000000000
CapPrm:\t000001ffffffffff
CapEff:\t{eff}
CapBnd:\t000001ffffffffff
"""


def test_effective_capabilities_read_from_the_status_text() -> None:
    assert effective_capabilities(STATUS.format(eff="000001ffffffffff")) == (1 << 41) - 1
    assert effective_capabilities(STATUS.format(eff="0000000000201000")) == (1 << 21) | (1 << 12)
    with pytest.raises(ValueError, match="no CapEff"):
        effective_capabilities("Name:\tx\nCapPrm:\t0\n")


def test_missing_capabilities_are_named() -> None:
    assert missing_capabilities((1 << 41) - 1) == []
    assert missing_capabilities(1 << 12) == ["CAP_SYS_ADMIN"]
    assert missing_capabilities(1 << 21) == ["CAP_NET_ADMIN"]
    neighbours = (1 << 11) | (1 << 13) | (1 << 20) | (1 << 22)  # every bit but 12 and 21
    assert missing_capabilities(neighbours) == ["CAP_NET_ADMIN", "CAP_SYS_ADMIN"]


def test_a_status_file_without_capabilities_is_a_refusal(tmp_path: Path) -> None:
    status = tmp_path / "status"
    status.write_text(STATUS.format(eff="0000000000001000"))
    with pytest.raises(TransportError, match="missing CAP_SYS_ADMIN: the netlink transport"):
        check_capabilities(status)


# ---- the daemon run with capabilities dropped (util-linux's setpriv) ----------------------


def _run_without(tmp_path: Path, bounding: str, *args: str) -> subprocess.CompletedProcess[str]:
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.fail("setpriv (util-linux) is not installed")
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
    return subprocess.run(
        [setpriv, "--inh-caps=-all", f"--bounding-set={bounding}", "--",
         sys.executable, "-m", "ulogd", "run", "--foreground",
         "--run-dir", str(tmp_path / "run"), *args],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("bounding", "named"),
    [
        ("-all", "missing CAP_NET_ADMIN and CAP_SYS_ADMIN"),
        ("-sys_admin", "missing CAP_SYS_ADMIN:"),
        ("-net_admin", "missing CAP_NET_ADMIN:"),
    ],
)
def test_the_daemon_refuses_to_start_naming_what_is_missing(
    tmp_path: Path, bounding: str, named: str
) -> None:
    result = _run_without(tmp_path, bounding, "--transport", "netlink")
    assert result.returncode == 3, result.stderr  # EXIT_SETUP
    refusals = [ln for ln in result.stderr.splitlines() if "cannot start" in ln]
    assert len(refusals) == 1 and named in refusals[0], result.stderr
    assert "ready" not in result.stderr
    assert not (tmp_path / "run" / "ulogd.pid").exists()


def test_the_unix_test_transport_needs_no_capability(tmp_path: Path) -> None:
    sock = tmp_path / "t.sock"
    proc = subprocess.Popen(
        ["setpriv", "--inh-caps=-all", "--bounding-set=-all", "--",
         sys.executable, "-m", "ulogd", "run", "--foreground",
         "--run-dir", str(tmp_path / "run"), "--transport", f"unix:{sock}"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        pidfile = tmp_path / "run" / "ulogd.pid"
        for _ in range(400):
            if pidfile.exists() or proc.poll() is not None:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert pidfile.read_text().strip() == str(proc.pid)
        status = Path(f"/proc/{proc.pid}/status").read_text()
        assert effective_capabilities(status) == 0  # really running without any
    finally:
        proc.terminate()
        proc.wait(timeout=30)
