"""Transports: how datagrams in the kernel's format reach the server and replies leave it.

Every transport is a thin edge with the same small interface (:class:`Transport`): a file
descriptor for the event loop, ``recv()`` returning one datagram and the sender's netlink
port (0 = the kernel), and ``send()`` for a reply.  ``netlink`` talks to the real kernel;
``unixsock`` carries the same datagrams over a root-only Unix socket so that tests, several
daemons in network namespaces and the replay tool can drive a daemon without a kernel.
"""

from __future__ import annotations

from typing import Protocol


class Transport(Protocol):
    name: str

    def fileno(self) -> int: ...

    def recv(self) -> tuple[bytes, int] | None:
        """One datagram and its sender port, or None when nothing is waiting."""
        ...

    def send(self, datagram: bytes) -> None: ...

    def close(self) -> None: ...


class TransportError(Exception):
    """The transport cannot be set up (the message says why, for the operator)."""


def open_transport(spec: str, *, reply_seq_offset: int = 184) -> Transport:
    """``netlink`` (default) or ``unix:PATH``."""
    if spec == "netlink":
        from ulogd.edges.transport.netlink import NetlinkTransport

        return NetlinkTransport()
    if spec.startswith("unix:"):
        from ulogd.edges.transport.unixsock import UnixServerTransport

        return UnixServerTransport(spec[5:], reply_seq_offset=reply_seq_offset)
    raise TransportError(f"unknown transport {spec!r} (expected 'netlink' or 'unix:PATH')")
