"""Unit tests (no corosync): cs_error_t mapping and exceptions."""

from __future__ import annotations

import pytest

import cpg
from cpg.errors import CsError, check, code_name


def test_every_code_maps_to_its_name() -> None:
    for code in CsError:
        assert code_name(int(code)) == code.name
    assert code_name(6) == "CS_ERR_TRY_AGAIN"


def test_unknown_code_is_kept_not_hidden() -> None:
    err = cpg.CpgError(99, "cpg_join")
    assert err.code == 99
    assert err.name == "cs_error_t(99)"
    assert "cs_error_t(99)" in str(err)


def test_check_raises_with_code_and_operation() -> None:
    check(1, "cpg_join")  # CS_OK: nothing
    with pytest.raises(cpg.CpgError) as info:
        check(6, "cpg_mcast_joined")
    assert info.value.code is CsError.CS_ERR_TRY_AGAIN
    assert info.value.name == "CS_ERR_TRY_AGAIN"
    assert info.value.op == "cpg_mcast_joined"
    assert str(info.value) == "cpg_mcast_joined: CS_ERR_TRY_AGAIN (6)"
    assert not info.value.connection_lost


def test_check_uses_the_requested_subclass() -> None:
    with pytest.raises(cpg.QuorumError) as info:
        check(2, "quorum_getquorate", cpg.QuorumError)
    assert isinstance(info.value, cpg.CpgError)
    assert info.value.connection_lost


@pytest.mark.parametrize(
    ("code", "lost"), [(2, True), (9, True), (6, False), (14, False), (100, False)]
)
def test_connection_lost_codes(code: int, lost: bool) -> None:
    assert cpg.CpgError(code, "x").connection_lost is lost


def test_message_too_large_is_a_cpg_error_with_sizes() -> None:
    err = cpg.MessageTooLarge(2_000_000, 1_047_552)
    assert isinstance(err, cpg.CpgError)
    assert err.code is CsError.CS_ERR_TOO_BIG
    assert (err.size, err.limit) == (2_000_000, 1_047_552)
    assert "2000000" in str(err) and "1047552" in str(err)


def test_reason_enum_matches_cpg_h_and_tolerates_unknown_values() -> None:
    assert [(r.name, int(r)) for r in cpg.Reason] == [
        ("UNDEFINED", 0), ("JOIN", 1), ("LEAVE", 2), ("NODEDOWN", 3), ("NODEUP", 4),
        ("PROCDOWN", 5),
    ]  # fmt: skip
    assert cpg.Reason.of(3) is cpg.Reason.NODEDOWN
    assert cpg.Reason.of(42) is cpg.Reason.UNDEFINED


def test_cs_error_table_agrees_with_the_cdef() -> None:
    from cpg import _ffi

    enum = _ffi.ffi.typeof("cs_error_t")
    assert dict(enum.relements) == {c.name: int(c) for c in CsError}
