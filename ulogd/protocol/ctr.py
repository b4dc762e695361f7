"""The constructor string: grammar, validation, and the resulting :class:`LogConfig` (pure).

Theory of operation
-------------------
At table load the kernel sends ``"<target sectors> <log type> <log args...>"`` (the uuid and an
``integrated_flush`` keyword were already removed from the table's log arguments); on a
reconnect after a daemon restart it sends the same string with a trailing NUL.  The grammar::

    <sectors> clustered-core <region_size> [sync|nosync] [block_on_error]
    <sectors> clustered-disk <log_dev> <region_size> [sync|nosync] [block_on_error]
    <sectors> core           <region_size> [sync|nosync] [block_on_error]
    <sectors> disk           <log_dev> <region_size> [sync|nosync] [block_on_error]

``<log_dev>`` is a path or ``MAJ:MIN``; ``<region_size>`` is in 512-byte sectors, a power of
two, at least 2 and at most the target length (the kernel maps regions with a shift, so any
other value would mis-map them).  Unlike cmirrord, the type word decides whether a device is
expected, unknown words are refused rather than ignored, and every failure is a negative
errno with a message naming the offending token.  Parsing touches no device: resolving
``<log_dev>`` is the caller's job.
"""

from __future__ import annotations

import enum
import errno
from dataclasses import dataclass

MAX_REGIONS = 1 << 32


class SyncMode(enum.Enum):
    DEFAULT = ""  # resync what the log does not know to be in sync
    SYNC = "sync"  # force a full resync
    NOSYNC = "nosync"  # assume every region is in sync


class CtrError(Exception):
    """A constructor string that cannot be accepted; ``errno`` is positive."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err

    @property
    def reply_error(self) -> int:
        return -self.errno


@dataclass(frozen=True, slots=True)
class LogConfig:
    type_word: str  # clustered-core | clustered-disk | core | disk
    target_sectors: int
    region_size: int
    sync: SyncMode
    block_on_error: bool
    log_device: str | None
    #: the constructor arguments as received, without the trailing NUL
    text: str

    @property
    def clustered(self) -> bool:
        return self.type_word.startswith("clustered-")

    @property
    def has_disk(self) -> bool:
        return self.log_device is not None

    @property
    def region_count(self) -> int:
        return -(-self.target_sectors // self.region_size)

    def same_geometry(self, other: LogConfig) -> bool:
        return (self.region_size, self.region_count) == (other.region_size, other.region_count)


TYPES = {"clustered-core": False, "clustered-disk": True, "core": False, "disk": True}


def _number(token: str, what: str) -> int:
    if not token.isascii() or not token.isdigit():
        raise CtrError(errno.EINVAL, f"{what} {token!r} is not a decimal number")
    return int(token, 10)


def parse(payload: bytes) -> LogConfig:
    """Parse a CTR payload (with or without its trailing NUL); raises :class:`CtrError`."""
    if payload.endswith(b"\0"):
        payload = payload[:-1]
    if b"\0" in payload:
        raise CtrError(errno.EINVAL, "constructor string contains a NUL byte")
    try:
        text = payload.decode("ascii")
    except UnicodeDecodeError:
        raise CtrError(errno.EINVAL, "constructor string is not ASCII") from None
    tokens = text.split()
    if len(tokens) < 3:
        raise CtrError(errno.EINVAL, f"too few constructor arguments in {text!r}")
    sectors = _number(tokens[0], "target length")
    if sectors == 0:
        raise CtrError(errno.EINVAL, "target length is 0")
    type_word = tokens[1]
    if type_word not in TYPES:
        known = ", ".join(TYPES)
        raise CtrError(errno.EINVAL, f"unknown log type {type_word!r} (expected one of {known})")
    args = tokens[2:]
    device: str | None = None
    if TYPES[type_word]:
        device = args.pop(0)
        if not args:
            raise CtrError(errno.EINVAL, f"{type_word} needs <log_dev> <region_size>")
        if ":" in device:
            major, _, minor = device.partition(":")
            if not (major.isdigit() and minor.isdigit()):
                raise CtrError(errno.EINVAL, f"log device {device!r} is not a path or MAJ:MIN")
        elif not device.startswith("/"):
            raise CtrError(errno.EINVAL, f"log device {device!r} is not a path or MAJ:MIN")
    region_size = _number(args.pop(0), "region size")
    if region_size < 2 or region_size & (region_size - 1):
        raise CtrError(errno.EINVAL, f"region size {region_size} is not a power of two >= 2")
    if region_size > sectors:
        raise CtrError(
            errno.EINVAL, f"region size {region_size} exceeds the target length {sectors}"
        )
    sync = SyncMode.DEFAULT
    block_on_error = False
    for word in args:
        if word in ("sync", "nosync"):
            if sync is not SyncMode.DEFAULT:
                raise CtrError(errno.EINVAL, f"more than one of sync/nosync in {text!r}")
            sync = SyncMode(word)
        elif word == "block_on_error":
            if block_on_error:
                raise CtrError(errno.EINVAL, "block_on_error given twice")
            block_on_error = True
        else:
            raise CtrError(errno.EINVAL, f"unknown constructor argument {word!r}")
    config = LogConfig(type_word, sectors, region_size, sync, block_on_error, device, text)
    if config.region_count > MAX_REGIONS:
        raise CtrError(
            errno.EINVAL, f"{config.region_count} regions exceed the limit of {MAX_REGIONS}"
        )
    return config
