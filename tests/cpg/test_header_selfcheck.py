"""The ABI-mode declarations agree with corosync's headers (cffi API mode build).

Needs gcc, Python.h and corosync's -dev packages (installed by the ``corosync_installed``
fixture), hence the ``corosync`` tier.  The drift tests feed deliberately wrong declarations
through the same pipeline and require that each is caught.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cpg import _ffi, selfcheck

pytestmark = pytest.mark.corosync


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory: pytest.TempPathFactory, corosync_installed: float) -> Path:
    if shutil.which("gcc") is None:
        pytest.fail("gcc is needed for the API-mode self-check")
    for header in ("cpg.h", "corotypes.h", "quorum.h"):
        assert Path("/usr/include/corosync", header).exists(), header
    return tmp_path_factory.mktemp("selfcheck")


def test_abi_declarations_match_the_headers(build_dir: Path) -> None:
    mismatches = selfcheck.compare(_ffi.CDEF, build_dir)
    assert mismatches == []
    # The comparison covers every constant, type and field: check that it is not vacuous.
    facts = _ffi.layout_facts(_ffi.ffi, _ffi.ffi.dlopen(None))
    assert len(facts) >= 100
    for fact in (
        "const:CS_ERR_TRY_AGAIN",
        "const:CPG_REASON_PROCDOWN",
        "const:CPG_MAX_NAME_LENGTH",
        "const:QUORUM_SET",
        "sizeof:struct cpg_name",
        "offsetof:struct cpg_ring_id.seq",
        "offsetof:cpg_model_v1_data_t.flags",
        "fieldsize:struct iovec.iov_len",
        "sizeof:quorum_callbacks_t",
    ):
        assert fact in facts, fact


def _mutate(old: str, new: str) -> str:
    assert _ffi.CDEF.count(old) == 1, old
    return _ffi.CDEF.replace(old, new)


def test_a_wrong_enum_constant_is_caught(build_dir: Path) -> None:
    mismatches = selfcheck.compare(
        _mutate("CS_ERR_TRY_AGAIN = 6", "CS_ERR_TRY_AGAIN = 7"), build_dir
    )
    assert [(m.fact, m.abi, m.header) for m in mismatches] == [("const:CS_ERR_TRY_AGAIN", 7, 6)]


def test_a_wrong_define_is_caught(build_dir: Path) -> None:
    mismatches = selfcheck.compare(
        _mutate("#define CPG_MEMBERS_MAX 128", "#define CPG_MEMBERS_MAX 64"), build_dir
    )
    assert [(m.fact, m.abi, m.header) for m in mismatches] == [("const:CPG_MEMBERS_MAX", 64, 128)]


def test_a_missing_field_is_caught(build_dir: Path) -> None:
    # Drop cpg_model_v1_data_t.flags: the struct is smaller than the header's.
    cdef = _mutate(
        "    cpg_totem_confchg_fn_t cpg_totem_confchg_fn;\n    unsigned int flags;\n",
        "    cpg_totem_confchg_fn_t cpg_totem_confchg_fn;\n",
    )
    mismatches = selfcheck.compare(cdef, build_dir)
    found = [(m.fact, m.abi, m.header) for m in mismatches]
    assert found == [("sizeof:cpg_model_v1_data_t", 32, 40)]


def test_a_wrong_field_type_is_caught(build_dir: Path) -> None:
    cdef = _mutate("uint32_t pid;\n    uint32_t reason;", "uint64_t pid;\n    uint32_t reason;")
    with pytest.raises(selfcheck.DriftError, match="wrong size for field 'pid'"):
        selfcheck.compare(cdef, build_dir)


def test_a_wrong_prototype_is_caught(build_dir: Path) -> None:
    cdef = _mutate(
        "cpg_local_get (cpg_handle_t handle, unsigned int *local_nodeid)",
        "cpg_local_get (cpg_handle_t handle, uint64_t *local_nodeid)",
    )
    with pytest.raises(selfcheck.DriftError, match="build against the headers failed"):
        selfcheck.compare(cdef, build_dir)
