"""The kernel link: a NETLINK_CONNECTOR socket subscribed to dm-log-userspace's group.

pyroute2 creates and binds the socket (``nl_groups = 1 << 6`` — the bind mask is a bit
field, so group 7 is bit 6 — and then ``NETLINK_ADD_MEMBERSHIP 7``); the hot path then uses
the plain socket object with non-blocking ``recvfrom``/``sendto``, so no library layer sits
between a request and its reply.  Replies go to port 0 (the kernel), no group.

Two listeners on group 7 race (both receive every request, the first reply wins), so the
transport refuses to start when ``/proc/net/netlink`` already shows a connector socket
subscribed to that group.
"""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

from ulogd.protocol import CN_IDX_DM, NETLINK_CONNECTOR
from ulogd.transport import TransportError

GROUP_BIT = 1 << (CN_IDX_DM - 1)
RECV_SIZE = 65536


def group_listeners(proc_netlink: Path = Path("/proc/net/netlink")) -> list[int]:
    """Netlink port ids of connector sockets already subscribed to group 7."""
    ports: list[int] = []
    try:
        lines = proc_netlink.read_text().splitlines()[1:]
    except OSError:
        return ports
    for line in lines:
        cols = line.split()
        if len(cols) < 4:
            continue
        try:
            family, port, groups = int(cols[1]), int(cols[2]), int(cols[3], 16)
        except ValueError:
            continue
        if family == NETLINK_CONNECTOR and groups & GROUP_BIT:
            ports.append(port)
    return ports


class NetlinkTransport:
    name = "netlink"

    def __init__(self) -> None:
        others = group_listeners()
        if others:
            raise TransportError(
                f"another process already listens on connector group {CN_IDX_DM} (netlink "
                f"port {', '.join(map(str, others))}); two log servers would race for every "
                "request (is cmirrord or another ulogd running?)"
            )
        from pyroute2.netlink.connector import ConnectorSocket

        try:
            self._nl = ConnectorSocket()
            # pid=None: pyroute2 picks a free port id and binds (with pid=0 it only records
            # the address and never calls bind(), so nothing would be received).
            self._nl.bind(groups=GROUP_BIT)
            raw = self._nl.asyncore.socket
            raw.setsockopt(270, 1, CN_IDX_DM)  # SOL_NETLINK, NETLINK_ADD_MEMBERSHIP
            if raw.getsockname()[0] == 0:
                raise TransportError("the netlink connector socket did not bind")
        except OSError as exc:
            if exc.errno in (errno.EPERM, errno.EACCES):
                raise TransportError(
                    "joining connector group 7 needs CAP_NET_ADMIN (run ulogd as root)"
                ) from exc
            raise TransportError(f"cannot open the netlink connector socket: {exc}") from exc
        # A private socket object on a duplicate of the bound descriptor: the hot path.
        self._sock = socket.socket(fileno=os.dup(raw.fileno()))
        self._sock.setblocking(False)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        if "dmlogusr" not in _connector_callbacks():
            import logging

            logging.getLogger(__name__).warning(
                "the kernel's dm-log-userspace module is not loaded (no 'dmlogusr' in "
                "/proc/net/connector); waiting for it anyway"
            )

    @property
    def port(self) -> int:
        """The netlink port id this socket is bound to."""
        return int(self._sock.getsockname()[0])

    def fileno(self) -> int:
        return self._sock.fileno()

    def recv(self) -> tuple[bytes, int] | None:
        try:
            data, (port, _groups) = self._sock.recvfrom(RECV_SIZE)
        except BlockingIOError:
            return None
        return data, port

    def send(self, datagram: bytes) -> None:
        self._sock.sendto(datagram, (0, 0))

    def close(self) -> None:
        self._sock.close()
        self._nl.close()


def _connector_callbacks() -> str:
    try:
        return Path("/proc/net/connector").read_text()
    except OSError:
        return ""
