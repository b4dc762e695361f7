"""The local device-mapper side: find this node's mirrors that use a log, and cycle them.

Theory of operation
-------------------
Once a kernel has been told that every region is in sync, it stops asking for resync work
until the mirror is resumed again.  When a cluster member dies holding marks, its regions lose
sync on every survivor, and each survivor must get its *own* kernel to copy them: ulogd finds
the local dm devices whose table names the log's uuid (``dmsetup table``; the log part reads
``userspace <n> <uuid> ...``) and runs ``dmsetup suspend`` then ``dmsetup resume`` on them in
a child process.  The daemon keeps answering the requests that cycle produces (it is
single-threaded, but never waits for the child), and the server keeps the log in its group
throughout.

A ``dmsetup`` that fails (not installed, ``/dev/mapper/control`` not reachable, no
CAP_SYS_ADMIN) raises :class:`DmsetupError` with dmsetup's own words: the caller logs it and
counts it, because a survivor that cannot cycle its mirror never copies the dead node's torn
regions.  "No mirror uses this log" is an empty list, a different answer.

udev: where udev runs (its control socket exists), libdevmapper must wait for it to process
each change (LVM's rules, ``/dev/disk/by-*``), which is its default.  Only where udev is
absent (the test guest's busybox-style init, rescue shells) is ``DM_DISABLE_UDEV=1`` set, so
that dmsetup makes the ``/dev/mapper`` nodes itself instead of waiting for a udev that never
answers.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Mapping
from pathlib import Path

#: the command run (a path in tests that need it to fail)
DMSETUP = "dmsetup"
#: udevd's control socket: present while udev runs
UDEV_CONTROL = Path("/run/udev/control")


class DmsetupError(Exception):
    """``dmsetup`` could not be run or failed (the message says which and why)."""


def udev_running(control: Path = UDEV_CONTROL) -> bool:
    return control.exists()


def dm_environment(
    environ: Mapping[str, str] | None = None, *, control: Path = UDEV_CONTROL
) -> dict[str, str]:
    """The environment for dmsetup: as given where udev runs, ``DM_DISABLE_UDEV=1`` where not."""
    env = dict(os.environ if environ is None else environ)
    if not udev_running(control):
        env["DM_DISABLE_UDEV"] = "1"
    return env


def parse_mirrors(uuid: str, table_text: str) -> list[str]:
    """Names of the devices in ``dmsetup table`` output whose table uses log ``uuid``."""
    names = []
    for line in table_text.splitlines():
        name, sep, table = line.partition(": ")
        words = table.split()
        if not sep or "userspace" not in words:
            continue
        at = words.index("userspace")
        if len(words) > at + 2 and words[at + 2] == uuid:
            names.append(name)
    return names


def dm_table(timeout: float = 30) -> str:
    """``dmsetup table`` of every local device; :class:`DmsetupError` when it fails."""
    argv = [DMSETUP, "table"]
    try:
        out = subprocess.run(
            argv, capture_output=True, text=True, env=dm_environment(), timeout=timeout
        )
    except OSError as exc:
        raise DmsetupError(f"cannot run {shlex.join(argv)}: {exc}") from None
    except subprocess.TimeoutExpired:
        raise DmsetupError(f"{shlex.join(argv)} did not finish in {timeout:g} s") from None
    if out.returncode != 0:
        words = " ".join(out.stderr.split()) or "no message"
        raise DmsetupError(f"{shlex.join(argv)} failed with status {out.returncode}: {words}")
    return out.stdout


def mirrors_using(uuid: str, table_text: str | None = None) -> list[str]:
    """Names of the dm devices whose table uses the userspace log ``uuid`` (reads
    ``dmsetup table`` unless given its text; :class:`DmsetupError` when that fails)."""
    return parse_mirrors(uuid, dm_table() if table_text is None else table_text)


def start_cycle(names: list[str]) -> subprocess.Popen[bytes]:
    """Suspend and resume each device, in a child process (the caller polls for its end)."""
    dmsetup = shlex.quote(DMSETUP)
    steps = " && ".join(
        f"{dmsetup} suspend {shlex.quote(n)} && {dmsetup} resume {shlex.quote(n)}" for n in names
    )
    try:
        return subprocess.Popen(
            ["sh", "-c", steps or "true"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=dm_environment(),
        )
    except OSError as exc:
        what = ", ".join(names)
        raise DmsetupError(f"cannot start the suspend/resume of {what}: {exc}") from None
