"""Regression tests for defects found by the fuzzing campaign (fuzz/README.rst)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from ulogd.engine.server import Server
from ulogd.state import disklog
from ulogd.state.statefile import StateDir
from ulogd.testing.driver import InProcess, LogDriver


def _opener(rdev: tuple[int, int] | None) -> object:
    def open_device(_path: str) -> disklog.MemoryDiskLog:
        return disklog.MemoryDiskLog(1 << 20, rdev=rdev)

    return open_device


LONG = "/dev/disk/by-id/" + "x" * 120  # 136 bytes: more than the kernel's 128-byte buffer


def test_ctr_with_a_device_path_longer_than_the_reply_buffer_answers_maj_min() -> None:
    # Found by fuzz/fuzz_server.py: CTR "131072 disk /dev/<130 x> 1024" (protocol 3) made
    # Server.receive raise ValueError ("CTR reply of 136 bytes exceeds the kernel's
    # 128-byte buffer") instead of answering.
    server = Server(open_device=_opener((253, 7)))  # type: ignore[arg-type]
    d = LogDriver(InProcess(server))
    reply = d.ctr(f"131072 disk {LONG} 1024")
    assert (reply.error, reply.data) == (0, b"253:7\0")
    again = d.ctr(f"131072 disk {LONG} 1024")  # a repeated CTR is answered the same way
    assert (again.error, again.data) == (0, b"253:7\0")


def test_ctr_with_an_unnameable_long_device_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    server = Server(state_dir=state, open_device=_opener(None))  # type: ignore[arg-type]
    d = LogDriver(InProcess(server))
    reply = d.ctr(f"131072 clustered-disk {LONG} 1024")
    assert reply.error == -errno.ENAMETOOLONG
    assert server.logs == {}
    assert list(tmp_path.iterdir()) == []
    # protocol 1 takes no device name in the reply: accepted
    d1 = LogDriver(InProcess(server), version=1)
    assert d1.ctr(f"131072 disk {LONG} 1024").error == 0


def _valid_group() -> tuple[object, object]:
    from ulogd.cluster import group as g
    from ulogd.protocol import ctr
    from ulogd.state.regionlog import RegionLog, new_bitmaps

    config = ctr.parse(b"1024 clustered-core 8")
    rl = RegionLog(config, *new_bitmaps(config), local_node=1)
    grp = g.Group(rl, (1, 100))
    grp.confchg([(1, 100)], [], [(1, 100)])
    assert grp.phase is g.Phase.VALID
    return grp, rl


def test_ops_message_with_a_short_set_sync_op_is_dropped_not_raised() -> None:
    # Found by fuzz/fuzz_messages.py: an OPS body "05 00 00 00 00 00 00 00" (SET_SYNC, 0
    # values) with valid CRCs decoded fine, and Group.deliver then raised IndexError on
    # values[0] (the same for REMOTE_RECOVERING without its region).
    import struct
    import zlib

    from ulogd.cluster import messages as m

    for body in (struct.pack("<BBHI", 5, 0, 0, 0), struct.pack("<BBHIQ", 5, 0, 1, 0, 3),
                 struct.pack("<BBHI", 6, 0, 0, 0)):  # fmt: skip
        first = struct.pack("<IHHIII", m.MAGIC, m.VERSION, m.Kind.OPS, 24 + len(body),
                            zlib.crc32(body), 0)  # fmt: skip
        data = first + struct.pack("<I", zlib.crc32(first)) + body
        with pytest.raises(m.MessageError, match="values"):
            m.decode(data)
        grp, _rl = _valid_group()
        assert grp.deliver((1, 100), data) == []  # type: ignore[attr-defined]
        assert grp.dropped == 1  # type: ignore[attr-defined]


def test_disk_workers_of_removed_logs_exit(tmp_path: Path) -> None:
    # Found by the soak (tests/hardening/test_soak.py): the daemon started one I/O thread per
    # log device ever opened and never stopped it, so every create/remove or reload of a disk
    # log left a thread behind (146 threads after 300 life cycles, RSS +9 KiB per cycle,
    # until thread creation fails).  Workers of devices no log uses are now retired, and the
    # disk metrics (counters) keep what they counted.
    import re
    import shutil
    import urllib.request

    from tests.hardening.test_soak import Soak

    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("needs root and losetup: the daemon takes block devices only")
    soak = Soak(tmp_path)
    proc = soak.start()
    try:
        soak.setup()

        def threads() -> int:
            text = Path(f"/proc/{proc.pid}/status").read_text()
            return int(re.search(r"Threads:\s+(\d+)", text).group(1))  # type: ignore[union-attr]

        def flushes() -> float:
            url = f"http://127.0.0.1:{soak.port}/metrics"
            with urllib.request.urlopen(url, timeout=5) as r:
                text = r.read().decode()
            return float(re.search(r"^ulogd_disk_flushes_total (\S+)", text, re.M).group(1))  # type: ignore[union-attr]

        before = threads()
        counted = []
        for i in range(40):
            soak.life_cycle()
            if i % 10 == 9:
                counted.append(flushes())
        assert threads() <= before + 2, f"{threads()} threads, {before} before"
        assert counted == sorted(counted) and counted[-1] > counted[0], counted
    finally:
        proc.terminate()
        proc.wait(timeout=15)
        soak.close()


CHECKPOINT_CRASH = bytes.fromhex(
    "e61a15e6e6e6e6ffffffffff01ff5be6e6e60000000000000000000012e6e600"
    "ffffffffffffff35e6e60000000000000000000000"
)


def test_snapshot_with_a_held_clean_region_is_refused() -> None:
    # Found by fuzz/fuzz_checkpoint.py (input above: a framed snapshot whose holder list names
    # region 0 while its clean bit is set): checkpoint.restore accepted states no replica can
    # be in (held or out-of-sync regions clean, recovery/search positions outside the log),
    # which would have answered IS_CLEAN = 1 for a region being written.
    import struct
    import zlib

    from fuzz import targets
    from ulogd.cluster import checkpoint as ck
    from ulogd.protocol import ctr
    from ulogd.state.regionlog import RegionLog, new_bitmaps

    targets.check_checkpoint(CHECKPOINT_CRASH)  # restore refuses it, untouched
    config = ctr.parse(b"1024 clustered-core 8 nosync")  # 128 regions, all clean
    rl = RegionLog(config, *new_bitmaps(config), local_node=1)
    blob = ck.snapshot(rl, ck.GroupBook(1, ((1, 10),), ()))
    raw = zlib.decompress(blob)
    head = struct.Struct("<4sIQQQqqIIIIIIIQI")
    fields = list(head.unpack_from(raw))
    body = raw[head.size :]
    nbytes = 16  # bytes per bitmap of 128 regions

    def forge(new_body: bytes, **changes: int) -> bytes:
        f = list(fields)
        for name, value in changes.items():
            f[{"nholders": 8, "recovering": 6, "search": 5}[name]] = value
        f[14], f[15] = len(new_body), zlib.crc32(new_body)
        return zlib.compress(head.pack(*f) + new_body)

    holder = struct.pack("<QHI", 3, 1, 2)  # region 3 held by node 2: clean in the bitmaps
    out_of_sync = bytes([0xFF] * nbytes) + bytes(nbytes) + body[2 * nbytes :]  # clean, !sync
    for forged in (
        forge(body[: 2 * nbytes] + holder + body[2 * nbytes :], nholders=1),
        forge(body, recovering=128),
        forge(body, search=-4),
        forge(out_of_sync),
    ):
        target = RegionLog(config, *new_bitmaps(config), local_node=1)
        with pytest.raises(ck.CheckpointError, match="inconsistent"):
            ck.restore(target, forged)
    assert ck.restore(RegionLog(config, *new_bitmaps(config), local_node=1), blob).index == 1


def test_state_file_save_counter_at_its_maximum_wraps(tmp_path: Path) -> None:
    # Found by fuzz/fuzz_statefile.py (crash 0935d098: a state file whose u64 save counter
    # read 2**64 - 1): the first request that saved scalars raised struct.error from
    # Server.receive (a dead daemon) instead of answering.
    import struct

    from ulogd.protocol.spec import RequestType as T
    from ulogd.state import statefile

    state_dir = StateDir(tmp_path)
    state = state_dir.create("LVM-wrap", 0x10, 128, 8, "1024 core 8")
    state.close()
    with open(state.path, "r+b") as fh:
        fh.seek(statefile._SCALARS_AT + struct.calcsize("=QqiI"))
        fh.write(struct.pack("=Q", 2**64 - 1))
    server = Server(state_dir=state_dir)
    server.restore(state_dir.load_all())
    d = LogDriver(InProcess(server), uuid="LVM-wrap", luid=0x10)
    try:
        assert d.call(T.RESUME).error == 0
        assert d.call(T.PRESUSPEND).error == 0
    finally:
        server.close()
