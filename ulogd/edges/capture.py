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
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO, Literal

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
    "read_capture",
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


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Interface:
    linktype: int
    ts_mul: int  # ns = ts * ts_mul // ts_div + ts_offset_ns
    ts_div: int
    ts_offset_ns: int
    snaplen: int
    skip_logged: bool = False


class _Stream:
    """Reads exact byte counts from a binary file, keeping the offset."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.offset = 0

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes (fewer only at end of file)."""
        parts: list[bytes] = []
        want = n
        while want > 0:
            chunk = self._f.read(want)
            if not chunk:
                break
            if not isinstance(chunk, bytes | bytearray):
                raise TypeError("read_capture() needs a binary file")
            parts.append(bytes(chunk))
            want -= len(chunk)
        data = b"".join(parts)
        self.offset += len(data)
        return data


class _Reader:
    def __init__(
        self,
        f: BinaryIO,
        netlink_family: int | None,
        on_foreign_linktype: Literal["error", "skip"],
    ) -> None:
        self._s = _Stream(f)
        self._family = netlink_family
        self._skip_foreign = on_foreign_linktype == "skip"
        self._count = 0  # packet blocks seen
        self._block_offset = 0

    def _error(self, reason: str) -> CaptureFormatError:
        return CaptureFormatError(reason, self._count + 1, self._block_offset)

    def _exact(self, n: int, what: str) -> bytes:
        data = self._s.read(n)
        if len(data) != n:
            raise self._error(f"file truncated in {what}: {len(data)} of {n} bytes present")
        return data

    def packets(self) -> Iterator[Packet]:
        magic = self._s.read(4)
        if not magic:
            raise self._error("empty file: no pcap or pcapng header")
        if len(magic) < 4:
            raise self._error("file truncated in the file header")
        if magic == b"\x0a\x0d\x0d\x0a":
            yield from self._pcapng(magic)
            return
        for bo in "<>":
            (value,) = struct.unpack(bo + "I", magic)
            if value in (_PCAP_MAGIC_US, _PCAP_MAGIC_NS):
                yield from self._pcap(bo, value == _PCAP_MAGIC_NS)
                return
        raise self._error(f"not a pcap or pcapng file (magic {magic.hex()})")

    # -- packets common to both formats ------------------------------------------------------

    def _packet(
        self,
        iface: _Interface,
        if_id: int,
        ts_ns: int,
        frame: bytes,
        orig_len: int,
        flags_direction: Direction | None,
    ) -> Packet | None:
        self._count += 1
        if iface.linktype != LINKTYPE_NETLINK:
            if not self._skip_foreign:
                raise CaptureFormatError(
                    f"packet on interface {if_id} has link type {iface.linktype}, "
                    f"not LINKTYPE_NETLINK ({LINKTYPE_NETLINK})",
                    self._count,
                    self._block_offset,
                )
            if not iface.skip_logged:
                iface.skip_logged = True
                log.info(
                    "capture: skipping packets on interface %d: link type %d is not netlink",
                    if_id,
                    iface.linktype,
                )
            return None
        if len(frame) < PSEUDO_HEADER_LEN:
            raise CaptureFormatError(
                f"captured length {len(frame)} is shorter than the "
                f"{PSEUDO_HEADER_LEN}-byte netlink pseudo-header",
                self._count,
                self._block_offset,
            )
        pkttype, hatype, _halen, _addr, family = _PSEUDO.unpack_from(frame)
        if hatype != ARPHRD_NETLINK:
            raise CaptureFormatError(
                f"pseudo-header ARPHRD_ type is {hatype}, not ARPHRD_NETLINK ({ARPHRD_NETLINK})",
                self._count,
                self._block_offset,
            )
        direction = flags_direction or _PKTTYPE_IN.get(pkttype)
        if direction is None:
            raise CaptureFormatError(
                f"pseudo-header packet type {pkttype} gives no direction",
                self._count,
                self._block_offset,
            )
        if self._family is not None and family != self._family:
            return None
        return Packet(
            self._count,
            ts_ns,
            direction,
            frame[PSEUDO_HEADER_LEN:],
            max(orig_len, len(frame)) - PSEUDO_HEADER_LEN,
        )

    # -- classic pcap ---------------------------------------------------------------------------

    def _pcap(self, bo: str, nanos: bool) -> Iterator[Packet]:
        head = self._exact(20, "the pcap file header")
        major, _minor, _zone, _sigfigs, snaplen, linktype = struct.unpack(bo + "HHiIII", head)
        if major != 2:
            raise self._error(f"unsupported pcap version {major}")
        iface = _Interface(linktype & 0xFFFF, 1 if nanos else 1000, 1, 0, snaplen)
        record = struct.Struct(bo + "IIII")
        while True:
            self._block_offset = self._s.offset
            head = self._s.read(16)
            if not head:
                return
            if len(head) < 16:
                raise self._error(f"file truncated in a record header: {len(head)} of 16 bytes")
            sec, frac, caplen, orig_len = record.unpack(head)
            if caplen > MAX_BLOCK_LENGTH:
                raise self._error(f"captured length {caplen} exceeds {MAX_BLOCK_LENGTH}")
            frame = self._exact(caplen, "packet data")
            ts_ns = sec * 1_000_000_000 + frac * iface.ts_mul
            pkt = self._packet(iface, 0, ts_ns, frame, orig_len, None)
            if pkt is not None:
                yield pkt

    # -- pcapng -----------------------------------------------------------------------------------

    def _pcapng(self, first_type: bytes) -> Iterator[Packet]:
        bo = "<"
        interfaces: list[_Interface] = []
        block_type_raw = first_type
        while True:
            if block_type_raw == b"\x0a\x0d\x0d\x0a":
                bo = self._section_header()
                interfaces = []
            else:
                (block_type,) = struct.unpack(bo + "I", block_type_raw)
                body = self._block_body(bo, block_type)
                pkt = self._dispatch(bo, block_type, body, interfaces)
                if pkt is not None:
                    yield pkt
            self._block_offset = self._s.offset
            block_type_raw = self._s.read(4)
            if not block_type_raw:
                return
            if len(block_type_raw) < 4:
                raise self._error("file truncated in a block header")

    def _check_length(self, total: int, minimum: int) -> None:
        if total < minimum:
            raise self._error(f"block total length {total} is below the minimum {minimum}")
        if total % 4:
            raise self._error(f"block total length {total} is not a multiple of 4")
        if total > MAX_BLOCK_LENGTH:
            raise self._error(f"block total length {total} exceeds {MAX_BLOCK_LENGTH}")

    def _trailer(self, bo: str, total: int) -> None:
        (trailing,) = struct.unpack(bo + "I", self._exact(4, "a block's trailing length"))
        if trailing != total:
            raise self._error(
                f"block trailing length {trailing} differs from its leading length {total}"
            )

    def _section_header(self) -> str:
        head = self._exact(8, "a section header block")
        if head[4:] == b"\x4d\x3c\x2b\x1a":
            bo = "<"
        elif head[4:] == b"\x1a\x2b\x3c\x4d":
            bo = ">"
        else:
            raise self._error(f"bad section header byte-order magic {head[4:].hex()}")
        (total,) = struct.unpack(bo + "I", head[:4])
        self._check_length(total, 28)
        body = self._exact(total - 16, "a section header block")  # after the magic
        major, _minor = struct.unpack_from(bo + "HH", body)
        if major != 1:
            raise self._error(f"unsupported pcapng major version {major}")
        self._options(bo, body, 12)  # validated, contents unused
        self._trailer(bo, total)
        return bo

    def _block_body(self, bo: str, block_type: int) -> bytes:
        (total,) = struct.unpack(bo + "I", self._exact(4, "a block header"))
        self._check_length(total, 12)
        body = self._exact(total - 12, f"a block of type {block_type:#x}")
        self._trailer(bo, total)
        return body

    def _options(self, bo: str, body: bytes, start: int) -> dict[int, bytes]:
        """Parse the options from ``start``; the first value of each code is kept."""
        opts: dict[int, bytes] = {}
        pos = start
        end = len(body)
        while pos < end:
            if end - pos < 4:
                raise self._error(f"option header overruns its block at body offset {pos}")
            code, length = struct.unpack_from(bo + "HH", body, pos)
            pos += 4
            if code == _OPT_ENDOFOPT:
                break
            if pos + length > end:
                raise self._error(f"option {code} of length {length} overruns its block")
            opts.setdefault(code, body[pos : pos + length])
            pos += _pad4(length)
        return opts

    def _interface(self, bo: str, body: bytes) -> _Interface:
        if len(body) < 8:
            raise self._error("interface description block too short")
        linktype, _reserved, snaplen = struct.unpack_from(bo + "HHI", body)
        opts = self._options(bo, body, 8)
        mul, div = 1000, 1  # default resolution: microseconds
        tsresol = opts.get(_IF_TSRESOL)
        if tsresol is not None:
            if len(tsresol) != 1:
                raise self._error(f"if_tsresol has length {len(tsresol)}, not 1")
            exponent = tsresol[0] & 0x7F
            if tsresol[0] & 0x80:
                mul, div = 1_000_000_000, 1 << exponent
            elif exponent <= 9:
                mul, div = 10 ** (9 - exponent), 1
            else:
                mul, div = 1, 10 ** (exponent - 9)
        offset_ns = 0
        tsoffset = opts.get(_IF_TSOFFSET)
        if tsoffset is not None:
            if len(tsoffset) != 8:
                raise self._error(f"if_tsoffset has length {len(tsoffset)}, not 8")
            offset_ns = struct.unpack(bo + "q", tsoffset)[0] * 1_000_000_000
        return _Interface(linktype, mul, div, offset_ns, snaplen)

    def _flags_direction(self, bo: str, opts: dict[int, bytes]) -> Direction | None:
        flags = opts.get(_EPB_FLAGS)
        if flags is None:
            return None
        if len(flags) != 4:
            raise self._error(f"epb_flags has length {len(flags)}, not 4")
        bits = struct.unpack(bo + "I", flags)[0] & 3
        if bits == _FLAG_INBOUND:
            return Direction.TO_DAEMON
        if bits == _FLAG_OUTBOUND:
            return Direction.FROM_DAEMON
        return None

    def _lookup(self, interfaces: list[_Interface], if_id: int) -> _Interface:
        if if_id >= len(interfaces):
            raise self._error(
                f"packet refers to interface {if_id}, but the section describes "
                f"{len(interfaces)} interface(s)"
            )
        return interfaces[if_id]

    def _dispatch(
        self, bo: str, block_type: int, body: bytes, interfaces: list[_Interface]
    ) -> Packet | None:
        if block_type == _IDB:
            interfaces.append(self._interface(bo, body))
            return None
        if block_type in (_EPB, _PB):
            if len(body) < 20:
                raise self._error("packet block too short for its fixed fields")
            if block_type == _EPB:
                if_id, ts_hi, ts_lo, caplen, orig_len = struct.unpack_from(bo + "IIIII", body)
            else:
                if_id, _drops, ts_hi, ts_lo, caplen, orig_len = struct.unpack_from(
                    bo + "HHIIII", body
                )
            if 20 + _pad4(caplen) > len(body):
                raise self._error(f"captured length {caplen} overruns its packet block")
            iface = self._lookup(interfaces, if_id)
            direction = self._flags_direction(bo, self._options(bo, body, 20 + _pad4(caplen)))
            ts_ns = (((ts_hi << 32) | ts_lo) * iface.ts_mul) // iface.ts_div + iface.ts_offset_ns
            frame = body[20 : 20 + caplen]
            return self._packet(iface, if_id, ts_ns, frame, orig_len, direction)
        if block_type == _SPB:
            if len(body) < 4:
                raise self._error("simple packet block too short")
            iface = self._lookup(interfaces, 0)
            (orig_len,) = struct.unpack_from(bo + "I", body)
            caplen = min(orig_len, len(body) - 4)
            if iface.snaplen:
                caplen = min(caplen, iface.snaplen)
            return self._packet(iface, 0, 0, body[4 : 4 + caplen], orig_len, None)
        return None  # unknown or uninteresting block type: skipped


def read_capture(
    path_or_binary_file: str | os.PathLike[str] | BinaryIO,
    *,
    netlink_family: int | None = NETLINK_CONNECTOR,
    on_foreign_linktype: Literal["error", "skip"] = "error",
) -> Iterator[Packet]:
    """Iterate over the netlink datagrams of a pcapng or pcap capture (see module docs).

    Raises :class:`CaptureFormatError` for any malformed or truncated input; packets before
    the defect have already been yielded.  A path is opened (and closed) here; a file object
    is read from its current position and left open.
    """
    if on_foreign_linktype not in ("error", "skip"):
        raise ValueError(
            f"on_foreign_linktype must be 'error' or 'skip', not {on_foreign_linktype!r}"
        )
    return _read(path_or_binary_file, netlink_family, on_foreign_linktype)


def _read(
    source: str | os.PathLike[str] | BinaryIO,
    netlink_family: int | None,
    on_foreign_linktype: Literal["error", "skip"],
) -> Iterator[Packet]:
    if isinstance(source, str | os.PathLike):
        with open(source, "rb") as f:
            yield from _Reader(f, netlink_family, on_foreign_linktype).packets()
    else:
        yield from _Reader(source, netlink_family, on_foreign_linktype).packets()
