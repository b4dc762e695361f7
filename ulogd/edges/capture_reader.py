"""Reading capture files (pcapng, and classic pcap) back: :func:`read_capture`.

The format is described in :mod:`ulogd.edges.capture`, which writes it; this module reads
what the daemon wrote and what tshark or tcpdump wrote of the same traffic, with the rules
stated there (unknown blocks skipped, a truncated tail reported, never a crash).
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO, Literal

from ulogd.edges.capture import (  # the format's codes, declared once with the writer
    _EPB,
    _EPB_FLAGS,
    _FLAG_INBOUND,
    _FLAG_OUTBOUND,
    _IDB,
    _IF_TSOFFSET,
    _IF_TSRESOL,
    _OPT_ENDOFOPT,
    _PB,
    _PCAP_MAGIC_NS,
    _PCAP_MAGIC_US,
    _PKTTYPE_IN,
    _PSEUDO,
    _SPB,
    ARPHRD_NETLINK,
    LINKTYPE_NETLINK,
    MAX_BLOCK_LENGTH,
    NETLINK_CONNECTOR,
    PSEUDO_HEADER_LEN,
    CaptureFormatError,
    Direction,
    Packet,
    _pad4,
)

__all__ = ["read_capture"]

log = logging.getLogger(__name__)


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
