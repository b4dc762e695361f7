"""The netlink transport on this host's kernel: it binds, joins group 7, and refuses to run
beside another listener (two servers would race for every request)."""

from __future__ import annotations

import os

import pytest

from ulogd.transport import TransportError
from ulogd.transport.netlink import NetlinkTransport, group_listeners

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


def test_group_listeners_parses_proc_net_netlink(tmp_path) -> None:  # type: ignore[no-untyped-def]
    table = tmp_path / "netlink"
    table.write_text(
        "sk               Eth Pid        Groups   Rmem     Wmem     Dump  Locks    Drops    Inode\n"
        "0000000033d24bf9 11  83912360   00000040 0        0        0     2        0        1\n"
        "0000000015a66cbb 11  0          00000000 0        0        0     2        0        2\n"
        "00000000aaaaaaaa 0   4242       00000040 0        0        0     2        0        3\n"
        "00000000bbbbbbbb 11  77         00000001 0        0        0     2        0        4\n"
    )
    assert group_listeners(table) == [83912360]
