"""State files: layout, restoration, and refusal of damaged files."""

from __future__ import annotations

import fcntl
import os
import stat
from pathlib import Path

import pytest

from ulogd.regionlog import Scalars
from ulogd.statefile import HEADER_SIZE, StateDir, import_previous


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
    s = Scalars(17, 4, 3, True, False, True, True, False)
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
    assert (old / "LVM-up@0000000000000009.state").exists()  # the old directory is only read
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
