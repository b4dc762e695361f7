"""State files: layout, restoration, and refusal of damaged files."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import stat
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as hs

from ulogd.engine.actions import Send
from ulogd.engine.server import Server
from ulogd.protocol import wire
from ulogd.protocol.spec import RequestType as T
from ulogd.state import statefile
from ulogd.state.regionlog import Scalars, scalars_problem
from ulogd.state.statefile import HEADER_SIZE, StateDir, file_name, import_previous


def test_bits_written_through_the_mapping_are_in_the_file(tmp_path: Path) -> None:
    sd = StateDir(tmp_path)
    st = sd.create("LVM-a", 7, 100, 8, "800 core 8")
    st.clean[3] = 1
    st.sync[99] = 1
    raw = st.path.read_bytes()  # no close, no flush call: what a crash would leave
    assert raw[HEADER_SIZE] == 0b1000
    assert raw[HEADER_SIZE + 16 + 99 // 8] == 1 << (99 % 8)
    assert stat.S_IMODE(st.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o700


def test_scalars_and_identity_round_trip(tmp_path: Path) -> None:
    sd = StateDir(tmp_path)
    st = sd.create("LVM-b/odd name", 2**63, 5, 2, "10 core 2 nosync")
    s = Scalars(4, 3, 3, True, False, True, True, False)
    st.save_scalars(s)
    (loaded,) = StateDir(tmp_path).load_all()
    assert loaded.identity.uuid == "LVM-b/odd name" and loaded.identity.luid == 2**63
    assert loaded.identity.ctr_text == "10 core 2 nosync"
    assert loaded.load_scalars() == s


def test_each_flag_round_trips_alone(tmp_path: Path) -> None:
    """Every boolean scalar has its own bit: set alone, it comes back alone."""
    sd = StateDir(tmp_path)
    st = sd.create("LVM-c", 1, 5, 2, "10 core 2")
    for i in range(5):
        flags = [k == i for k in range(5)]
        s = Scalars(1, -1, 0, *flags)
        st.save_scalars(s)
        assert st.load_scalars() == s, flags


def test_damaged_files_are_moved_aside_not_used(tmp_path: Path) -> None:
    sd = StateDir(tmp_path)
    good = sd.create("LVM-good", 1, 10, 2, "20 core 2")
    bad = sd.create("LVM-bad", 1, 10, 2, "20 core 2")
    with open(bad.path, "r+b") as f:
        f.write(b"garbage!")
    short = tmp_path / "short@0000000000000001.state"
    short.write_bytes(b"x" * 100)
    (tmp_path / "half.state.new").write_bytes(b"partial")
    loaded = StateDir(tmp_path).load_all()
    assert [s.identity.uuid for s in loaded] == ["LVM-good"]
    assert bad.path.with_suffix(".corrupt").exists() and short.with_suffix(".corrupt").exists()
    assert not (tmp_path / "half.state.new").exists()
    good.close()


def test_remove_deletes_the_file(tmp_path: Path) -> None:
    st = StateDir(tmp_path).create("LVM-c", 1, 10, 2, "20 core 2")
    st.remove()
    assert not st.path.exists()


def test_state_of_the_old_run_directory_is_imported_once(tmp_path: Path) -> None:
    """An upgrade from ulogd 0.1.0 (/run/ulogd) while mirrors stay loaded: the first start
    under the new name continues from the old state files; later starts never look again."""
    old, new = tmp_path / "run-ulogd/logs", tmp_path / "run-dm-ulogd/logs"
    st = StateDir(old).create("LVM-up", 9, 100, 8, "800 core 8")
    st.clean[3] = st.sync[3] = st.sync[99] = 1
    st.save_scalars(Scalars(4, -1, 0, True, False, False, False, False))
    st.close()
    assert import_previous(old, new) == 1
    (loaded,) = StateDir(new).load_all()
    assert loaded.identity.uuid == "LVM-up" and loaded.identity.ctr_text == "800 core 8"
    assert [i for i in range(100) if loaded.clean[i]] == [3]
    assert [i for i in range(100) if loaded.sync[i]] == [3, 99]
    assert loaded.load_scalars().resumed
    assert stat.S_IMODE(loaded.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(new.stat().st_mode) == 0o700
    loaded.close()
    assert [p.name for p in old.glob("*.state")] == [file_name("LVM-up", 9)]  # only read
    assert import_previous(old, new) == 0  # the new directory exists: never again
    assert not new.with_name("logs.import").exists()


def test_no_import_while_the_old_daemon_runs(tmp_path: Path) -> None:
    old, new = tmp_path / "run-ulogd/logs", tmp_path / "run-dm-ulogd/logs"
    StateDir(old).create("LVM-up", 9, 100, 8, "800 core 8").close()
    fd = os.open(old.parent / "ulogd.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # what a running 0.1.0 daemon holds
        with pytest.raises(RuntimeError, match="still serves from"):
            import_previous(old, new)
        assert not new.exists()
    finally:
        os.close(fd)
    assert import_previous(old, new) == 1  # stopped: imported


def test_nothing_to_import(tmp_path: Path) -> None:
    assert import_previous(tmp_path / "absent", tmp_path / "new") == 0
    (tmp_path / "empty").mkdir()
    assert import_previous(tmp_path / "empty", tmp_path / "new") == 0
    assert not (tmp_path / "new").exists()


# ---------------------------------------------------------------------------------- identity

COLLIDING = ("+" * 60 + "A" + "+" * 68, "+" * 60 + "B" + "+" * 68)  # from issue 14


def test_uuids_sharing_their_ends_get_distinct_files_and_both_restore(tmp_path: Path) -> None:
    sd = StateDir(tmp_path)
    a = sd.create(COLLIDING[0], 1, 64, 8, "512 core 8")
    b = sd.create(COLLIDING[1], 1, 64, 8, "512 core 8")
    a.sync[5] = 1
    b.sync[9] = 1
    assert a.path != b.path
    a.close()
    b.close()
    loaded = {s.identity.uuid: s for s in StateDir(tmp_path).load_all()}
    assert set(loaded) == set(COLLIDING)
    assert list(loaded[COLLIDING[0]].sync.search(1)) == [5]
    assert list(loaded[COLLIDING[1]].sync.search(1)) == [9]


def test_same_uuid_other_luid_is_another_file(tmp_path: Path) -> None:
    sd = StateDir(tmp_path)
    assert (
        sd.create("LVM-x", 1, 64, 8, "512 core 8").path
        != sd.create("LVM-x", 2, 64, 8, "512 core 8").path
    )
    assert len(StateDir(tmp_path).load_all()) == 2


def test_a_file_whose_name_is_not_its_identity_is_set_aside(tmp_path: Path) -> None:
    sd = StateDir(tmp_path)
    st = sd.create("LVM-one", 1, 64, 8, "512 core 8")
    st.close()
    moved = tmp_path / file_name("LVM-other", 1)
    st.path.rename(moved)
    assert StateDir(tmp_path).load_all() == []
    assert moved.with_suffix(".corrupt").exists()


def test_the_longest_uuid_of_any_bytes_round_trips(tmp_path: Path) -> None:
    """What the kernel can send: DM_UUID_LEN (129) bytes with no NUL, each one not ASCII;
    wire names it with every byte escaped (4 characters each)."""
    raw = bytes(0x80 + i % 128 for i in range(129))
    uuid = wire._uuid_text(raw)
    assert len(uuid) == 4 * 129
    st = StateDir(tmp_path).create(uuid, 3, 64, 8, "512 core 8")
    st.close()
    (loaded,) = StateDir(tmp_path).load_all()
    assert loaded.identity.uuid == uuid


def test_a_log_with_a_non_ascii_uuid_is_restored_by_the_next_server(tmp_path: Path) -> None:
    raw = b"LVM-\xff\xfe" + b"\xc3" * 122  # 128 bytes then the NUL
    layout = wire.CURRENT
    at = layout.offsets["uuid"]

    def datagram(rtype: int, data: bytes = b"", seq: int = 1) -> bytes:
        d = bytearray(wire.encode_request(rtype, uuid="x", luid=9, seq=seq, data=data))
        d[at : at + 129] = raw.ljust(129, b"\0")
        return bytes(d)

    def ask(server: Server, rtype: int, data: bytes = b"") -> wire.Reply:
        (send,) = server.receive(datagram(rtype, data))
        assert isinstance(send, Send)
        return wire.decode_reply(send.data)

    first = Server(state_dir=StateDir(tmp_path))
    assert ask(first, T.CTR, b"512 core 8\0").error == 0
    assert ask(first, T.RESUME).error == 0
    assert ask(first, T.MARK_REGION, struct.pack("=Q", 7)).error == 0
    # kill -9: nothing is closed
    second = Server(state_dir=StateDir(tmp_path))
    second.restore(second.state_dir.load_all())  # type: ignore[union-attr]
    assert list(tmp_path.glob("*.corrupt")) == []
    assert ask(second, T.IS_CLEAN, struct.pack("=Q", 7)).data == struct.pack("=q", 0)
    assert ask(second, T.IS_CLEAN, struct.pack("=Q", 8)).error == 0
    second.close()
    first.close()


# ---------------------------------------------------------------------------------- contents


def _doctor(path: Path, fmt: str, offset: int, *values: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(struct.pack(fmt, *values))


@pytest.mark.parametrize(
    ("field", "fmt", "offset", "value"),
    [
        ("recovering", "=q", statefile._SCALARS_AT + 8, 2**40),
        ("recovering", "=q", statefile._SCALARS_AT + 8, -2),
        ("sync_search", "=Q", statefile._SCALARS_AT, 2**40),
        ("recoverer", "=i", statefile._SCALARS_AT + 16, -7),
        ("flags", "=I", statefile._SCALARS_AT + 20, 1 << 9),
    ],
)
def test_a_scalar_out_of_range_sets_the_file_aside(
    tmp_path: Path, field: str, fmt: str, offset: int, value: int
) -> None:
    sd = StateDir(tmp_path)
    good = sd.create("LVM-good", 1, 100, 8, "800 core 8")
    bad = sd.create("LVM-bad", 1, 100, 8, "800 core 8")
    bad.save_scalars(Scalars(3, 2, 0, True, False, False, False, False))
    bad.close()
    _doctor(bad.path, fmt, offset, value)
    loaded = StateDir(tmp_path).load_all()
    assert [s.identity.uuid for s in loaded] == ["LVM-good"], field
    assert bad.path.with_suffix(".corrupt").exists()
    good.close()


def test_scalars_at_the_edges_of_the_geometry_are_kept(tmp_path: Path) -> None:
    st = StateDir(tmp_path).create("LVM-edge", 1, 100, 8, "800 core 8")
    edge = Scalars(101, 99, 2**31 - 1, True, True, True, True, True)
    st.save_scalars(edge)
    st.close()
    (loaded,) = StateDir(tmp_path).load_all()
    assert loaded.load_scalars() == edge


def test_the_range_check_is_the_one_regionlog_owns() -> None:
    assert scalars_problem(100, Scalars(0, -1, -1, *[False] * 5)) is None
    assert "2199023255552" in str(scalars_problem(100, Scalars(0, 2**41, 0, *[False] * 5)))
    assert scalars_problem(100, Scalars(102, -1, -1, *[False] * 5)) is not None


@pytest.mark.parametrize(
    "text", [b"800 bogus 8", b"800 core 16", b"not a ctr", b"\xff\xfe"], ids=repr
)
def test_a_bad_constructor_text_sets_the_file_aside(tmp_path: Path, text: bytes) -> None:
    st = StateDir(tmp_path).create("LVM-ctr", 1, 100, 8, "800 core 8")
    st.close()
    with open(st.path, "r+b") as fh:
        fh.seek(statefile._TEXT_AT + 2 + statefile.UUID_TEXT_MAX)
        fh.write(struct.pack("=H", len(text)) + text)
    assert StateDir(tmp_path).load_all() == []
    assert st.path.with_suffix(".corrupt").exists()


# ---------------------------------------------------------------------------------- migration


def _write_layout2(directory: Path, uuid: str, luid: int, count: int, text: str) -> Path:
    """A state file exactly as the layout-2 daemon wrote it (name, header, three maps)."""
    safe = "".join(c if c.isalnum() or c in "-_." else f"%{ord(c):02x}" for c in uuid)
    path = directory / f"{safe}@{luid:016x}.state"
    size = statefile.bitmap_bytes(count)
    head = bytearray(HEADER_SIZE)
    struct.pack_into("=8sIIQQQQ", head, 0, b"ULOGDST1", 2, HEADER_SIZE, luid, count, 8, size)
    struct.pack_into("=QqiIQ", head, 48, 3, 2, 0, 0b1001, 77)
    u, t = uuid.encode(), text.encode()
    struct.pack_into("=H129sH336s", head, 80, len(u), u, len(t), t)
    maps = [bytearray(size) for _ in range(3)]
    maps[0][0] = 0b0101  # clean 0 and 2
    maps[1][0] = 0b0111  # sync 0, 1, 2
    maps[2][0] = 0b0010  # own mark 1
    path.write_bytes(bytes(head) + b"".join(maps))
    return path


def test_a_layout_2_file_is_migrated_with_every_bit_and_scalar(tmp_path: Path) -> None:
    old = _write_layout2(tmp_path, "LVM-old", 5, 100, "800 core 8")
    (st,) = StateDir(tmp_path).load_all()
    assert not old.exists()
    assert st.path.name == file_name("LVM-old", 5)
    assert (st.identity.uuid, st.identity.luid, st.identity.ctr_text) == (
        "LVM-old",
        5,
        "800 core 8",
    )
    assert list(st.clean.search(1)) == [0, 2]
    assert list(st.sync.search(1)) == [0, 1, 2]
    assert list(st.mine.search(1)) == [1]
    assert st.load_scalars() == Scalars(3, 2, 0, True, False, False, True, False)
    st.close()
    (again,) = StateDir(tmp_path).load_all()  # and it stays what it became
    assert again.path == st.path and list(again.mine.search(1)) == [1]
    again.close()


def test_an_interrupted_migration_keeps_the_new_file(tmp_path: Path) -> None:
    _write_layout2(tmp_path, "LVM-old", 5, 100, "800 core 8")
    (st,) = StateDir(tmp_path).load_all()
    st.sync[50] = 1  # served after the migration
    st.close()
    old = _write_layout2(tmp_path, "LVM-old", 5, 100, "800 core 8")  # as if never removed
    (again,) = StateDir(tmp_path).load_all()
    assert not old.exists() and again.sync[50] == 1
    again.close()


def test_a_restarted_server_restores_a_migrated_log(tmp_path: Path) -> None:
    _write_layout2(tmp_path, "LVM-up", 5, 100, "800 core 8")
    server = Server(state_dir=StateDir(tmp_path))
    server.restore(server.state_dir.load_all())  # type: ignore[union-attr]
    rl = server.logs[("LVM-up", 5)].log
    assert rl.sync_count == 3 and rl.holders == {1: {0}} and rl.recovering == 2
    server.close()


# ---------------------------------------------------------------------------------- space


def test_a_new_file_is_allocated_whole_before_it_is_used(tmp_path: Path) -> None:
    st = StateDir(tmp_path).create("LVM-big", 1, 1 << 20, 8, f"{8 << 20} core 8")
    info = st.path.stat()
    assert info.st_size == statefile.file_size(1 << 20)
    assert info.st_blocks * 512 >= info.st_size
    st.close()


def test_a_nosync_file_is_built_in_sync_and_clean_up_to_the_region_count(tmp_path: Path) -> None:
    st = StateDir(tmp_path).create("LVM-ns", 1, 100, 8, "800 core 8 nosync", fill=1)
    assert st.sync.count(1) == 100 and st.clean.count(1) == 100 and not st.mine.any()
    assert not st.sync[100:].any()
    st.close()


def test_a_sparse_file_is_allocated_at_restore_before_it_is_mapped(tmp_path: Path) -> None:
    st = StateDir(tmp_path).create("LVM-sparse", 1, 1 << 20, 8, f"{8 << 20} core 8")
    st.close()
    head = st.path.read_bytes()[:HEADER_SIZE]
    st.path.unlink()
    with open(st.path, "wb") as fh:  # what ftruncate() made: a hole after the header
        fh.write(head)
        fh.truncate(statefile.file_size(1 << 20))
    assert st.path.stat().st_blocks * 512 < st.path.stat().st_size
    (loaded,) = StateDir(tmp_path).load_all()
    assert loaded.path.stat().st_blocks * 512 >= loaded.path.stat().st_size
    loaded.close()


def test_the_census_counts_sync_bits_and_finds_own_marks(tmp_path: Path) -> None:
    st = StateDir(tmp_path).create("LVM-c", 1, 1000, 8, "8000 core 8 nosync", fill=1)
    st.sync[10] = 0
    st.mine[3] = st.mine[999] = 1
    assert st.census() == (999, [3, 999])
    st.close()


def test_a_state_file_costs_one_descriptor_the_mappings_own(tmp_path: Path) -> None:
    def held() -> list[str]:
        targets = []
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                targets.append(os.readlink(f"/proc/self/fd/{fd}"))
        return [t for t in targets if t.startswith(str(tmp_path))]

    states = [StateDir(tmp_path).create(f"LVM-{i}", 1, 64, 8, "512 core 8") for i in range(20)]
    assert len(held()) == 20
    for st in states:
        st.close()
    assert held() == []


def test_what_is_not_a_regular_file_is_set_aside_and_the_rest_restored(tmp_path: Path) -> None:
    sd = StateDir(tmp_path)
    good = sd.create("LVM-good", 1, 64, 8, "512 core 8")
    good.close()
    (tmp_path / "adir.0.state").mkdir()
    (tmp_path / "alink.1.state").symlink_to(good.path)
    loaded = StateDir(tmp_path).load_all()
    assert [s.identity.uuid for s in loaded] == ["LVM-good"]
    assert (tmp_path / "adir.0.corrupt").is_dir()
    assert (tmp_path / "alink.1.corrupt").is_symlink()


def _raw_of(text: str) -> bytes:
    """The inverse of wire's uuid naming: every backslash starts a ``\\xNN`` escape."""
    return re.sub(r"\\x([0-9a-f]{2})", lambda m: chr(int(m[1], 16)), text).encode("latin-1")


@given(hs.binary(min_size=1, max_size=129).filter(lambda b: b"\0" not in b))
def test_every_uuid_the_kernel_can_send_has_its_own_name(raw: bytes) -> None:
    """wire names a uuid injectively (a literal backslash is escaped too), within the state
    file's room for it."""
    text = wire._uuid_text(raw.ljust(129, b"\0"))
    assert _raw_of(text) == raw and len(text) <= statefile.UUID_TEXT_MAX


def test_a_backslash_and_the_byte_it_would_spell_are_two_uuids() -> None:
    assert wire._uuid_text(b"\\xff") != wire._uuid_text(b"\xff")
