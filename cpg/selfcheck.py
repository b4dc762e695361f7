"""Compare the ABI-mode declarations with corosync's real headers (cffi API mode).

Theory of operation
-------------------
:data:`cpg._ffi.CDEF` is hand-written; a newer corosync could change a constant or a struct and
ABI mode would never notice.  :func:`run` compiles the same declarations in cffi *API mode*
against the installed headers (:data:`cpg._ffi.HEADERS`), with every number left to the C
compiler: ``#define`` values become ``...`` and every struct gets a trailing ``...;`` so that
cffi takes sizes and offsets from the compiler, and enum values from the header.  It then lists
every fact (constant value, type size and alignment, field offset and size) on which the ABI
declarations and the compiler disagree.

Drift shows in one of three ways, all failures: a mismatch in the returned list (constants,
sizes, offsets), a cffi error when a field's type has the wrong size, or a compile error when a
function prototype no longer matches (``-Werror=incompatible-pointer-types``).

Needs gcc, Python.h and the corosync ``-dev`` packages; only tests use it.  Run by hand with
``python -m cpg.selfcheck``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import cffi

from . import _ffi


class DriftError(Exception):
    """The declarations could not even be built or laid out against the headers."""


@dataclasses.dataclass(frozen=True)
class Mismatch:
    fact: str
    abi: int | None
    header: int | None

    def __str__(self) -> str:
        return f"{self.fact}: ABI cdef says {self.abi}, header says {self.header}"


def flexible(cdef: str) -> str:
    """*cdef* with every number left to the compiler (``#define X ...``, structs ``...;``)."""
    cdef = re.sub(r"^(\s*#define\s+\w+)\s.*$", r"\1 ...", cdef, flags=re.MULTILINE)
    return re.sub(r"(struct(?:\s+\w+)?\s*\{[^{}]*?)(\n\s*\}\s*\w*\s*;)", r"\1\n    ...;\2", cdef)


def build_api(cdef: str, tmpdir: Path) -> tuple[cffi.FFI, Any]:
    """Compile *cdef* in API mode against the headers; return the module's ``(ffi, lib)``."""
    digest = hashlib.sha1(cdef.encode()).hexdigest()[:12]
    name = f"_cpg_selfcheck_{digest}"
    builder = cffi.FFI()
    builder.cdef(flexible(cdef))
    builder.set_source(
        name,
        "\n".join(f"#include <{header}>" for header in _ffi.HEADERS),
        libraries=["cpg", "quorum"],
        extra_compile_args=["-Werror=incompatible-pointer-types", "-Werror=int-conversion"],
    )
    path = builder.compile(tmpdir=str(tmpdir), verbose=False)
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ffi, module.lib


def compare(cdef: str, tmpdir: Path) -> list[Mismatch]:
    """Build *cdef* both ways and return every disagreement (empty list: no drift).

    Raises :class:`DriftError` when the API build fails (a prototype disagrees with the header)
    or cffi refuses a struct whose declared field sizes contradict the compiler.
    """
    try:
        api_ffi, api_lib = build_api(cdef, tmpdir)
    except (cffi.VerificationError, cffi.CDefError) as exc:
        raise DriftError(f"API-mode build against the headers failed: {exc}") from exc
    abi_ffi = _ffi.make_ffi(cdef)
    abi = _ffi.layout_facts(abi_ffi, abi_ffi.dlopen(None), cdef)
    try:
        api = _ffi.layout_facts(api_ffi, api_lib, cdef)
    except api_ffi.error as exc:
        raise DriftError(f"layout disagrees with the headers: {exc}") from exc
    return [
        Mismatch(fact, abi.get(fact), api.get(fact))
        for fact in sorted(set(abi) | set(api))
        if abi.get(fact) != api.get(fact)
    ]


def fact_count(cdef: str = _ffi.CDEF) -> int:
    """How many facts the check compares for *cdef*."""
    abi_ffi = _ffi.make_ffi(cdef)
    return len(_ffi.layout_facts(abi_ffi, abi_ffi.dlopen(None), cdef))


def run(tmpdir: Path | None = None) -> list[Mismatch]:
    """Check the package's own declarations."""
    if tmpdir is not None:
        return compare(_ffi.CDEF, tmpdir)
    with tempfile.TemporaryDirectory(prefix="cpg-selfcheck-") as tmp:
        return compare(_ffi.CDEF, Path(tmp))


def main() -> int:
    try:
        mismatches = run()
    except DriftError as exc:
        print(exc)
        return 1
    for mismatch in mismatches:
        print(mismatch)
    print(f"{fact_count()} facts compared, {len(mismatches)} mismatches")
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
