"""The constructor grammar: what is accepted, and the errno of everything that is not."""

from __future__ import annotations

import contextlib
import errno

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ulogd.protocol import ctr
from ulogd.protocol.ctr import SyncMode


def test_clustered_core_as_the_kernel_sends_it() -> None:
    c = ctr.parse(b"131072 clustered-core 1024")
    assert (c.type_word, c.target_sectors, c.region_size, c.region_count) == (
        "clustered-core", 131072, 1024, 128,
    )  # fmt: skip
    assert c.sync is SyncMode.DEFAULT and not c.block_on_error and c.log_device is None
    assert c.clustered and not c.has_disk


def test_reconnect_string_with_nul_parses_the_same() -> None:
    assert ctr.parse(b"131072 clustered-core 1024\0") == ctr.parse(b"131072 clustered-core 1024")


def test_clustered_disk_with_majmin_and_keywords() -> None:
    c = ctr.parse(b"2097152 clustered-disk 253:3 1024 nosync block_on_error")
    assert c.log_device == "253:3" and c.has_disk
    assert c.sync is SyncMode.NOSYNC and c.block_on_error and c.region_count == 2048


def test_local_types_and_paths() -> None:
    assert ctr.parse(b"8 core 2 sync").sync is SyncMode.SYNC
    assert ctr.parse(b"8 disk /dev/loop2 4").log_device == "/dev/loop2"


def test_region_count_rounds_up() -> None:
    assert ctr.parse(b"1025 core 1024").region_count == 2


@pytest.mark.parametrize(
    ("text", "why"),
    [
        (b"", "too few"),
        (b"100 core", "too few"),
        (b"abc core 2", "not a decimal"),
        (b"0 core 2", "length is 0"),
        (b"100 mirror 2", "unknown log type"),
        (b"100 core 3", "power of two"),
        (b"100 core 1", "power of two"),
        (b"100 core 0", "power of two"),
        (b"100 core 128", "exceeds the target length"),
        (b"100 core 2 sync nosync", "more than one"),
        (b"100 core 2 block_on_error block_on_error", "twice"),
        (b"100 core 2 bogus", "unknown constructor argument"),
        (b"100 clustered-disk 253:3", "needs <log_dev> <region_size>"),
        (b"100 clustered-disk loop2 2", "not a path or MAJ:MIN"),
        (b"100 clustered-disk 25x:3 2", "not a path or MAJ:MIN"),
        (b"100 core \xff", "not ASCII"),
        (b"100 core 2\0junk", "NUL"),
        (b"%d core 2" % (2 * 2**33), "exceed the limit"),
    ],
)
def test_bad_constructors_fail_with_einval(text: bytes, why: str) -> None:
    with pytest.raises(ctr.CtrError, match=why) as info:
        ctr.parse(text)
    assert info.value.errno == errno.EINVAL and info.value.reply_error == -errno.EINVAL


@given(st.binary(max_size=340))
def test_parse_raises_only_ctr_error(data: bytes) -> None:
    with contextlib.suppress(ctr.CtrError):
        ctr.parse(data)
