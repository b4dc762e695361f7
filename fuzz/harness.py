"""atheris driver shared by the per-target scripts: ``python fuzz/fuzz_wire.py [libFuzzer args]``.

The ulogd modules (and the target module) are imported under atheris' coverage
instrumentation; log output is silenced (the decoders log every rejected input).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(name: str) -> None:
    import atheris

    sys.path.insert(0, str(ROOT))
    logging.disable(logging.CRITICAL)
    if os.environ.get("ULOGD_FUZZ_BULK"):
        # Bulk mode: the decoders run uninstrumented (several times faster) and libFuzzer
        # mutates the corpus built by an instrumented run; only the wrapper below reports
        # coverage, which keeps libFuzzer from refusing an "uninstrumented" target.
        from fuzz import targets
    else:
        with atheris.instrument_imports(include=["ulogd", "fuzz"]):
            from fuzz import targets
    check = targets.TARGETS[name]

    @atheris.instrument_func
    def one(data: bytes) -> None:
        check(data)

    atheris.Setup(sys.argv, one)
    atheris.Fuzz()
