"""The test transport: kernel-format datagrams over a root-only Unix datagram socket.

The daemon binds ``PATH`` (mode 0600); a client (:class:`UnixClient`) sends request
datagrams exactly as the kernel would and receives the replies.  Replies are routed back to
the client that sent the request with the same sequence number, so several clients (tests,
benchmarks, the replay tool, the cluster tests' per-node drivers) can share one daemon.
Clients are treated like the kernel (sender port 0): the socket's permissions are the
access control.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import tempfile

RECV_SIZE = 65536
_CN_SEQ = struct.Struct("=I")


class UnixServerTransport:
    name = "unix"

    def __init__(self, path: str, *, reply_seq_offset: int = 184) -> None:
        self.path = path
        self._seq_offset = reply_seq_offset
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        old = os.umask(0o177)
        try:
            self._sock.bind(path)
        finally:
            os.umask(old)
        self._sock.setblocking(False)
        self._routes: dict[int, str] = {}
        self._last: str | None = None

    def fileno(self) -> int:
        return self._sock.fileno()

    def recv(self) -> tuple[bytes, int] | None:
        try:
            data, addr = self._sock.recvfrom(RECV_SIZE)
        except BlockingIOError:
            return None
        if addr:
            self._last = addr
            if len(data) >= 28:
                self._routes[_CN_SEQ.unpack_from(data, 24)[0]] = addr
                if len(self._routes) > 65536:
                    self._routes.pop(next(iter(self._routes)))
        return data, 0

    def send(self, datagram: bytes) -> None:
        seq = _reply_seq(datagram, self._seq_offset)
        addr = self._routes.pop(seq, None) if seq is not None else None
        addr = addr or self._last
        if addr is None:
            return
        with contextlib.suppress(OSError):  # the client went away: like a dropped reply
            self._sock.sendto(datagram, addr)

    def close(self) -> None:
        self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def _reply_seq(datagram: bytes, offset: int) -> int | None:
    if len(datagram) >= 36 and struct.unpack_from("=H", datagram, 32)[0] == 0:
        return _CN_SEQ.unpack_from(datagram, 24)[0]  # header-only reply: cn_msg.seq
    if len(datagram) >= offset + 4:
        return _CN_SEQ.unpack_from(datagram, offset)[0]
    return None


class UnixClient:
    """A kernel stand-in for tests and tools: sends requests, receives replies."""

    def __init__(self, server_path: str, timeout: float = 10.0) -> None:
        self._dir = tempfile.mkdtemp(prefix="ulogd-client-")
        self.path = os.path.join(self._dir, "client.sock")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self._sock.bind(self.path)
            self._sock.connect(server_path)
            self._sock.settimeout(timeout)
        except BaseException:
            self.close()  # no daemon there (yet): leave no directory behind
            raise

    def send(self, datagram: bytes) -> None:
        self._sock.send(datagram)

    def recv(self) -> bytes:
        return self._sock.recv(RECV_SIZE)

    def request(self, datagram: bytes) -> bytes:
        self.send(datagram)
        return self.recv()

    def close(self) -> None:
        self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        with contextlib.suppress(OSError):
            os.rmdir(self._dir)

    def __enter__(self) -> UnixClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
