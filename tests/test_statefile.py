"""State files: layout, restoration, and refusal of damaged files."""

from __future__ import annotations

import stat
from pathlib import Path

from ulogd.regionlog import Scalars
from ulogd.statefile import HEADER_SIZE, StateDir


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
