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
"""

from __future__ import annotations

import os
import shlex
import subprocess


def mirrors_using(uuid: str, table_text: str | None = None) -> list[str]:
    """Names of the dm devices whose table uses the userspace log ``uuid``."""
    if table_text is None:
        env = dict(os.environ, DM_DISABLE_UDEV="1")
        out = subprocess.run(
            ["dmsetup", "table"], capture_output=True, text=True, env=env, timeout=30
        )
        if out.returncode != 0:
            return []
        table_text = out.stdout
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


def start_cycle(names: list[str]) -> subprocess.Popen[bytes]:
    """Suspend and resume each device, in a child process (the caller polls for its end)."""
    steps = " && ".join(
        f"dmsetup suspend {shlex.quote(n)} && dmsetup resume {shlex.quote(n)}" for n in names
    )
    env = dict(os.environ, DM_DISABLE_UDEV="1")
    return subprocess.Popen(
        ["sh", "-c", steps or "true"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
