"""The stateless baseline responders: the C one built from ``c_responder.c`` and the Python
one in ``guest/naive_responder.py``.

Both answer every dm-log-userspace request with a plausible reply from one blocking
``recv``/``sendto`` loop and keep no dirty log (see their headers).  ``fio_qemu.py`` runs them
on the netlink connector in the guest; natively they serve the test transport's datagrams
over a Unix socket (``--unix PATH``), which ``transport_latency.py`` and the smoke test use.
The C one is built with the host's compiler, statically (the QEMU guest has none and a
static binary needs no library there); :func:`build_c_responder` returns None, with the
reason in :data:`WHY_NO_C`, when no compiler or static C library is installed, and callers
skip only that baseline.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
C_SOURCE = HERE / "c_responder.c"
PY_RESPONDER = HERE / "guest" / "naive_responder.py"
#: where the binary goes (git-ignored; inside the checkout, so the QEMU guest sees it too)
C_BINARY = HERE / "results" / "c_responder"
WHY_NO_C: list[str] = []


def build_c_responder(binary: Path = C_BINARY) -> Path | None:
    """Compile ``c_responder.c`` statically (once; rebuilt when the source is newer)."""
    if binary.exists() and binary.stat().st_mtime >= C_SOURCE.stat().st_mtime:
        return binary
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        WHY_NO_C[:] = ["no C compiler (cc, gcc, clang) is installed"]
        return None
    binary.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [cc, "-O2", "-static", "-o", str(binary), str(C_SOURCE)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if proc.returncode != 0:
        WHY_NO_C[:] = [f"{cc} -static failed (no static C library?): {proc.stderr.strip()[-300:]}"]
        return None
    return binary


@contextlib.contextmanager
def serve_unix(kind: str, path: str, poll_us: int = 0) -> Iterator[int]:
    """Run the ``c`` or ``python`` responder on a Unix datagram socket; yields its pid."""
    if kind == "c":
        binary = build_c_responder()
        if binary is None:
            raise RuntimeError(f"no C responder: {WHY_NO_C[0]}")
        argv = [str(binary), "--unix", path, str(poll_us)]
    else:
        argv = [sys.executable, str(PY_RESPONDER), "--unix", path]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if b"ready" not in line:
            raise RuntimeError(f"the {kind} responder did not start: {line!r}")
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()
