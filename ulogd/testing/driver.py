"""Drive a log server the way the kernel does: kernel-format requests, decoded replies.

:class:`LogDriver` speaks for one mirror log (uuid, luid) and numbers its requests like the
kernel's global counter.  It sends through any *link*: :class:`InProcess` feeds a
:class:`~ulogd.server.Server` directly (performing disk actions synchronously), and
:class:`~ulogd.transport.unixsock.UnixClient` reaches a running daemon over the test transport.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterable
from typing import Protocol

from ulogd import wire
from ulogd.protocol import RequestType as T
from ulogd.server import DiskRead, DiskWrite, Prepare, Send, Server

_seq = itertools.count(1)


class Link(Protocol):
    def request(self, datagram: bytes) -> bytes: ...


class InProcess:
    """A link straight into a :class:`Server`, performing its disk I/O synchronously."""

    def __init__(self, server: Server) -> None:
        self.server = server

    def request(self, datagram: bytes) -> bytes:
        replies = self.exchange(datagram)
        if len(replies) != 1:
            raise AssertionError(f"expected exactly one reply, got {len(replies)}")
        return replies[0]

    def exchange(self, datagram: bytes) -> list[bytes]:
        actions = self.server.receive(datagram)
        replies: list[bytes] = []
        while actions:
            action = actions.pop(0)
            if isinstance(action, Send):
                replies.append(action.data)
            elif isinstance(action, DiskRead | DiskWrite):
                data, error = None, None
                try:
                    if isinstance(action, DiskRead):
                        data = action.device.read(action.nbytes)
                    else:
                        action.device.write_extents(action.extents, action.durable)
                except OSError as exc:
                    error = exc
                actions += self.server.disk_done(action.token, data, error)
            elif isinstance(action, Prepare):
                result, failure = None, None
                try:
                    result = action.job()
                except Exception as exc:
                    failure = exc
                actions += self.server.prepared(action.token, result, failure)
        return replies


class LogDriver:
    """Requests for one log, as the kernel would send them."""

    def __init__(self, link: Link, uuid: str = "LVM-test", luid: int = 0x1000, version: int = 3):
        self.link = link
        self.uuid = uuid
        self.luid = luid
        self.version = version

    def datagram(self, rtype: int, data: bytes = b"", seq: int | None = None) -> bytes:
        return wire.encode_request(
            rtype,
            uuid=self.uuid,
            luid=self.luid,
            seq=next(_seq) if seq is None else seq,
            data=data,
            version=self.version,
        )

    def call(self, rtype: int, data: bytes = b"") -> wire.Reply:
        return wire.decode_reply(self.link.request(self.datagram(rtype, data)))

    def ok(self, rtype: int, data: bytes = b"") -> bytes:
        reply = self.call(rtype, data)
        if reply.error:
            raise AssertionError(f"{T(rtype).name} failed with {reply.error}")
        return reply.data

    # The kernel's calls, by name.
    def ctr(self, text: str, *, reconnect: bool = False) -> wire.Reply:
        return self.call(T.CTR, text.encode() + (b"\0" if reconnect else b""))

    def create(self, text: str) -> None:
        """CTR + GET_REGION_SIZE + RESUME, as ``dmsetup create`` does."""
        reply = self.ctr(text)
        if reply.error:
            raise AssertionError(f"CTR failed with {reply.error}")
        self.ok(T.GET_REGION_SIZE)
        self.ok(T.RESUME)

    def mark(self, regions: Iterable[int]) -> wire.Reply:
        return self.call(T.MARK_REGION, _regions(regions))

    def clear(self, regions: Iterable[int]) -> wire.Reply:
        return self.call(T.CLEAR_REGION, _regions(regions))

    def flush(self, marks: Iterable[int] = ()) -> wire.Reply:
        return self.call(T.FLUSH, _regions(marks))

    def in_sync(self, region: int) -> int:
        return struct.unpack("=q", self.ok(T.IN_SYNC, struct.pack("=Q", region)))[0]

    def is_clean(self, region: int) -> int:
        return struct.unpack("=q", self.ok(T.IS_CLEAN, struct.pack("=Q", region)))[0]

    def sync_count(self) -> int:
        return struct.unpack("=Q", self.ok(T.GET_SYNC_COUNT))[0]

    def resync_work(self) -> tuple[int, int]:
        i, r = struct.unpack("=qQ", self.ok(T.GET_RESYNC_WORK))
        return i, r

    def set_region_sync(self, region: int, in_sync: bool) -> wire.Reply:
        return self.call(T.SET_REGION_SYNC, struct.pack("=Qq", region, int(in_sync)))

    def status_info(self) -> str:
        return self.ok(T.STATUS_INFO).rstrip(b"\0").decode()

    def resync_all(self) -> int:
        """Recover every out-of-sync region as kmirrord would; returns how many."""
        count = 0
        while True:
            i, r = self.resync_work()
            if not i:
                return count
            self.ok(T.SET_REGION_SYNC, struct.pack("=Qq", r, 1))
            self.clear([r])
            self.flush()
            count += 1


def _regions(regions: Iterable[int]) -> bytes:
    values = list(regions)
    return struct.pack(f"={len(values)}Q", *values)
