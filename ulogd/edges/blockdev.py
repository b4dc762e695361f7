"""Resolve the log-device argument of a ``disk`` / ``clustered-disk`` constructor.

Theory of operation
===================

The kernel hands the daemon the log device as it appears in the device-mapper table: LVM
writes ``MAJ:MIN`` (e.g. ``253:3``), a hand-written table may give an absolute path.
:func:`resolve` turns either into a :class:`BlockDevice` naming a device node that can be
opened, plus the device's size and logical block size.

* An absolute path must ``stat()`` (following symlinks) as a block device. A regular file is
  accepted only with ``allow_files=True`` (tests, offline replay of an image file).
* ``MAJ:MIN`` is resolved through sysfs, never by scanning ``/dev`` or ``/dev/mapper``
  (cmirrord scans ``/dev/mapper`` and so cannot find any log device that is not a DM device):
  ``<sysfs>/dev/block/MAJ:MIN`` must exist; its ``uevent`` names the kernel device
  (``DEVNAME=dm-3``); ``<dev>/<DEVNAME>`` is used when it is a block node with the same
  ``st_rdev``. Otherwise (no udev, a container with a minimal ``/dev``, a stale node) a
  private node ``blk-MAJ-MIN`` is created with ``mknod`` under the directory the caller
  provides (the daemon's run directory) and ``private_node`` is set, so the caller may remove
  it when the log goes away. An existing private node with the right ``st_rdev`` is reused;
  a wrong one is replaced atomically.
* Size and logical block size come from sysfs (``size`` in 512-byte sectors,
  ``queue/logical_block_size``, taken from the parent disk for a partition); a regular file
  reports ``st_size`` and ``st_blksize`` and ``0:0``.

Every failure raises :class:`BlockDevError` whose ``errno`` is ready to be negated into a
reply: ``EINVAL`` for a malformed argument, ``ENOENT`` for a device that does not exist,
``ENOTBLK`` for something that is not a block device, or the OS error that stopped us.
``sysfs_root`` and ``dev_root`` are parameters so tests can use a fake tree.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
import threading
from dataclasses import dataclass

__all__ = ["BlockDevError", "BlockDevice", "resolve"]

_MAJMIN = re.compile(r"(\d{1,10}):(\d{1,10})")
_MAX_MAJOR = (1 << 12) - 1  # Linux dev_t: 12-bit major, 20-bit minor
_MAX_MINOR = (1 << 20) - 1


class BlockDevError(OSError):
    """The log-device argument cannot be resolved; ``errno`` says why (positive)."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(err, message)


@dataclass(frozen=True)
class BlockDevice:
    """A resolved log device: a node to open, its identity and geometry."""

    path: str
    major: int
    minor: int
    size_bytes: int
    logical_block_size: int
    private_node: bool = False  # True when resolve() created ``path`` with mknod


def parse_majmin(arg: str) -> tuple[int, int]:
    """Parse ``MAJ:MIN`` (decimal); ``BlockDevError(EINVAL)`` when malformed or out of range."""
    m = _MAJMIN.fullmatch(arg)
    if m is None:
        raise BlockDevError(errno.EINVAL, f"malformed device {arg!r}: expected MAJ:MIN or a path")
    major, minor = int(m.group(1)), int(m.group(2))
    if major > _MAX_MAJOR or minor > _MAX_MINOR:
        raise BlockDevError(errno.EINVAL, f"device number {arg} is out of range")
    return major, minor


def resolve(
    arg: str,
    *,
    node_dir: str | None = None,
    allow_files: bool = False,
    sysfs_root: str = "/sys",
    dev_root: str = "/dev",
) -> BlockDevice:
    """Resolve a constructor's log-device argument (``MAJ:MIN`` or an absolute path)."""
    if arg.startswith("/"):
        return _resolve_path(arg, allow_files=allow_files, sysfs_root=sysfs_root)
    major, minor = parse_majmin(arg)
    return _resolve_number(
        major, minor, node_dir=node_dir, sysfs_root=sysfs_root, dev_root=dev_root
    )


def _resolve_path(path: str, *, allow_files: bool, sysfs_root: str) -> BlockDevice:
    try:
        st = os.stat(path)
    except OSError as e:
        raise BlockDevError(e.errno or errno.ENOENT, f"log device {path}: {e.strerror}") from e
    if stat.S_ISBLK(st.st_mode):
        major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
        size, lbs = _sysfs_geometry(sysfs_root, major, minor)
        return BlockDevice(path, major, minor, size, lbs)
    if allow_files and stat.S_ISREG(st.st_mode):
        return BlockDevice(path, 0, 0, st.st_size, max(st.st_blksize, 512))
    raise BlockDevError(errno.ENOTBLK, f"log device {path} is not a block device")


def _resolve_number(
    major: int, minor: int, *, node_dir: str | None, sysfs_root: str, dev_root: str
) -> BlockDevice:
    name = f"{major}:{minor}"
    sysdir = os.path.join(sysfs_root, "dev", "block", name)
    if not os.path.isdir(sysdir):
        raise BlockDevError(errno.ENOENT, f"no block device {name} (nothing at {sysdir})")
    size, lbs = _sysfs_geometry(sysfs_root, major, minor)
    rdev = os.makedev(major, minor)

    devname = _uevent_devname(sysdir) or os.path.basename(os.path.realpath(sysdir))
    candidate = os.path.join(dev_root, devname)
    if _is_node(candidate, rdev):
        return BlockDevice(candidate, major, minor, size, lbs)

    if node_dir is None:
        raise BlockDevError(
            errno.ENOENT,
            f"block device {name} ({devname}) has no node at {candidate} and no directory "
            "was given for a private node",
        )
    node = os.path.join(node_dir, f"blk-{major}-{minor}")
    if not _is_node(node, rdev):
        _make_node(node, rdev, name)
    return BlockDevice(node, major, minor, size, lbs, private_node=True)


def _is_node(path: str, rdev: int) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    return stat.S_ISBLK(st.st_mode) and st.st_rdev == rdev


def _make_node(node: str, rdev: int, name: str) -> None:
    tmp = f"{node}.tmp{os.getpid()}.{threading.get_ident()}"
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        os.mknod(tmp, stat.S_IFBLK | 0o600, rdev)
        os.replace(tmp, node)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise BlockDevError(
            e.errno or errno.EIO, f"cannot create a device node {node} for {name}: {e.strerror}"
        ) from e


def _uevent_devname(sysdir: str) -> str | None:
    try:
        with open(os.path.join(sysdir, "uevent"), encoding="utf-8", errors="replace") as f:
            for line in f:
                key, sep, value = line.rstrip("\n").partition("=")
                if sep and key == "DEVNAME" and value:
                    # DEVNAME is relative to /dev (it may contain a '/'); refuse escapes.
                    if value.startswith("/") or ".." in value.split("/"):
                        return None
                    return value
    except OSError:
        return None
    return None


def _read_int(path: str) -> int:
    with open(path, encoding="ascii") as f:
        return int(f.read().strip())


def _sysfs_geometry(sysfs_root: str, major: int, minor: int) -> tuple[int, int]:
    """(size in bytes, logical block size) of a block device, from sysfs."""
    name = f"{major}:{minor}"
    sysdir = os.path.realpath(os.path.join(sysfs_root, "dev", "block", name))
    try:
        size = _read_int(os.path.join(sysdir, "size")) * 512
        queue = os.path.join(sysdir, "queue")
        if not os.path.isdir(queue) and os.path.exists(os.path.join(sysdir, "partition")):
            queue = os.path.join(os.path.dirname(sysdir), "queue")
        lbs = _read_int(os.path.join(queue, "logical_block_size"))
    except FileNotFoundError as e:
        raise BlockDevError(
            errno.ENOENT, f"no block device {name} in sysfs ({e.filename} missing)"
        ) from e
    except OSError as e:
        raise BlockDevError(
            e.errno or errno.EIO, f"cannot read sysfs for block device {name}: {e}"
        ) from e
    except ValueError as e:
        raise BlockDevError(errno.EIO, f"unreadable sysfs geometry for {name}: {e}") from e
    return size, lbs
