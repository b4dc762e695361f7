"""The dm-log-userspace request vocabulary: request types, payload shapes, reply capacities.

Theory of operation
-------------------
Everything the kernel and ulogd agree on *per request type* lives in one table, ``SPECS``:
the shape of the payload the kernel sends (checked before any state is touched) and the
largest reply payload the kernel accepts for that type.  The kernel turns a reply payload
larger than its buffer into ``-ENOSPC``, so a reply that exceeds ``reply_capacity`` is a bug
in ulogd, never something to send.  The values follow ``include/uapi/linux/dm-log-userspace.h``
(protocol version 3) and ``drivers/md/dm-log-userspace-base.c``.
"""

from __future__ import annotations

import enum
import errno
import struct
from dataclasses import dataclass

CN_IDX_DM = 7
CN_VAL_DM_USERSPACE_LOG = 1
NETLINK_CONNECTOR = 11
NLMSG_DONE = 3
DM_UUID_LEN = 129
REQUEST_TYPE_MASK = 0xFF
#: The newest protocol version ulogd speaks (3 = integrated flush).
PROTOCOL_VERSION = 3
#: The kernel pre-allocates 512 bytes for cn_msg + request + payload.
KERNEL_MAX_REQUEST_PAYLOAD = 512 - 20 - 160
#: CONNECTOR_MAX_MSG_SIZE: the largest cn_msg payload the connector carries.
CONNECTOR_MAX_MSG_SIZE = 16384


class RequestType(enum.IntEnum):
    CTR = 1
    DTR = 2
    PRESUSPEND = 3
    POSTSUSPEND = 4
    RESUME = 5
    GET_REGION_SIZE = 6
    IS_CLEAN = 7
    IN_SYNC = 8
    FLUSH = 9
    MARK_REGION = 10
    CLEAR_REGION = 11
    GET_RESYNC_WORK = 12
    SET_REGION_SYNC = 13
    GET_SYNC_COUNT = 14
    STATUS_INFO = 15
    STATUS_TABLE = 16
    IS_REMOTE_RECOVERING = 17


class Payload(enum.Enum):
    """What a request carries after the 160-byte header."""

    NONE = "none"  # exactly 0 bytes
    ANY = "any"  # ignored (DTR: the header comment mentions a string, the kernel sends none)
    STRING = "string"  # constructor string, 1..332 bytes
    REGION = "region"  # one u64 region number
    REGIONS = "regions"  # u64[] (0..n regions)
    REGION_SYNC = "region_sync"  # {u64 region; s64 in_sync}


#: Replies of STATUS_* are bounded by the kernel's status buffer, which ulogd cannot see;
#: status strings are short, so a generous fixed bound keeps every reply in one datagram.
STATUS_CAPACITY = 1024


@dataclass(frozen=True, slots=True)
class RequestSpec:
    payload: Payload
    reply_capacity: int


SPECS: dict[int, RequestSpec] = {
    RequestType.CTR: RequestSpec(Payload.STRING, 128),
    RequestType.DTR: RequestSpec(Payload.ANY, 0),
    RequestType.PRESUSPEND: RequestSpec(Payload.NONE, 0),
    RequestType.POSTSUSPEND: RequestSpec(Payload.NONE, 0),
    RequestType.RESUME: RequestSpec(Payload.NONE, 0),
    RequestType.GET_REGION_SIZE: RequestSpec(Payload.NONE, 8),
    RequestType.IS_CLEAN: RequestSpec(Payload.REGION, 8),
    RequestType.IN_SYNC: RequestSpec(Payload.REGION, 8),
    RequestType.FLUSH: RequestSpec(Payload.REGIONS, 0),
    RequestType.MARK_REGION: RequestSpec(Payload.REGIONS, 0),
    RequestType.CLEAR_REGION: RequestSpec(Payload.REGIONS, 0),
    RequestType.GET_RESYNC_WORK: RequestSpec(Payload.NONE, 16),
    RequestType.SET_REGION_SYNC: RequestSpec(Payload.REGION_SYNC, 0),
    RequestType.GET_SYNC_COUNT: RequestSpec(Payload.NONE, 8),
    RequestType.STATUS_INFO: RequestSpec(Payload.NONE, STATUS_CAPACITY),
    RequestType.STATUS_TABLE: RequestSpec(Payload.NONE, STATUS_CAPACITY),
    RequestType.IS_REMOTE_RECOVERING: RequestSpec(Payload.REGION, 16),
}


#: The payload codecs, declared once (native byte order, as the kernel sends them):
#: a region or a count (u64), a yes/no answer (s64), a pair answer (s64, u64: GET_RESYNC_WORK's
#: ``{i; region}``, IS_REMOTE_RECOVERING's ``{recovering; hint}``) and SET_REGION_SYNC's
#: ``{u64 region; s64 in_sync}``.
U64 = struct.Struct("=Q")
S64 = struct.Struct("=q")
PAIR = struct.Struct("=qQ")
REGION_SYNC = struct.Struct("=Qq")


def regions(data: bytes) -> memoryview | tuple[()]:
    """A region list payload (u64[]) as a sequence of ints, without copying."""
    return memoryview(data).cast("Q") if data else ()


def type_name(request_type: int) -> str:
    """A readable name for a (masked) request type, also for unknown values."""
    try:
        return RequestType(request_type).name
    except ValueError:
        return f"UNKNOWN({request_type})"


def payload_error(request_type: int, version: int, size: int) -> str | None:
    """Why a payload of ``size`` bytes is wrong for this request type, or None if it fits."""
    spec = SPECS[request_type]
    shape = spec.payload
    if shape is Payload.NONE and size:
        return f"expects no payload, got {size} bytes"
    if shape is Payload.STRING and not 0 < size <= KERNEL_MAX_REQUEST_PAYLOAD + 1:
        return f"constructor string of {size} bytes (1..{KERNEL_MAX_REQUEST_PAYLOAD + 1})"
    if shape is Payload.REGION and size != 8:
        return f"expects one u64 region, got {size} bytes"
    if shape is Payload.REGION_SYNC and size != 16:
        return f"expects {{u64 region; s64 in_sync}}, got {size} bytes"
    if shape is Payload.REGIONS:
        if size % 8:
            return f"region list of {size} bytes is not a multiple of 8"
        if request_type == RequestType.FLUSH and size and version < 3:
            return f"FLUSH with marks needs protocol 3 (integrated flush), request is v{version}"
    return None


#: Negative errno values used in replies, named for readability at call sites.
EINVAL = -errno.EINVAL
ENOSPC = -errno.ENOSPC
ESRCH = -errno.ESRCH
EIO = -errno.EIO
EEXIST = -errno.EEXIST
ENOENT = -errno.ENOENT
ENOMEM = -errno.ENOMEM


def errno_name(error: int) -> str:
    """``-22`` → ``-EINVAL``; 0 → ``0``."""
    if error == 0:
        return "0"
    name = errno.errorcode.get(abs(error), str(abs(error)))
    return f"-{name}" if error < 0 else name
