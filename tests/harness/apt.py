"""Debian packages the test tiers need, installed from the archive when missing.

The test command installs what its own tests need (a fresh machine sees nothing skipped):
corosync, QEMU and its tools, tshark, a C compiler for the benchmark's responder.  Every
fixture goes through :func:`install`: non-interactive (debconf answers its defaults), waiting
for a dpkg lock another installer holds, and ``apt-get update`` once when the package lists are
stale or empty.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence

ENV = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
_APT = ["apt-get", "-q", "-y", "-o", "Dpkg::Use-Pty=0", "-o", "DPkg::Lock::Timeout=900"]


class AptError(RuntimeError):
    """apt-get could not install the packages (its last words are in the message)."""


def missing(packages: Sequence[str]) -> list[str]:
    """The ones of ``packages`` dpkg does not have installed."""
    out = []
    for pkg in packages:
        status = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True
        )
        if status.returncode != 0 or "install ok installed" not in status.stdout:
            out.append(pkg)
    return out


def install(packages: Sequence[str]) -> list[str]:
    """Install whichever of ``packages`` are missing (root); returns those it installed."""
    todo = missing(packages)
    if not todo:
        return []
    command = [*_APT, "install", "--no-install-recommends", *todo]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True)
    if result.returncode != 0:  # stale or empty package lists: update once, then retry
        update()
        result = subprocess.run(command, env=ENV, capture_output=True, text=True)
    if result.returncode != 0:
        raise AptError(f"apt-get install {' '.join(todo)} failed:\n{result.stderr[-2000:]}")
    return todo


_updated = False


def update() -> None:
    """``apt-get update``, once per process (the package lists are stale or empty)."""
    global _updated
    if not _updated:
        subprocess.run([*_APT, "update"], env=ENV, capture_output=True, text=True)
        _updated = True
