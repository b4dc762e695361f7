"""``dm-ulogd table``: the device-mapper table of a mirror whose dirty log is served by ulogd.

Theory of operation
-------------------
LVM 2.03 no longer writes ``userspace`` log arguments into mirror tables, so an administrator
needs the line for ``dmsetup``.  The mirror target's syntax (``dm-raid1``), with the userspace
log (``dm-log-userspace``) in place of a kernel log::

    <start> <length> mirror userspace <N> <uuid> [integrated_flush] <type> <type args...>
            <#legs> <leg dev> <leg offset> ... [<#features> <feature>...]

``<N>`` counts every log argument after itself: the uuid, ``integrated_flush`` if present, the
log type word and that type's arguments (``[<log_dev>] <region_size> [sync|nosync]
[block_on_error]``).  Features are ``handle_errors`` and ``keep_log``.  The kernel hands ulogd
the log arguments after the uuid (without ``integrated_flush``) prefixed with the target length;
:func:`build` runs exactly that string through ulogd's own constructor parser
(:func:`ulogd.protocol.ctr.parse`), so a table this tool prints is one the daemon accepts.

The target length defaults to the smallest leg (less its offset), read from the device with
``lseek(SEEK_END)``, or for a leg given as ``MAJ:MIN`` from ``/sys/dev/block/MAJ:MIN/size``;
``--size`` sets it explicitly (sectors, or a number with a binary unit:
``64M``, ``10GiB``).  ``--create NAME`` runs ``dmsetup create NAME --table LINE``.
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import subprocess
import sys
import uuid as uuidlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ulogd.protocol import ctr

LOG_TYPES = ("clustered-core", "clustered-disk", "core", "disk")
MIN_LEGS, MAX_LEGS = 2, 9  # dm-raid1: 2 ≤ mirrors ≤ DM_KCOPYD_MAX_REGIONS + 1
SYS_DEV_BLOCK = "/sys/dev/block"
_UNITS = {"": 1, "s": 1, "k": 2, "m": 2**11, "g": 2**21, "t": 2**31, "p": 2**41}


class TableError(Exception):
    """Options that do not make a valid mirror table (the message says which)."""


@dataclass(frozen=True, slots=True)
class Leg:
    device: str
    offset: int = 0

    @classmethod
    def parse(cls, text: str) -> Leg:
        device, sep, offset = text.rpartition(":")
        if sep and offset.isdigit() and not re.fullmatch(r"\d+", device):
            return cls(device, int(offset))
        return cls(text, 0)


@dataclass(frozen=True, slots=True)
class MirrorSpec:
    legs: tuple[Leg, ...]
    sectors: int
    log_type: str
    region_size: int
    uuid: str
    log_device: str | None = None
    sync: str | None = None  # None | "sync" | "nosync"
    block_on_error: bool = False
    integrated_flush: bool = False
    handle_errors: bool = False
    keep_log: bool = False
    start: int = 0


def parse_size(text: str) -> int:
    """Sectors from ``131072``, ``131072s``, ``64M``, ``64MiB``, ``1.5G`` (binary units)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgtps]?)(?:i?b)?\s*", text, re.IGNORECASE)
    if not match:
        raise TableError(f"size {text!r} is not a number of sectors or a size like 64M")
    number, unit = match.groups()
    value = float(number) * _UNITS[unit.lower()]
    if value != int(value) or value <= 0:
        raise TableError(f"size {text!r} is not a positive whole number of 512-byte sectors")
    return int(value)


def device_sectors(path: str) -> int:
    """Size of a block device (or file) in 512-byte sectors; a ``MAJ:MIN`` leg's from
    ``/sys/dev/block/MAJ:MIN/size`` (sectors, whatever the device's block size)."""
    if re.fullmatch(r"\d+:\d+", path):
        text = (Path(SYS_DEV_BLOCK) / path / "size").read_text()
        try:
            return int(text)
        except ValueError:
            raise OSError(errno.EINVAL, f"unreadable size {text.strip()!r}") from None
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.lseek(fd, 0, os.SEEK_END) // 512
    finally:
        os.close(fd)


def log_arguments(spec: MirrorSpec) -> list[str]:
    """The userspace log's arguments after ``<N>``: uuid, [integrated_flush], type, args."""
    args = [spec.uuid]
    if spec.integrated_flush:
        args.append("integrated_flush")
    args.append(spec.log_type)
    if spec.log_device:
        args.append(spec.log_device)
    args.append(str(spec.region_size))
    if spec.sync:
        args.append(spec.sync)
    if spec.block_on_error:
        args.append("block_on_error")
    return args


def build(spec: MirrorSpec) -> str:
    """The table line; raises :class:`TableError` for anything the kernel or daemon refuses."""
    if spec.log_type not in LOG_TYPES:
        raise TableError(f"unknown log type {spec.log_type!r} (one of {', '.join(LOG_TYPES)})")
    if not MIN_LEGS <= len(spec.legs) <= MAX_LEGS:
        raise TableError(f"a mirror has {MIN_LEGS} to {MAX_LEGS} legs, not {len(spec.legs)}")
    needs_device = spec.log_type.endswith("disk")
    if needs_device and not spec.log_device:
        raise TableError(f"log type {spec.log_type} needs --log-device")
    if not needs_device and spec.log_device:
        raise TableError(f"log type {spec.log_type} keeps its log in memory: no --log-device")
    if not spec.uuid or any(c.isspace() for c in spec.uuid) or len(spec.uuid) > 128:
        raise TableError(f"uuid {spec.uuid!r} must be 1-128 characters without blanks")
    for leg in spec.legs:
        if not leg.device or any(c.isspace() for c in leg.device):
            raise TableError(f"leg {leg.device!r} is not a device path or MAJ:MIN")
    args = log_arguments(spec)
    # What the daemon will receive at CTR: the target length, then the arguments after the
    # uuid without integrated_flush (the kernel strips both).
    ctr_text = " ".join([str(spec.sectors), *(a for a in args[1:] if a != "integrated_flush")])
    try:
        ctr.parse(ctr_text.encode())
    except ctr.CtrError as exc:
        raise TableError(f"ulogd would refuse this log: {exc}") from None
    words = [str(spec.start), str(spec.sectors), "mirror", "userspace", str(len(args)), *args]
    words.append(str(len(spec.legs)))
    for leg in spec.legs:
        words += [leg.device, str(leg.offset)]
    features = [
        f for f, on in (("handle_errors", spec.handle_errors), ("keep_log", spec.keep_log)) if on
    ]
    if features:
        words += [str(len(features)), *features]
    return " ".join(words)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "legs",
        nargs="+",
        metavar="LEG",
        help="mirror leg: device path or MAJ:MIN, "
        "optionally :OFFSET in sectors (e.g. /dev/sdb1 /dev/sdc1:2048)",
    )
    parser.add_argument(
        "--log-type",
        "-t",
        default="clustered-core",
        choices=LOG_TYPES,
        help="the log type ulogd serves (default clustered-core)",
    )
    parser.add_argument(
        "--log-device", "-l", metavar="DEV", help="log device for clustered-disk/disk"
    )
    parser.add_argument(
        "--region-size",
        "-r",
        default="512K",
        metavar="SIZE",
        help="region size: sectors or with a unit, a power of two (default 512K = 1024 sectors)",
    )
    parser.add_argument(
        "--size",
        "-s",
        metavar="SIZE",
        help="mirror length: sectors or with a unit (default: the smallest leg)",
    )
    parser.add_argument("--uuid", "-u", help="log uuid (default ulogd-NAME, or a random one)")
    sync = parser.add_mutually_exclusive_group()
    sync.add_argument(
        "--sync", dest="sync", action="store_const", const="sync", help="force a full resync"
    )
    sync.add_argument(
        "--nosync",
        dest="sync",
        action="store_const",
        const="nosync",
        help="assume the legs are already identical",
    )
    parser.add_argument("--block-on-error", action="store_true", help="log argument block_on_error")
    parser.add_argument(
        "--integrated-flush",
        action="store_true",
        help="let the kernel send marks with FLUSH (fewer round trips)",
    )
    parser.add_argument(
        "--handle-errors",
        action="store_true",
        help="mirror feature handle_errors (fail a leg on I/O error)",
    )
    parser.add_argument("--keep-log", action="store_true", help="mirror feature keep_log")
    parser.add_argument(
        "--create",
        metavar="NAME",
        help="run 'dmsetup create NAME' with the table instead of printing it",
    )
    parser.add_argument("--dmsetup", default="dmsetup", help=argparse.SUPPRESS)


def spec_from_args(args: argparse.Namespace) -> MirrorSpec:
    legs = tuple(Leg.parse(text) for text in args.legs)
    region_size = parse_size(args.region_size)
    if args.size:
        sectors = parse_size(args.size)
    else:
        sizes = []
        for leg in legs:
            try:
                sizes.append(device_sectors(leg.device) - leg.offset)
            except OSError as exc:
                raise TableError(
                    f"cannot read the size of leg {leg.device} ({exc.strerror}): give --size"
                ) from None
        sectors = min(sizes)
        if sectors <= 0:
            raise TableError("the smallest leg is empty after its offset")
    uuid = args.uuid or (f"ulogd-{args.create}" if args.create else f"ulogd-{uuidlib.uuid4().hex}")
    return MirrorSpec(
        legs=legs,
        sectors=sectors,
        log_type=args.log_type,
        region_size=region_size,
        uuid=uuid,
        log_device=args.log_device,
        sync=args.sync,
        block_on_error=args.block_on_error,
        integrated_flush=args.integrated_flush,
        handle_errors=args.handle_errors,
        keep_log=args.keep_log,
    )


def main(args: argparse.Namespace) -> int:
    try:
        line = build(spec_from_args(args))
    except TableError as exc:
        print(f"dm-ulogd table: {exc}", file=sys.stderr)
        return 2
    if not args.create:
        print(line)
        return 0
    command: Sequence[str] = [args.dmsetup, "create", args.create, "--table", line]
    print(f"dm-ulogd table: {' '.join(command[:3])} --table '{line}'", file=sys.stderr)
    try:
        result = subprocess.run(command, check=False)
    except FileNotFoundError:
        print(f"dm-ulogd table: {args.dmsetup} not found (install dmsetup)", file=sys.stderr)
        return 3
    if result.returncode:
        print(
            f"dm-ulogd table: dmsetup create failed (exit {result.returncode}); is ulogd running "
            "and the dm-log-userspace module loaded (modprobe dm-log-userspace)?",
            file=sys.stderr,
        )
    return result.returncode
