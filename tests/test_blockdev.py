"""Tests for ulogd.edges.blockdev: resolving a constructor's log-device argument.

Most tests run against a fake sysfs tree built in tmp_path (``sysfs_root``) and a fake /dev
(``dev_root``) holding real device nodes made with mknod; nodes are never opened there, so the
device numbers need not exist. Tests on the real /sys and /dev use a loop device when one can
be attached.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ulogd.edges.blockdev import BlockDevError, BlockDevice, parse_majmin, resolve
from ulogd.state.disklog import DiskLogDevice

# ---------------------------------------------------------------------------------------------
# A fake sysfs


def add_disk(
    sysfs: Path,
    major: int,
    minor: int,
    name: str,
    *,
    sectors: int,
    lbs: int = 512,
    devname: str | None = "same",
    parent: Path | None = None,
) -> Path:
    """Create /sys/devices/.../<name> for a disk (or a partition of ``parent``) and the
    /sys/dev/block/MAJ:MIN symlink to it, like the kernel does."""
    base = parent if parent is not None else sysfs / "devices" / "virtual" / "block"
    devdir = base / name
    devdir.mkdir(parents=True)
    uevent = [f"MAJOR={major}", f"MINOR={minor}"]
    if devname is not None:
        uevent.append(f"DEVNAME={name if devname == 'same' else devname}")
    uevent.append("DEVTYPE=" + ("partition" if parent is not None else "disk"))
    (devdir / "uevent").write_text("\n".join(uevent) + "\n")
    (devdir / "size").write_text(f"{sectors}\n")
    if parent is None:
        (devdir / "queue").mkdir()
        (devdir / "queue" / "logical_block_size").write_text(f"{lbs}\n")
    else:
        (devdir / "partition").write_text("1\n")
    links = sysfs / "dev" / "block"
    links.mkdir(parents=True, exist_ok=True)
    (links / f"{major}:{minor}").symlink_to(os.path.relpath(devdir, links))
    return devdir


def mknod_or_skip(path: Path, major: int, minor: int) -> None:
    try:
        os.mknod(path, stat.S_IFBLK | 0o600, os.makedev(major, minor))
    except PermissionError as e:
        pytest.skip(f"mknod of block device nodes is not permitted here: {e}")


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path, Path]:
    sysfs, dev, run = tmp_path / "sys", tmp_path / "dev", tmp_path / "run"
    for d in (sysfs, dev, run):
        d.mkdir()
    add_disk(sysfs, 253, 3, "dm-3", sectors=2048, lbs=512)
    add_disk(sysfs, 259, 0, "nvme0n1", sectors=1 << 21, lbs=4096)
    disk = add_disk(sysfs, 8, 0, "sda", sectors=1 << 22, lbs=4096)
    add_disk(sysfs, 8, 1, "sda1", sectors=4096, parent=disk)
    return sysfs, dev, run


# ---------------------------------------------------------------------------------------------
# MAJ:MIN


@pytest.mark.parametrize(
    "arg",
    ["253", "253:", ":3", "a:b", "253:3:1", "-1:2", "253:-3", " 253:3", "253:3 ", "0x1:2",
     "4096:0", "253:1048576", "dev/sda", "", "253:3\n"],
)  # fmt: skip
def test_malformed_arguments_are_einval(arg: str, tree: tuple[Path, Path, Path]) -> None:
    sysfs, dev, run = tree
    with pytest.raises(BlockDevError) as exc:
        resolve(arg, sysfs_root=str(sysfs), dev_root=str(dev), node_dir=str(run))
    assert exc.value.errno == errno.EINVAL
    assert isinstance(exc.value, OSError)


def test_parse_majmin_limits() -> None:
    assert parse_majmin("253:3") == (253, 3)
    assert parse_majmin("4095:1048575") == (4095, 1048575)
    assert parse_majmin("007:01") == (7, 1)  # decimal, leading zeros allowed


def test_majmin_uses_dev_node_named_by_uevent(tree: tuple[Path, Path, Path]) -> None:
    sysfs, dev, run = tree
    mknod_or_skip(dev / "dm-3", 253, 3)
    bd = resolve("253:3", sysfs_root=str(sysfs), dev_root=str(dev), node_dir=str(run))
    assert bd == BlockDevice(str(dev / "dm-3"), 253, 3, 2048 * 512, 512, private_node=False)
    assert list(run.iterdir()) == []  # nothing created


def test_majmin_geometry_of_partition_from_parent_queue(tree: tuple[Path, Path, Path]) -> None:
    sysfs, dev, _ = tree
    mknod_or_skip(dev / "sda1", 8, 1)
    bd = resolve("8:1", sysfs_root=str(sysfs), dev_root=str(dev))
    assert (bd.path, bd.size_bytes, bd.logical_block_size) == (str(dev / "sda1"), 4096 * 512, 4096)


def test_majmin_devname_with_subdirectory(tmp_path: Path) -> None:
    sysfs, dev = tmp_path / "sys", tmp_path / "dev"
    add_disk(sysfs, 180, 0, "ub0", sectors=100, devname="bus/ub/0")
    (dev / "bus" / "ub").mkdir(parents=True)
    mknod_or_skip(dev / "bus" / "ub" / "0", 180, 0)
    bd = resolve("180:0", sysfs_root=str(sysfs), dev_root=str(dev))
    assert bd.path == str(dev / "bus" / "ub" / "0")


def test_majmin_unknown_device_is_enoent(tree: tuple[Path, Path, Path]) -> None:
    sysfs, dev, run = tree
    with pytest.raises(BlockDevError) as exc:
        resolve("253:4", sysfs_root=str(sysfs), dev_root=str(dev), node_dir=str(run))
    assert exc.value.errno == errno.ENOENT and "253:4" in str(exc.value)
    assert list(run.iterdir()) == []


def test_majmin_without_node_and_without_node_dir_is_enoent(
    tree: tuple[Path, Path, Path],
) -> None:
    sysfs, dev, _ = tree
    with pytest.raises(BlockDevError) as exc:
        resolve("253:3", sysfs_root=str(sysfs), dev_root=str(dev))
    assert exc.value.errno == errno.ENOENT and "dm-3" in str(exc.value)


def test_majmin_mknod_fallback(tree: tuple[Path, Path, Path]) -> None:
    sysfs, dev, run = tree
    # /dev has no dm-3 node: a private node is made in the run directory
    try:
        bd = resolve("253:3", sysfs_root=str(sysfs), dev_root=str(dev), node_dir=str(run))
    except BlockDevError as e:
        if e.errno == errno.EPERM:
            pytest.skip(f"mknod of block device nodes is not permitted here: {e}")
        raise
    assert bd.private_node and bd.path == str(run / "blk-253-3")
    assert (bd.major, bd.minor, bd.size_bytes, bd.logical_block_size) == (253, 3, 1 << 20, 512)
    st = os.stat(bd.path)
    assert stat.S_ISBLK(st.st_mode) and st.st_rdev == os.makedev(253, 3)
    assert stat.S_IMODE(st.st_mode) == 0o600
    # resolved again: the node is reused, not recreated
    again = resolve("253:3", sysfs_root=str(sysfs), dev_root=str(dev), node_dir=str(run))
    assert again == bd and os.stat(again.path).st_ino == st.st_ino
    assert sorted(p.name for p in run.iterdir()) == ["blk-253-3"]  # no temporary left


def test_majmin_wrong_nodes_are_not_trusted(tree: tuple[Path, Path, Path]) -> None:
    sysfs, dev, run = tree
    mknod_or_skip(dev / "dm-3", 253, 99)  # stale /dev node with another number
    mknod_or_skip(run / "blk-253-3", 1, 1)  # stale private node
    bd = resolve("253:3", sysfs_root=str(sysfs), dev_root=str(dev), node_dir=str(run))
    assert bd.path == str(run / "blk-253-3") and bd.private_node
    assert os.stat(bd.path).st_rdev == os.makedev(253, 3)  # replaced


def test_majmin_regular_file_named_like_the_device_is_not_used(
    tree: tuple[Path, Path, Path],
) -> None:
    sysfs, dev, run = tree
    (dev / "dm-3").write_text("not a device")
    bd = resolve("253:3", sysfs_root=str(sysfs), dev_root=str(dev), node_dir=str(run))
    assert bd.private_node


def test_majmin_devname_escaping_dev_is_ignored(tmp_path: Path) -> None:
    sysfs, dev, run = tmp_path / "sys", tmp_path / "dev", tmp_path / "run"
    dev.mkdir()
    run.mkdir()
    add_disk(sysfs, 7, 5, "loop5", sectors=8, devname="../run/evil")
    mknod_or_skip(run / "evil", 7, 5)
    bd = resolve("7:5", sysfs_root=str(sysfs), dev_root=str(dev), node_dir=str(run))
    # the sysfs directory name is used instead, and /dev has no loop5: a private node
    assert bd.path == str(run / "blk-7-5")


def test_majmin_missing_devname_uses_sysfs_name(tmp_path: Path) -> None:
    sysfs, dev = tmp_path / "sys", tmp_path / "dev"
    dev.mkdir()
    add_disk(sysfs, 7, 6, "loop6", sectors=8, devname=None)
    mknod_or_skip(dev / "loop6", 7, 6)
    assert resolve("7:6", sysfs_root=str(sysfs), dev_root=str(dev)).path == str(dev / "loop6")


def test_mknod_failure_reports_errno(tree: tuple[Path, Path, Path]) -> None:
    sysfs, dev, run = tree
    with pytest.raises(BlockDevError) as exc:
        resolve("253:3", sysfs_root=str(sysfs), dev_root=str(dev), node_dir=str(run / "nope"))
    assert exc.value.errno == errno.ENOENT and "nope" in str(exc.value)


def test_broken_sysfs_geometry(tmp_path: Path) -> None:
    sysfs = tmp_path / "sys"
    devdir = add_disk(sysfs, 7, 7, "loop7", sectors=8)
    (devdir / "queue" / "logical_block_size").unlink()
    with pytest.raises(BlockDevError) as exc:
        resolve("7:7", sysfs_root=str(sysfs), dev_root=str(tmp_path))
    assert exc.value.errno == errno.ENOENT
    (devdir / "queue" / "logical_block_size").write_text("garbage\n")
    with pytest.raises(BlockDevError) as exc:
        resolve("7:7", sysfs_root=str(sysfs), dev_root=str(tmp_path))
    assert exc.value.errno == errno.EIO


# ---------------------------------------------------------------------------------------------
# Paths


def test_path_to_block_node(tree: tuple[Path, Path, Path], tmp_path: Path) -> None:
    sysfs, dev, _ = tree
    mknod_or_skip(dev / "nvme0n1", 259, 0)
    link = tmp_path / "by-id-link"
    link.symlink_to(dev / "nvme0n1")
    for arg in (str(dev / "nvme0n1"), str(link)):
        bd = resolve(arg, sysfs_root=str(sysfs))
        assert bd == BlockDevice(arg, 259, 0, (1 << 21) * 512, 4096)


def test_path_errors(tree: tuple[Path, Path, Path], tmp_path: Path) -> None:
    sysfs, dev, _ = tree
    with pytest.raises(BlockDevError) as exc:
        resolve(str(tmp_path / "missing"), sysfs_root=str(sysfs))
    assert exc.value.errno == errno.ENOENT and "missing" in str(exc.value)
    with pytest.raises(BlockDevError) as exc:
        resolve(str(tmp_path), sysfs_root=str(sysfs))
    assert exc.value.errno == errno.ENOTBLK
    with pytest.raises(BlockDevError) as exc:
        resolve("/dev/null", sysfs_root=str(sysfs))
    assert exc.value.errno == errno.ENOTBLK
    image = tmp_path / "log.img"
    image.write_bytes(bytes(8192))
    with pytest.raises(BlockDevError) as exc:
        resolve(str(image), sysfs_root=str(sysfs))  # files only on request
    assert exc.value.errno == errno.ENOTBLK
    mknod_or_skip(dev / "ghost", 253, 77)  # a node for a device the kernel does not have
    with pytest.raises(BlockDevError) as exc:
        resolve(str(dev / "ghost"), sysfs_root=str(sysfs))
    assert exc.value.errno == errno.ENOENT


def test_path_to_regular_file_when_allowed(tmp_path: Path) -> None:
    image = tmp_path / "log.img"
    image.write_bytes(bytes(8192))
    bd = resolve(str(image), allow_files=True)
    assert (bd.path, bd.major, bd.minor, bd.size_bytes) == (str(image), 0, 0, 8192)
    assert bd.logical_block_size >= 512 and not bd.private_node


# ---------------------------------------------------------------------------------------------
# The real /sys and /dev, with a loop device


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[str]:
    if shutil.which("losetup") is None:
        pytest.skip("losetup is not installed")
    backing = tmp_path / "backing.img"
    with open(backing, "wb") as f:
        f.truncate(1 << 20)
    proc = subprocess.run(
        ["losetup", "-f", "--show", "--sector-size", "4096", str(backing)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot attach a loop device here: {proc.stderr.strip()}")
    node = proc.stdout.strip()
    try:
        yield node
    finally:
        subprocess.run(["losetup", "-d", node], check=False)


def test_real_loop_device_by_path_and_number(loop_device: str, tmp_path: Path) -> None:
    st = os.stat(loop_device)
    major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
    by_path = resolve(loop_device)
    assert by_path == BlockDevice(loop_device, major, minor, 1 << 20, 4096)
    by_number = resolve(f"{major}:{minor}")
    assert by_number == by_path  # /dev/loopN named by the real uevent

    # no usable /dev: the private node is made, and it really opens the same device
    run = tmp_path / "run"
    run.mkdir()
    private = resolve(f"{major}:{minor}", dev_root=str(tmp_path / "empty"), node_dir=str(run))
    assert private.private_node and private.path == str(run / f"blk-{major}-{minor}")
    with DiskLogDevice.open(private.path) as dev:
        assert dev.rdev == (major, minor)
        assert (dev.size_bytes, dev.block_size) == (private.size_bytes, 4096)
