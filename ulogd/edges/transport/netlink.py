"""The kernel link: a NETLINK_CONNECTOR socket subscribed to dm-log-userspace's group.

The socket is bound with ``nl_groups = 1 << 6`` (the bind mask is a bit field, so group 7
is bit 6) and then joined to group 7 with ``NETLINK_ADD_MEMBERSHIP``; replies go to port 0
(the kernel), no group.  The hot path uses non-blocking ``recvfrom``/``sendto``.

This takes three calls of Python's own ``socket`` module, which speaks ``AF_NETLINK``
natively.  pyroute2 was used here first and dropped: its import alone costs about 0.45 s on
a quiet host and over ten seconds under emulation — time during which a restarted daemon
leaves the kernel's blocked writes waiting — and its ``bind(pid=0)`` silently skips the
``bind()`` call, so the daemon received nothing.

Two listeners on group 7 race (both receive every request, the first reply wins), so the
transport refuses to start when ``/proc/net/netlink`` already shows a connector socket
subscribed to that group.

It also refuses to start without the capabilities the kernel side demands, read from the
``CapEff`` line of ``/proc/self/status``: CAP_NET_ADMIN to join the group, CAP_SYS_ADMIN
because dm-log-userspace drops replies from a sender without it (a daemon lacking it would
bind, say it is ready, and never be heard).  The unix test transport needs neither.
"""

from __future__ import annotations

import errno
import socket
from pathlib import Path

from ulogd.edges.transport import TransportError
from ulogd.protocol.spec import CN_IDX_DM, NETLINK_CONNECTOR

GROUP_BIT = 1 << (CN_IDX_DM - 1)
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
RECV_SIZE = 65536
#: capability numbers (linux/capability.h) the kernel link needs
REQUIRED_CAPABILITIES = {"CAP_NET_ADMIN": 12, "CAP_SYS_ADMIN": 21}


def effective_capabilities(status_text: str) -> int:
    """The ``CapEff`` bit mask of a ``/proc/<pid>/status`` text."""
    for line in status_text.splitlines():
        key, _, value = line.partition(":")
        if key == "CapEff":
            return int(value.strip(), 16)
    raise ValueError("no CapEff line in the process status")


def missing_capabilities(cap_eff: int) -> list[str]:
    """Names of the :data:`REQUIRED_CAPABILITIES` absent from the mask ``cap_eff``."""
    return [name for name, bit in REQUIRED_CAPABILITIES.items() if not cap_eff >> bit & 1]


def check_capabilities(status: Path = Path("/proc/self/status")) -> None:
    """:class:`TransportError` naming what is missing unless this process holds them all."""
    try:
        missing = missing_capabilities(effective_capabilities(status.read_text()))
    except (OSError, ValueError) as exc:
        raise TransportError(f"cannot read this process's capabilities ({exc})") from exc
    if missing:
        raise TransportError(
            f"missing {' and '.join(missing)}: the netlink transport needs CAP_NET_ADMIN (to "
            "join the connector group) and CAP_SYS_ADMIN (the kernel ignores replies from a "
            "sender without it); run ulogd as root, or add them to the unit's capability set"
        )


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
        check_capabilities()
        others = group_listeners()
        if others:
            raise TransportError(
                f"another process already listens on connector group {CN_IDX_DM} (netlink "
                f"port {', '.join(map(str, others))}); two log servers would race for every "
                "request (is cmirrord or another ulogd running?)"
            )
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_CONNECTOR)
        except OSError as exc:
            raise TransportError(f"cannot open a netlink connector socket: {exc}") from exc
        try:
            sock.bind((0, GROUP_BIT))  # port 0: the kernel assigns a free port id
            sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, CN_IDX_DM)
        except OSError as exc:
            sock.close()
            if exc.errno in (errno.EPERM, errno.EACCES):
                raise TransportError(
                    "joining connector group 7 needs CAP_NET_ADMIN (run ulogd as root)"
                ) from exc
            raise TransportError(f"cannot join connector group {CN_IDX_DM}: {exc}") from exc
        if sock.getsockname()[0] == 0:
            sock.close()
            raise TransportError("the netlink connector socket did not bind")
        self._sock = sock
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


def _connector_callbacks() -> str:
    try:
        return Path("/proc/net/connector").read_text()
    except OSError:
        return ""
