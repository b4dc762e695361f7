"""``dm-ulogd table``: mirror table lines with a userspace log, checked word by word against the
lines that a real kernel accepted (``shared/reference/kernel-in-qemu.md``, "Table syntax that
worked"), and ``--create`` through a stand-in dmsetup."""

from __future__ import annotations

import argparse
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from ulogd.ops import tablegen
from ulogd.ops.tablegen import Leg, MirrorSpec, TableError
from ulogd.protocol import ctr

LEGS = (Leg("/dev/loop0"), Leg("/dev/loop1"))


def spec(**kw: object) -> MirrorSpec:
    base: dict[str, object] = dict(
        legs=LEGS, sectors=131072, log_type="clustered-core", region_size=1024, uuid="UUID"
    )
    base.update(kw)
    return MirrorSpec(**base)  # type: ignore[arg-type]


# The three lines that worked under a real 6.1 kernel, with <uuid> = UUID.
KERNEL_ACCEPTED = [
    (
        spec(handle_errors=True),
        "0 131072 mirror userspace 3 UUID clustered-core 1024 2 /dev/loop0 0 /dev/loop1 0 "
        "1 handle_errors",
    ),
    (
        spec(handle_errors=True, integrated_flush=True),
        "0 131072 mirror userspace 4 UUID integrated_flush clustered-core 1024 2 /dev/loop0 0 "
        "/dev/loop1 0 1 handle_errors",
    ),
    (
        spec(log_type="clustered-disk", log_device="/dev/loop2", sync="nosync"),
        "0 131072 mirror userspace 5 UUID clustered-disk /dev/loop2 1024 nosync 2 /dev/loop0 0 "
        "/dev/loop1 0",
    ),
]


@pytest.mark.parametrize(("mirror", "line"), KERNEL_ACCEPTED)
def test_lines_the_kernel_accepted(mirror: MirrorSpec, line: str) -> None:
    assert tablegen.build(mirror) == line


@pytest.mark.parametrize(
    ("mirror", "line"),
    [
        (
            spec(log_type="disk", log_device="253:7", sync="sync", block_on_error=True,
                 keep_log=True, handle_errors=True, integrated_flush=True,
                 legs=(Leg("/dev/a", 2048), Leg("/dev/b"), Leg("8:16"))),
            "0 131072 mirror userspace 7 UUID integrated_flush disk 253:7 1024 sync "
            "block_on_error 3 /dev/a 2048 /dev/b 0 8:16 0 2 handle_errors keep_log",
        ),
        (
            spec(log_type="core", region_size=2048),
            "0 131072 mirror userspace 3 UUID core 2048 2 /dev/loop0 0 /dev/loop1 0",
        ),
        (
            spec(keep_log=True, block_on_error=True),
            "0 131072 mirror userspace 4 UUID clustered-core 1024 block_on_error 2 "
            "/dev/loop0 0 /dev/loop1 0 1 keep_log",
        ),
    ],
)  # fmt: skip
def test_option_combinations(mirror: MirrorSpec, line: str) -> None:
    assert tablegen.build(mirror) == line


@pytest.mark.parametrize(
    "mirror",
    [m for m, _ in KERNEL_ACCEPTED]
    + [spec(log_type="disk", log_device="/dev/x", integrated_flush=True, block_on_error=True)],
)
def test_count_and_what_the_daemon_receives(mirror: MirrorSpec) -> None:
    words = tablegen.build(mirror).split()
    n = int(words[4])
    log_args = words[5 : 5 + n]
    assert log_args[0] == mirror.uuid
    assert words[5 + n] == str(len(mirror.legs))  # the count ends right before #legs
    # The kernel sends the daemon "<sectors> <args after uuid, without integrated_flush>".
    sent = " ".join([words[1], *(a for a in log_args[1:] if a != "integrated_flush")])
    config = ctr.parse(sent.encode())
    assert config.type_word == mirror.log_type
    assert config.region_size == mirror.region_size
    assert config.log_device == mirror.log_device


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (dict(legs=(Leg("/dev/a"),)), "2 to 9 legs"),
        (dict(legs=tuple(Leg(f"/dev/l{i}") for i in range(10))), "2 to 9 legs"),
        (dict(log_type="clustered-disk"), "needs --log-device"),
        (dict(log_device="/dev/x"), "keeps its log in memory"),
        (dict(region_size=1000), "not a power of two"),
        (dict(region_size=262144), "exceeds the target length"),
        (dict(log_type="mirror"), "unknown log type"),
        (dict(uuid="has space"), "without blanks"),
        (dict(log_type="disk", log_device="sdb"), "not a path or MAJ:MIN"),
    ],
)
def test_refusals(kw: dict[str, object], message: str) -> None:
    with pytest.raises(TableError, match=message):
        tablegen.build(spec(**kw))


@pytest.mark.parametrize(
    ("text", "sectors"),
    [("131072", 131072), ("131072s", 131072), ("64M", 131072), ("64MiB", 131072),
     ("512K", 1024), ("1G", 2097152), ("1.5k", 3), ("2t", 2**32)],
)  # fmt: skip
def test_sizes(text: str, sectors: int) -> None:
    assert tablegen.parse_size(text) == sectors


@pytest.mark.parametrize("text", ["0", "1.3k", "-5", "12x", ""])
def test_bad_sizes(text: str) -> None:
    with pytest.raises(TableError):
        tablegen.parse_size(text)


def test_leg_parsing() -> None:
    assert Leg.parse("/dev/sdb1") == Leg("/dev/sdb1", 0)
    assert Leg.parse("/dev/sdb1:2048") == Leg("/dev/sdb1", 2048)
    assert Leg.parse("253:5") == Leg("253:5", 0)
    assert Leg.parse("253:5:8") == Leg("253:5", 8)


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ulogd", "table", *args], capture_output=True, text=True, timeout=60
    )


def test_cli_size_from_smallest_leg(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"\0" * (64 << 20 >> 4))  # 4 MiB = 8192 sectors
    b.write_bytes(b"\0" * (8 << 20))  # 16384 sectors
    result = run(str(a), f"{b}:1024", "--uuid", "U", "-r", "1024", "--nosync")
    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        f"0 8192 mirror userspace 4 U clustered-core 1024 nosync 2 {a} 0 {b} 1024\n"
    )


def test_cli_refusal_is_one_sentence() -> None:
    result = run("/dev/nonexistent-a", "/dev/nonexistent-b")
    assert result.returncode == 2
    assert "give --size" in result.stderr and "Traceback" not in result.stderr


def test_cli_create_runs_dmsetup(tmp_path: Path) -> None:
    fake = tmp_path / "dmsetup"
    record = tmp_path / "argv"
    fake.write_text(f'#!/bin/sh\nfor a in "$@"; do echo "$a"; done > {record}\nexit 0\n')
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    result = run(
        "/dev/loop0", "/dev/loop1", "--size", "64M", "-t", "clustered-disk", "-l", "/dev/loop2",
        "--integrated-flush", "--handle-errors", "--create", "mirr", "--dmsetup", str(fake),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    argv = record.read_text().splitlines()
    assert argv == [
        "create",
        "mirr",
        "--table",
        "0 131072 mirror userspace 5 ulogd-mirr integrated_flush clustered-disk /dev/loop2 1024 "
        "2 /dev/loop0 0 /dev/loop1 0 1 handle_errors",
    ]


def test_cli_create_reports_dmsetup_failure(tmp_path: Path) -> None:
    fake = tmp_path / "dmsetup"
    fake.write_text("#!/bin/sh\necho 'device-mapper: reload ioctl failed' >&2\nexit 1\n")
    fake.chmod(0o755)
    result = run("/dev/a", "/dev/b", "-s", "1M", "--create", "x", "--dmsetup", str(fake))
    assert result.returncode == 1
    assert "dm-log-userspace" in result.stderr



def test_maj_min_legs_sized_from_sysfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for dev, size in (("7:0", "131072\n"), ("7:1", "262144\n")):
        (tmp_path / dev).mkdir()
        (tmp_path / dev / "size").write_text(size)
    monkeypatch.setattr(tablegen, "SYS_DEV_BLOCK", str(tmp_path))
    args = build_args("7:0", "7:1:2048", "--uuid", "U")
    assert tablegen.spec_from_args(args).sectors == 131072  # 7:1 less 2048 is larger
    args = build_args("7:0", "7:2", "--uuid", "U")
    with pytest.raises(TableError, match=r"leg 7:2 \(No such file or directory\): give --size"):
        tablegen.spec_from_args(args)


def build_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    tablegen.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_cli_maj_min_leg_of_this_machine() -> None:
    """The real /sys/dev/block: a MAJ:MIN leg's size is the kernel's."""
    sized = [
        d.name for d in sorted(Path("/sys/dev/block").glob("*:*"))
        if int((d / "size").read_text()) >= 4096
    ]  # fmt: skip
    if not sized:
        pytest.skip("no block device of 2 MiB or more on this machine")
    dev = sized[0]
    sectors = int((Path("/sys/dev/block") / dev / "size").read_text())
    result = run(dev, dev, "--uuid", "U", "-r", "8")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"0 {sectors} mirror userspace 3 U clustered-core 8 2 {dev} 0")
