"""Capture files of the daemon's netlink traffic (pcapng, readable by Wireshark/tshark).

Theory of operation
===================

Format
------
A capture is a **pcapng** file (one section) written in the host's byte order:

* a Section Header Block whose ``shb_userappl`` option names ulogd and its version
  (``"ulogd <__version__>"``) and whose ``shb_os`` names the running kernel;
* one Interface Description Block with link type ``LINKTYPE_NETLINK`` (253), an ``if_name``
  and ``if_description``, ``if_tsresol`` = 9 (timestamps are nanoseconds) and the snapshot
  length;
* one Enhanced Packet Block per netlink datagram, in the order :meth:`CaptureWriter.record`
  was called.

The packet data of each EPB is the 16-byte "cooked" pseudo-header that LINKTYPE_NETLINK
defines (the Linux SLL layout; every field big-endian)::

    packet type (2) | ARPHRD_ type (2) = 824 ARPHRD_NETLINK | address length (2) = 0 |
    address (8) = zeros | protocol (2) = netlink family, 11 NETLINK_CONNECTOR

followed by the datagram exactly as it crossed the socket (``nlmsghdr`` + ``cn_msg`` +
``dm_ulog_request`` + payload, host byte order; Wireshark guesses that order itself).

The direction is recorded twice: the pseudo-header packet type is 0 (``PACKET_HOST``, "to
us") for kernel->daemon and 4 (``PACKET_OUTGOING``, "sent by us") for daemon->kernel, and the
EPB carries an ``epb_flags`` option with the inbound (1) or outbound (2) direction bits.

Reading
-------
:func:`read_capture` is a streaming reader (one block in memory at a time) for pcapng and
classic pcap: both byte orders, the microsecond (``a1b2c3d4``) and nanosecond
(``a1b23c4d``) pcap magics, any ``if_tsresol`` (power of 10 or of 2) and ``if_tsoffset``,
several sections (each with its own byte order and interfaces), Enhanced, Simple (no
timestamp: reported as 0) and obsolete Packet Blocks; blocks of any other type are skipped.
Packets are numbered from 1 over the whole file, counting every packet block, so numbers
match Wireshark's ``frame.number`` even when some packets are skipped.

The direction comes from ``epb_flags`` (or the obsolete ``pack_flags``) when that option
gives one, otherwise from the pseudo-header packet type: 4 (outgoing) and 7
(``PACKET_KERNEL``, what nlmon records for messages to the kernel) mean
:attr:`Direction.FROM_DAEMON`; 0 (host), 1 (broadcast), 2 (multicast, which is how the kernel
sends dm-log-userspace requests) and 6 (``PACKET_USER``) mean :attr:`Direction.TO_DAEMON`;
any other value is a :class:`CaptureFormatError`.

Decisions on foreign packets: packets on an interface whose link type is not 253 are an
error by default (the file is not a netlink capture, and silently replaying nothing would
hide that); ``on_foreign_linktype="skip"`` skips them instead, logging the reason once per
interface.  Netlink packets of another family than ``netlink_family`` (default
``NETLINK_CONNECTOR``, e.g. ``NETLINK_ROUTE`` traffic in a capture taken on an ``nlmon``
device) are not dm-log-userspace traffic and are skipped; pass ``netlink_family=None`` to get
them all.  A pseudo-header whose ARPHRD_ type is not ARPHRD_NETLINK is an error.

Every defect of the file (bad magic, truncation, block lengths that disagree, options that
overrun their block, packets shorter than the pseudo-header, unknown interface ids...) raises
:class:`CaptureFormatError`, whose message names the packet number being read (the number the
next packet would get, for a defect in a non-packet block) and the byte offset of the block;
no other exception escapes for bad input.  Blocks or records longer than
:data:`MAX_BLOCK_LENGTH` are rejected before any memory is allocated for them.

Writing, threading
------------------
:meth:`CaptureWriter.record` is on the daemon's reply path, so it only checks two flags,
copies the datagram if it is a mutable buffer, takes a timestamp (``time.time_ns()``, a vDSO
call, when none is given) and appends a tuple to a :class:`collections.deque` -- O(1), no
system calls, and no lock except one ``Event.set()`` per ``batch_size`` records to wake the
writer early.  The encoding into blocks and the file writes happen elsewhere:

* ``background=True`` (default): a daemon thread wakes every ``flush_interval`` seconds (or
  as soon as ``batch_size`` records are pending, signalled at most once per batch) and writes
  everything pending with a single ``write()`` per batch, then flushes the file;
* ``background=False``: no thread; the daemon's loop calls :meth:`CaptureWriter.flush` when
  idle.

:meth:`CaptureWriter.flush` may be called in either mode and from any thread: it writes
everything recorded before the call.  The background thread encodes in Python, so while it
is busy it competes for the GIL (a ``record()`` may then wait up to the interpreter's switch
interval, 5 ms by default); a daemon that cannot afford that tail uses ``background=False``
and flushes from its own loop when idle.  :meth:`CaptureWriter.close` stops the thread, drains
everything still pending and closes the file if the writer opened it (a file object passed
in is flushed, not closed).  Records made after close are ignored.

Failure behaviour
-----------------
Opening the file and writing the two header blocks happen in the constructor, at start-up,
and raise :class:`OSError` normally.  After that, a write error (disk full, I/O error, file
closed underneath) is logged once at ERROR level and capture stops: pending records are
discarded, later ones are ignored, :attr:`CaptureWriter.failed` becomes true, and nothing is
ever raised into the daemon (``flush()`` and ``close()`` included).  If the writer falls more
than ``max_pending`` records behind, new records are dropped and counted in
:attr:`CaptureWriter.dropped` (logged once) rather than letting memory grow without bound.
A datagram that cannot be encoded (not bytes-like, timestamp out of the 64-bit range) is
dropped and counted the same way.
"""

from __future__ import annotations

import collections
import enum
import logging
import os
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import BinaryIO

from ulogd import __version__

__all__ = [
    "ARPHRD_NETLINK",
    "LINKTYPE_NETLINK",
    "MAX_BLOCK_LENGTH",
    "NETLINK_CONNECTOR",
    "PSEUDO_HEADER_LEN",
    "CaptureFormatError",
    "CaptureWriter",
    "Direction",
    "Packet",
]

log = logging.getLogger(__name__)

LINKTYPE_NETLINK = 253
ARPHRD_NETLINK = 824
NETLINK_CONNECTOR = 11
PSEUDO_HEADER_LEN = 16
#: Largest block (pcapng) or record (pcap) the reader accepts, in bytes.
MAX_BLOCK_LENGTH = 16 * 1024 * 1024

# Linux sll_pkttype values (include/uapi/linux/if_packet.h).
PACKET_HOST = 0
PACKET_BROADCAST = 1
PACKET_MULTICAST = 2
PACKET_OTHERHOST = 3
PACKET_OUTGOING = 4
PACKET_USER = 6
PACKET_KERNEL = 7

# pcapng block types and option codes.
_SHB = 0x0A0D0D0A
_IDB = 0x00000001
_PB = 0x00000002  # obsolete Packet Block
_SPB = 0x00000003
_EPB = 0x00000006
_BOM = 0x1A2B3C4D
_OPT_ENDOFOPT = 0
_SHB_OS = 3
_SHB_USERAPPL = 4
_IF_NAME = 2
_IF_DESCRIPTION = 3
_IF_TSRESOL = 9
_IF_TSOFFSET = 14
_EPB_FLAGS = 2  # same code for the obsolete pack_flags
_FLAG_INBOUND = 1
_FLAG_OUTBOUND = 2

# classic pcap magics, as read little-endian.
_PCAP_MAGIC_US = 0xA1B2C3D4
_PCAP_MAGIC_NS = 0xA1B23C4D

_PSEUDO = struct.Struct(">HHH8sH")


class Direction(enum.Enum):
    """Which way a datagram travelled."""

    TO_DAEMON = "to-daemon"  #: kernel -> daemon (a request)
    FROM_DAEMON = "from-daemon"  #: daemon -> kernel (a reply)


_PKTTYPE_OUT = {Direction.TO_DAEMON: PACKET_HOST, Direction.FROM_DAEMON: PACKET_OUTGOING}
_FLAGS_OUT = {Direction.TO_DAEMON: _FLAG_INBOUND, Direction.FROM_DAEMON: _FLAG_OUTBOUND}
_PKTTYPE_IN = {
    PACKET_HOST: Direction.TO_DAEMON,
    PACKET_BROADCAST: Direction.TO_DAEMON,
    PACKET_MULTICAST: Direction.TO_DAEMON,
    PACKET_USER: Direction.TO_DAEMON,
    PACKET_OUTGOING: Direction.FROM_DAEMON,
    PACKET_KERNEL: Direction.FROM_DAEMON,
}


@dataclass(frozen=True, slots=True)
class Packet:
    """One captured datagram.

    ``data`` is the netlink datagram without the pseudo-header.  ``original_length`` (not part
    of equality) is the datagram's length on the wire when the reader knows it; it exceeds
    ``len(data)`` when the capture truncated the packet (see :attr:`truncated`).
    """

    number: int
    timestamp_ns: int
    direction: Direction
    data: bytes
    original_length: int | None = field(default=None, compare=False)

    @property
    def truncated(self) -> bool:
        return self.original_length is not None and self.original_length > len(self.data)


class CaptureFormatError(ValueError):
    """A capture file is malformed or truncated.

    ``packet_number`` is the number of the packet being read (or that the next packet would
    get), ``offset`` the byte offset of the offending block or record.
    """

    def __init__(self, reason: str, packet_number: int, offset: int) -> None:
        super().__init__(f"{reason} (packet {packet_number}, byte offset {offset})")
        self.reason = reason
        self.packet_number = packet_number
        self.offset = offset


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------

_BO = "<" if sys.byteorder == "little" else ">"
_BLOCK_HEAD = struct.Struct(_BO + "II")
_U32 = struct.Struct(_BO + "I")
_EPB_HEAD = struct.Struct(_BO + "IIIIIII")  # type, length, if_id, ts_hi, ts_lo, caplen, len
_EPB_TAIL = struct.Struct(_BO + "HHIHHI")  # epb_flags option, opt_endofopt, trailing length
_PADS = (b"", b"\0\0\0", b"\0\0", b"\0")


def _pad4(n: int) -> int:
    return (n + 3) & ~3


def _option(code: int, value: bytes) -> bytes:
    return struct.pack(_BO + "HH", code, len(value)) + value + _PADS[len(value) % 4]


def _block(block_type: int, body: bytes) -> bytes:
    total = 12 + len(body)
    return _BLOCK_HEAD.pack(block_type, total) + body + _U32.pack(total)


def _header_blocks(snaplen: int, if_name: str, if_description: str) -> bytes:
    uname = os.uname()
    shb_opts = (
        _option(_SHB_USERAPPL, f"ulogd {__version__}".encode())
        + _option(_SHB_OS, f"{uname.sysname} {uname.release}".encode())
        + _option(_OPT_ENDOFOPT, b"")
    )
    shb = _block(_SHB, struct.pack(_BO + "IHHq", _BOM, 1, 0, -1) + shb_opts)
    idb_opts = (
        _option(_IF_NAME, if_name.encode())
        + _option(_IF_DESCRIPTION, if_description.encode())
        + _option(_IF_TSRESOL, bytes([9]))
        + _option(_OPT_ENDOFOPT, b"")
    )
    idb = _block(_IDB, struct.pack(_BO + "HHI", LINKTYPE_NETLINK, 0, snaplen) + idb_opts)
    return shb + idb


def _encode_epb(direction: Direction, datagram: bytes, timestamp_ns: int, snaplen: int) -> bytes:
    frame = _PSEUDO.pack(_PKTTYPE_OUT[direction], ARPHRD_NETLINK, 0, b"", NETLINK_CONNECTOR)
    frame += datagram
    wire_len = len(frame)
    if snaplen and wire_len > snaplen:
        frame = frame[:snaplen]
    caplen = len(frame)
    total = 28 + _pad4(caplen) + 12 + 4
    return b"".join(
        (
            _EPB_HEAD.pack(
                _EPB, total, 0, timestamp_ns >> 32, timestamp_ns & 0xFFFFFFFF, caplen, wire_len
            ),
            frame,
            _PADS[caplen % 4],
            _EPB_TAIL.pack(_EPB_FLAGS, 4, _FLAGS_OUT[direction], _OPT_ENDOFOPT, 0, total),
        )
    )


class CaptureWriter:
    """Records datagrams to a pcapng file without blocking the caller (see module docs).

    ``path_or_binary_file`` is a path (created/truncated; closed by :meth:`close`) or a
    binary file object opened for writing (flushed, not closed, by :meth:`close`).
    ``snaplen`` limits the bytes stored per packet, pseudo-header included (0 = no limit).
    """

    def __init__(
        self,
        path_or_binary_file: str | os.PathLike[str] | BinaryIO,
        *,
        snaplen: int = 65535,
        background: bool = True,
        flush_interval: float = 0.05,
        batch_size: int = 1024,
        max_pending: int = 1_000_000,
        if_name: str = "ulogd",
        if_description: str = "dm-log-userspace netlink connector traffic (ulogd)",
    ) -> None:
        if snaplen < 0 or snaplen > 0xFFFFFFFF or 0 < snaplen < PSEUDO_HEADER_LEN:
            raise ValueError(f"snaplen must be 0 or {PSEUDO_HEADER_LEN}..2**32-1, not {snaplen}")
        if flush_interval <= 0 or batch_size < 1 or max_pending < 1:
            raise ValueError("flush_interval, batch_size and max_pending must be positive")
        self._snaplen = snaplen
        self._flush_interval = flush_interval
        self._batch_size = batch_size
        self._max_pending = max_pending
        self._queue: collections.deque[tuple[Direction, bytes, int]] = collections.deque()
        self._io_lock = threading.Lock()  # serialises draining/writing
        self._wake = threading.Event()
        self._closed = False
        self._failed = False
        self._recorded = 0
        self._written = 0
        self._dropped = 0
        self._drop_logged = False

        self._owns_file = isinstance(path_or_binary_file, str | os.PathLike)
        if isinstance(path_or_binary_file, str | os.PathLike):
            self._file: BinaryIO = open(path_or_binary_file, "wb")  # noqa: SIM115
        else:
            self._file = path_or_binary_file
        try:
            self._file.write(_header_blocks(snaplen, if_name, if_description))
            self._file.flush()
        except BaseException:
            if self._owns_file:
                self._file.close()
            raise

        self._thread: threading.Thread | None = None
        if background:
            self._thread = threading.Thread(
                target=self._run, name="ulogd-capture-writer", daemon=True
            )
            self._thread.start()

    # -- the hot path ------------------------------------------------------------------------

    def record(
        self, direction: Direction, datagram: bytes, timestamp_ns: int | None = None
    ) -> None:
        """Queue one datagram for writing.  O(1), no system calls, never raises for I/O."""
        if self._closed or self._failed:
            return
        queue = self._queue
        if len(queue) >= self._max_pending:
            self._dropped += 1
            return
        if type(datagram) is not bytes:
            datagram = memoryview(datagram).tobytes()  # the caller may reuse its buffer
        queue.append(
            (direction, datagram, time.time_ns() if timestamp_ns is None else timestamp_ns)
        )
        self._recorded += 1
        if len(queue) >= self._batch_size and not self._wake.is_set():
            self._wake.set()

    # -- draining -----------------------------------------------------------------------------

    def flush(self) -> None:
        """Write everything recorded so far and flush the file.  Never raises for I/O."""
        with self._io_lock:
            self._drain_locked()

    def close(self) -> None:
        """Stop the writer thread, write everything pending, close (or flush) the file."""
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            self._wake.set()
            self._thread.join()
        with self._io_lock:
            self._drain_locked()
            try:
                if self._owns_file:
                    self._file.close()
            except (OSError, ValueError) as exc:
                self._fail(exc)

    def __enter__(self) -> CaptureWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def failed(self) -> bool:
        """True once a write error has stopped the capture."""
        return self._failed

    @property
    def recorded(self) -> int:
        """Datagrams accepted by :meth:`record` (approximate if several threads record)."""
        return self._recorded

    @property
    def written(self) -> int:
        """Datagrams written to the file (handed to it and flushed)."""
        return self._written

    @property
    def dropped(self) -> int:
        """Datagrams dropped because the writer was too far behind or could not encode them."""
        return self._dropped

    @property
    def pending(self) -> int:
        return len(self._queue)

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait(self._flush_interval)
            self._wake.clear()
            with self._io_lock:
                self._drain_locked()

    def _drain_locked(self) -> None:
        queue = self._queue
        snaplen = self._snaplen
        while queue and not self._failed:
            chunks: list[bytes] = []
            count = 0
            while count < self._batch_size * 4:
                try:
                    direction, datagram, ts = queue.popleft()
                except IndexError:
                    break
                try:
                    chunks.append(_encode_epb(direction, datagram, ts, snaplen))
                except (struct.error, TypeError, ValueError, KeyError, AttributeError) as exc:
                    self._dropped += 1
                    if not self._drop_logged:
                        self._drop_logged = True
                        log.warning("capture: dropping a record that cannot be encoded: %s", exc)
                    continue
                count += 1
            try:
                self._file.write(b"".join(chunks))
                self._file.flush()
            except (OSError, ValueError) as exc:
                self._fail(exc)
                return
            self._written += count
        if self._dropped and not self._drop_logged:
            self._drop_logged = True
            log.warning("capture: writer fell behind, %d record(s) dropped", self._dropped)

    def _fail(self, exc: BaseException) -> None:
        if not self._failed:
            self._failed = True
            log.error("capture: write failed, capture stopped: %s", exc)
        self._queue.clear()
