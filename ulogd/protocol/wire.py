"""Netlink connector datagrams carrying ``struct dm_ulog_request``: decode and encode (pure).

Theory of operation
-------------------
A datagram is ``nlmsghdr`` (16 bytes) + ``cn_msg`` (20 bytes) + the request header + payload,
every integer in host byte order, packed without alignment (the request starts at byte 36).
Each layer is described by a table of ``(field, struct code)`` pairs, read like the C
headers; a :class:`Layout` glues the three tables into one precompiled ``struct.Struct`` so a
request is decoded with a single ``unpack_from``.  Two request layouts exist:

* ``CURRENT`` — protocol versions 1-3 (Linux 2.6.31+): ``luid``, ``uuid``, ``version``, … 160 bytes.
  Versions 1-3 share the layout; they differ in meaning only (v2: CTR may answer with a log
  device name; v3: FLUSH may carry marks).  A ``version`` of 0 is a v1 kernel (the field was
  padding before v2).
* ``LEGACY_2009`` — the original header without ``luid``/``version`` (152 bytes).

:func:`decode` never raises: it returns either a :class:`Request` or a :class:`Rejected`
that says why and whether the sequence number could be read, so the caller can still answer
with an error instead of leaving the kernel to time out.  Replies are built by
:func:`encode_reply` (full reply keyed by the request's ``seq``) or :func:`encode_ack`
(the header-only form the kernel matches on ``cn_msg.seq``).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from ulogd.protocol import spec as p

NLMSGHDR: tuple[tuple[str, str], ...] = (
    ("nlmsg_len", "I"),
    ("nlmsg_type", "H"),
    ("nlmsg_flags", "H"),
    ("nlmsg_seq", "I"),
    ("nlmsg_pid", "I"),
)
CN_MSG: tuple[tuple[str, str], ...] = (
    ("cn_idx", "I"),
    ("cn_val", "I"),
    ("cn_seq", "I"),
    ("cn_ack", "I"),
    ("cn_len", "H"),
    ("cn_flags", "H"),
)
ULOG_REQUEST_V1_3: tuple[tuple[str, str], ...] = (
    ("luid", "Q"),
    ("uuid", f"{p.DM_UUID_LEN}s"),
    ("padding", "3s"),
    ("version", "I"),
    ("error", "i"),
    ("seq", "I"),
    ("request_type", "I"),
    ("data_size", "I"),
)
ULOG_REQUEST_2009: tuple[tuple[str, str], ...] = (
    ("uuid", f"{p.DM_UUID_LEN}s"),
    ("padding", "7s"),
    ("error", "i"),
    ("seq", "I"),
    ("request_type", "I"),
    ("data_size", "I"),
)


class Layout:
    """One complete datagram layout: netlink header, connector header, request header."""

    def __init__(self, name: str, request: tuple[tuple[str, str], ...]) -> None:
        self.name = name
        self.fields = NLMSGHDR + CN_MSG + request
        self.names = tuple(n for n, _ in self.fields)
        self.struct = struct.Struct("=" + "".join(code for _, code in self.fields))
        self.header_size = self.struct.size
        self.prefix_size = struct.calcsize("=" + "".join(c for _, c in NLMSGHDR + CN_MSG))
        self.request_size = self.header_size - self.prefix_size
        self.has_luid = "luid" in self.names
        self._index = {n: i for i, n in enumerate(self.names)}
        self.i_luid = self._index.get("luid", -1)
        self.i_uuid = self._index["uuid"]
        self.i_version = self._index.get("version", -1)
        self.i_seq = self._index["seq"]
        self.i_type = self._index["request_type"]
        self.i_data_size = self._index["data_size"]
        # Offsets of the fields a reply rewrites, and of the seq for partial datagrams.
        offset = 0
        self.offsets: dict[str, int] = {}
        for name, code in self.fields:
            self.offsets[name] = offset
            offset += struct.calcsize("=" + code)
        # A reply is the request's header with four fields rewritten: one pack of those
        # fields and the three unchanged stretches between them.
        o_err, o_size = self.offsets["error"], self.offsets["data_size"]
        self.o_error = o_err
        self.o_data_size = o_size
        self.reply_struct = struct.Struct(f"=I28sH{o_err - 34}si{o_size - o_err - 4}sI")
        #: the fast decoder of well-formed requests, built on first use (see decode)
        self.fast: Callable[[bytes | bytearray | memoryview, int], Request | None] | None = None

    def index(self, name: str) -> int:
        return self._index[name]

    def __repr__(self) -> str:
        return f"Layout({self.name}, {self.request_size}-byte request)"


CURRENT = Layout("current", ULOG_REQUEST_V1_3)
LEGACY_2009 = Layout("legacy-2009", ULOG_REQUEST_2009)
LAYOUTS = {CURRENT.name: CURRENT, LEGACY_2009.name: LEGACY_2009}

_ACK = struct.Struct("=IHHII" + "IIIIHH")


@dataclass(slots=True)
class Request:
    """A decoded kernel request.  ``request_type`` is already masked with 0xFF."""

    luid: int
    uuid: str
    version: int
    seq: int
    request_type: int
    data: bytes
    raw_header: bytes = field(repr=False)
    layout: Layout = field(repr=False, default=CURRENT)
    cn_seq: int = 0

    @property
    def key(self) -> tuple[str, int]:
        return (self.uuid, self.luid)


@dataclass(slots=True)
class Rejected:
    """A datagram that is not a usable request, and how (if at all) it can be answered."""

    reason: str
    #: the reply to send (an error for a readable kernel request), or None to drop silently
    reply: bytes | None = None
    #: True when the datagram did not come from the kernel (logged at a higher level)
    foreign: bool = False


_MAX_UUID_CACHE = 4096
_uuid_cache: dict[bytes, str] = {}


def _uuid_text(raw: bytes) -> str:
    text = _uuid_cache.get(raw)
    if text is None:
        end = raw.find(b"\0")
        name = raw if end < 0 else raw[:end]
        if b"\\" in name:  # escaped too, so that no two uuids share a text
            name = name.replace(b"\\", b"\\x5c")
        text = name.decode("ascii", "backslashreplace")
        if len(_uuid_cache) >= _MAX_UUID_CACHE:
            _uuid_cache.clear()
        _uuid_cache[raw] = text
    return text


def decode(
    datagram: bytes | bytearray | memoryview, layout: Layout = CURRENT, sender_port: int = 0
) -> Request | Rejected:
    """Decode one datagram; never raises."""
    if sender_port != 0:
        return Rejected(f"datagram from netlink port {sender_port}, not the kernel", foreign=True)
    size = len(datagram)
    if size >= layout.header_size:
        fast = layout.fast
        if fast is None:
            fast = layout.fast = _fast_decoder(layout)
        request = fast(datagram, size)
        if request is not None:
            return request
    return _decode_checked(datagram, layout, size)


def _fast_decoder(
    layout: Layout,
) -> Callable[[bytes | bytearray | memoryview, int], Request | None]:
    """The fast path for ``layout``: one unpack, then the checks on the values, every
    constant bound in the closure.  None means "not the common well-formed case": the
    caller then runs :func:`_decode_checked`, which finds and names the problem (or
    accepts the rare legal forms this path leaves to it, e.g. version 0)."""
    unpack = layout.struct.unpack_from
    header_size, prefix_size, request_size = (
        layout.header_size,
        layout.prefix_size,
        layout.request_size,
    )
    has_luid = layout.has_luid
    i_luid, i_uuid, i_version = layout.i_luid, layout.i_uuid, layout.i_version
    i_seq, i_type, i_data_size = layout.i_seq, layout.i_type, layout.i_data_size
    cn_idx, cn_val, done = p.CN_IDX_DM, p.CN_VAL_DM_USERSPACE_LOG, p.NLMSG_DONE
    mask, max_version, flush = p.REQUEST_TYPE_MASK, p.PROTOCOL_VERSION, int(p.RequestType.FLUSH)
    fixed_size = _FIXED_SIZES.get
    region_lists = _REGION_LISTS
    uuids = _uuid_cache

    def fast(datagram: bytes | bytearray | memoryview, size: int) -> Request | None:
        v = unpack(datagram)
        if (
            v[4]  # nlmsg_pid: not the kernel
            or v[5] != cn_idx
            or v[6] != cn_val
            or v[1] != done
            or v[0] != size
            or v[9] != size - prefix_size
        ):
            return None
        data_size = v[i_data_size]
        if data_size != v[9] - request_size:
            return None
        rtype = v[i_type] & mask
        version = v[i_version] if has_luid else 1
        if not 0 < version <= max_version:
            return None
        expected = fixed_size(rtype)
        if expected is None:
            if (
                rtype not in region_lists
                or data_size % 8
                or (data_size and version < 3 and rtype == flush)
            ):
                return None
        elif expected != data_size:
            return None
        raw = v[i_uuid]
        uuid = uuids.get(raw)
        if uuid is None:
            uuid = _uuid_text(raw)
        if type(datagram) is bytes:
            header = datagram[:header_size]
            data = datagram[header_size:] if data_size else b""
        else:
            header = bytes(datagram[:header_size])
            data = bytes(datagram[header_size:]) if data_size else b""
        return Request(
            v[i_luid] if has_luid else 0, uuid, version, v[i_seq], rtype, data, header, layout, v[7]
        )

    return fast


#: request types whose payload has one exact size (the common ones take the fast path)
_FIXED_SIZES: dict[int, int] = {
    t: {p.Payload.NONE: 0, p.Payload.REGION: 8, p.Payload.REGION_SYNC: 16}[spec.payload]
    for t, spec in p.SPECS.items()
    if spec.payload in (p.Payload.NONE, p.Payload.REGION, p.Payload.REGION_SYNC)
}


_REGION_LISTS = frozenset(t for t, spec in p.SPECS.items() if spec.payload is p.Payload.REGIONS)


def _decode_checked(
    datagram: bytes | bytearray | memoryview, layout: Layout, size: int
) -> Request | Rejected:
    """Every check, one at a time, with a reason for whatever fails."""
    if size < layout.prefix_size:
        return Rejected(f"truncated datagram of {size} bytes (< {layout.prefix_size})")
    nl_len, nl_type, _fl, _nseq, nl_pid, idx, val, cn_seq, _ack, cn_len, _cfl = _ACK.unpack_from(
        datagram
    )
    if nl_pid != 0:
        return Rejected(f"datagram claims netlink pid {nl_pid}, not the kernel", foreign=True)
    if (idx, val) != (p.CN_IDX_DM, p.CN_VAL_DM_USERSPACE_LOG):
        return Rejected(f"connector id ({idx},{val}) is not dm-log-userspace (7,1)", foreign=True)
    if nl_type != p.NLMSG_DONE:
        return Rejected(f"nlmsg_type {nl_type} is not NLMSG_DONE")
    if cn_len == 0:
        # No request header, but cn_msg.seq is the request's seq (the kernel sets both
        # alike): the ack-only form ends the request it would wait for with -EINVAL.
        return Rejected(
            "connector message without a request (len 0)", reply=encode_ack(cn_seq, p.EINVAL)
        )
    if nl_len > size or layout.prefix_size + cn_len > min(nl_len, size):
        # The lengths lie.  If the connector sequence number is readable, the kernel can
        # still be told (ack-only replies are matched on cn_msg.seq).
        return Rejected(
            f"lengths disagree: datagram {size} B, nlmsg_len {nl_len}, cn_msg.len {cn_len}",
            reply=encode_ack(cn_seq, p.EINVAL),
        )
    if cn_len < layout.request_size:
        return Rejected(
            f"request of {cn_len} bytes is shorter than the {layout.request_size}-byte header",
            reply=encode_ack(cn_seq, p.EINVAL),
        )
    v = layout.struct.unpack_from(datagram)
    data_size = v[layout.i_data_size]
    raw_type = v[layout.i_type]
    request_type = raw_type & p.REQUEST_TYPE_MASK
    version = v[layout.i_version] if layout.has_luid else 1
    header = bytes(datagram[: layout.header_size])
    if layout.request_size + data_size != cn_len:
        return Rejected(
            f"data_size {data_size} disagrees with cn_msg.len {cn_len}",
            reply=_error_reply(layout, header, p.EINVAL),
        )
    if request_type not in p.SPECS:
        return Rejected(
            f"unknown request type {raw_type:#x}",
            reply=_error_reply(layout, header, p.EINVAL),
        )
    if version > p.PROTOCOL_VERSION:
        return Rejected(
            f"unsupported protocol version {version} (ulogd speaks 1..{p.PROTOCOL_VERSION})",
            reply=_error_reply(layout, header, p.EINVAL),
        )
    data = bytes(datagram[layout.header_size : layout.header_size + data_size])
    problem = p.payload_error(request_type, max(version, 1), data_size)
    if problem:
        return Rejected(
            f"{p.type_name(request_type)} {problem}", reply=_error_reply(layout, header, p.EINVAL)
        )
    return Request(
        luid=v[layout.i_luid] if layout.has_luid else 0,
        uuid=_uuid_text(v[layout.i_uuid]),
        version=max(version, 1),
        seq=v[layout.i_seq],
        request_type=request_type,
        data=data,
        raw_header=header,
        layout=layout,
        cn_seq=cn_seq,
    )


def _error_reply(layout: Layout, header: bytes, error: int) -> bytes:
    return _build(layout, header, error, b"")


def _build(layout: Layout, header: bytes, error: int, payload: bytes) -> bytes:
    """A reply: the request's own headers with lengths, ``error`` and ``data_size`` rewritten
    (cn_msg.seq and nlmsg_seq are left as the kernel sent them; it matches on the request's
    ``seq``, which is kept)."""
    n = len(payload)
    o_err = layout.o_error
    reply = layout.reply_struct.pack(
        layout.header_size + n,
        header[4:32],
        layout.request_size + n,
        header[34:o_err],
        error,
        header[o_err + 4 : layout.o_data_size],
        n,
    )
    return reply + payload if n else reply


def encode_reply(request: Request, error: int = 0, payload: bytes = b"") -> bytes:
    """A full reply to ``request``: its header with ``error``/``data_size`` and ``payload``.

    ``error`` is 0 or a negative errno.  A non-zero error never carries a payload.  The
    payload must fit the kernel's buffer for that type (:data:`protocol.SPECS`); exceeding it
    is a programming error and raises ``ValueError``.
    """
    if error:
        payload = b""
    capacity = _CAPACITY[request.request_type]
    if len(payload) > capacity:
        raise ValueError(
            f"{p.type_name(request.request_type)} reply of {len(payload)} bytes exceeds the "
            f"kernel's {capacity}-byte buffer"
        )
    return _build(request.layout, request.raw_header, error, payload)


_CAPACITY: dict[int, int] = {t: spec.reply_capacity for t, spec in p.SPECS.items()}


def encode_ack(cn_seq: int, error: int) -> bytes:
    """The header-only reply form: the kernel matches it on ``cn_msg.seq``; result = -ack."""
    return _ACK.pack(
        36, p.NLMSG_DONE, 0, 0, 0, p.CN_IDX_DM, p.CN_VAL_DM_USERSPACE_LOG, cn_seq, -error, 0, 0
    )


def encode_request(
    request_type: int,
    *,
    uuid: str,
    luid: int = 0,
    seq: int = 0,
    data: bytes = b"",
    version: int = p.PROTOCOL_VERSION,
    error: int = 0,
    layout: Layout = CURRENT,
) -> bytes:
    """Build a kernel-format request datagram (what the kernel sends; used by tests, the test
    transport's clients and benchmarks)."""
    values = {
        "luid": luid,
        "uuid": uuid.encode("ascii"),
        "padding": b"",
        "version": version,
        "error": error,
        "seq": seq,
        "request_type": request_type,
        "data_size": len(data),
    }
    cn_len = layout.request_size + len(data)
    prefix: dict[str, object] = {
        "nlmsg_len": layout.prefix_size + cn_len,
        "nlmsg_type": p.NLMSG_DONE,
        "nlmsg_flags": 0,
        "nlmsg_seq": seq,
        "nlmsg_pid": 0,
        "cn_idx": p.CN_IDX_DM,
        "cn_val": p.CN_VAL_DM_USERSPACE_LOG,
        "cn_seq": seq,
        "cn_ack": 0,
        "cn_len": cn_len,
        "cn_flags": 0,
    }
    prefix.update(values)
    return layout.struct.pack(*(prefix[n] for n in layout.names)) + data


@dataclass(frozen=True, slots=True)
class Reply:
    """A decoded reply (what the kernel would see): for tests, replay and clients."""

    seq: int
    error: int
    data: bytes
    ack_only: bool = False


def decode_reply(datagram: bytes, layout: Layout = CURRENT) -> Reply:
    """Decode a reply datagram as the kernel's ``cn_ulog_callback`` would; raises ValueError."""
    if len(datagram) < layout.prefix_size:
        raise ValueError(f"reply of {len(datagram)} bytes is shorter than the headers")
    *_, cn_seq, cn_ack, cn_len, _flags = _ACK.unpack_from(datagram)
    if cn_len == 0:
        return Reply(seq=cn_seq, error=-cn_ack, data=b"", ack_only=True)
    if cn_len < layout.request_size or len(datagram) < layout.prefix_size + cn_len:
        raise ValueError(f"incomplete reply (cn_msg.len {cn_len}, {len(datagram)} bytes)")
    fields = dict(zip(layout.names, layout.struct.unpack_from(datagram), strict=True))
    size = fields["data_size"]
    data = bytes(datagram[layout.header_size : layout.header_size + size])
    return Reply(seq=fields["seq"], error=fields["error"], data=data)
