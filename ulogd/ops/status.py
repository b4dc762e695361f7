"""``dm-ulogd status``: ask the running daemon over its control socket and show every log.

Theory of operation
-------------------
One ``status`` request (:func:`ulogd.ops.control.request`) returns the daemon's snapshot as JSON;
this module only renders it:

* :func:`render_table` — a header line about the daemon, one row per log (uuid, the local dm
  device(s) using the log, type, regions, region size, in sync count and %, marked regions,
  recovering region@node, state, log device and health, server and members) and, under the
  table, the last error of each log that has one.  A long uuid (LVM's are 68 characters) is
  shown as its prefix and its last eight characters (``LVM-...a1b2c3d4``, the tag of the
  daemon's log lines); ``--wide`` shows it whole.  The device names come from ``dmsetup
  table`` (:func:`local_devices`: the log part of a mirror table names the log's uuid);
  ``?`` when dmsetup cannot be asked;
* ``--json`` prints the snapshot unchanged (stable keys; see ``docs/operations.rst``);
* ``--watch`` redraws every ``--interval`` seconds with a progress bar per log and the resync
  rate and time left, computed from the previous sample.

Failures are reported as one sentence and a distinct exit status: 1 the daemon answered with
an error (e.g. permission denied), 3 no daemon is listening, 4 not allowed to reach the socket.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from ulogd.ops import control

EXIT_ERROR = 1
EXIT_NO_DAEMON = 3
EXIT_DENIED = 4


class StatusError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def fetch(run_dir: str | os.PathLike[str], timeout: float = 10.0) -> dict[str, Any]:
    """The daemon's status snapshot; raises :class:`StatusError` with an operator's sentence."""
    path = Path(run_dir) / control.SOCKET_NAME
    try:
        answer = control.request(path, "status", timeout=timeout)
    except FileNotFoundError:
        raise StatusError(
            f"no ulogd control socket at {path}: is the daemon running "
            "(systemctl status dm-ulogd) with this --run-dir?",
            EXIT_NO_DAEMON,
        ) from None
    except ConnectionRefusedError:
        raise StatusError(
            f"nothing listens on {path}: the daemon is not running (stale socket)",
            EXIT_NO_DAEMON,
        ) from None
    except PermissionError:
        raise StatusError(
            f"permission denied on {path}: dm-ulogd status must be run as root", EXIT_DENIED
        ) from None
    except (OSError, ValueError) as exc:
        raise StatusError(f"talking to the daemon over {path} failed: {exc}", EXIT_ERROR) from None
    if not answer.get("ok"):
        error = str(answer.get("error", "unknown error"))
        code = EXIT_DENIED if error.startswith("permission denied") else EXIT_ERROR
        raise StatusError(f"the daemon refused: {error}", code)
    return answer


# ---------------------------------------------------------------------- rendering
def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def _sectors(n: int) -> str:
    value = n * 512.0
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:g}{unit}" if value == int(value) else f"{value:.1f}{unit}"
        value /= 1024
    return f"{n}s"


def _device(entry: dict[str, Any]) -> str:
    if not entry.get("log_device"):
        return "-"
    dev = entry.get("device_id") or entry["log_device"]
    return f"{dev} ({entry.get('health') or '?'})"


def _recovering(entry: dict[str, Any]) -> str:
    if entry.get("recovering") is None:
        return "halted" if entry.get("recovery_halted") else "-"
    return f"{entry['recovering']}@{entry['recoverer']}"


def header(snapshot: dict[str, Any]) -> str:
    d = snapshot["daemon"]
    parts = [
        f"ulogd {d.get('version', '?')} pid {d.get('pid', '?')}",
        f"up {_duration(d['uptime'])}" if "uptime" in d else None,
        f"transport {d.get('transport', '?')}",
        f"node {d.get('node', '?')}",
        f"cluster {d['cluster']}" if d.get("cluster") else None,
        f"{d.get('logs', 0)} log(s)",
        f"{d.get('datagrams', 0)} requests",
        f"{d.get('rejected', 0)} rejected" if d.get("rejected") else None,
    ]
    return ", ".join(p for p in parts if p)


COLUMNS = (
    "UUID",
    "DEVICE",
    "LUID",
    "TYPE",
    "REGIONS",
    "SIZE",
    "IN SYNC",
    "MARKED",
    "RECOVERING",
    "STATE",
    "LOG DEVICE",
    "SERVER",
    "MEMBERS",
)
_RIGHT = {"REGIONS", "SIZE", "MARKED"}


def short_uuid(uuid: str) -> str:
    """``LVM-...a1b2c3d4`` for a long uuid: its prefix up to the first ``-`` (at most eight
    characters, else four) and its last eight characters, the tag of the daemon's log lines."""
    if len(uuid) <= 20:
        return uuid
    dash = uuid.find("-", 0, 8)
    head = uuid[: dash + 1] if dash >= 0 else uuid[:4]
    return f"{head}...{uuid[-8:]}"


def parse_dm_tables(text: str) -> dict[str, list[str]]:
    """Log uuid → names of the dm devices whose table uses it, from ``dmsetup table`` output
    (``NAME: <start> <len> mirror userspace <n> <uuid> ...``)."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        name, sep, table = line.partition(": ")
        words = table.split()
        if not sep or "userspace" not in words:
            continue
        at = words.index("userspace")
        if len(words) > at + 2:
            found.setdefault(words[at + 2], []).append(name)
    return found


def local_devices(dmsetup: str = "dmsetup") -> dict[str, list[str]] | None:
    """The local mirrors by log uuid (``dmsetup table``); None when dmsetup cannot be asked."""
    try:
        out = subprocess.run(
            [dmsetup, "table"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return parse_dm_tables(out.stdout)


def _devices(entry: dict[str, Any], devices: dict[str, list[str]] | None) -> str:
    if devices is None:
        return "?"
    return ",".join(devices.get(entry["uuid"], [])) or "-"


def _uuid(entry: dict[str, Any], wide: bool) -> str:
    return entry["uuid"] if wide else short_uuid(entry["uuid"])


def _row(
    entry: dict[str, Any], devices: dict[str, list[str]] | None = None, wide: bool = False
) -> list[str]:
    return [
        _uuid(entry, wide),
        _devices(entry, devices),
        f"{entry['luid']:#x}",
        entry["type"],
        str(entry["regions"]),
        _sectors(entry["region_size"]),
        f"{entry['in_sync']}/{entry['regions']} ({entry['in_sync_percent']:.1f}%)",
        str(entry["marked"]),
        _recovering(entry),
        entry["state"] + (f" +{entry['queued']}q" if entry.get("queued") else ""),
        _device(entry),
        "-" if entry.get("server") is None else str(entry["server"]),
        ",".join(str(m) for m in entry.get("members", [])) or "-",
    ]


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for r in rows:
        cells = [
            c.rjust(w) if COLUMNS[i] in _RIGHT else c.ljust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        out.append("  ".join(cells).rstrip())
    return out


def _errors(snapshot: dict[str, Any], wide: bool = False) -> list[str]:
    lines = []
    daemon_error = snapshot["daemon"].get("last_error")
    if daemon_error:
        lines.append(f"daemon: last error {_when(daemon_error)}: {daemon_error['message']}")
    for entry in snapshot["logs"]:
        err = entry.get("last_error")
        if err:
            lines.append(
                f"{_uuid(entry, wide)}: last {err['level']} {_when(err)}: {err['message']}"
            )
    return lines


def _when(err: dict[str, Any]) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(err["time"]))


def render_table(
    snapshot: dict[str, Any], devices: dict[str, list[str]] | None = None, wide: bool = False
) -> str:
    lines = [header(snapshot)]
    if snapshot["logs"]:
        lines.append("")
        lines += _table([list(COLUMNS), *(_row(e, devices, wide) for e in snapshot["logs"])])
    else:
        lines.append("no logs (no mirror with a userspace log is loaded)")
    errors = _errors(snapshot, wide)
    if errors:
        lines.append("")
        lines += errors
    return "\n".join(lines) + "\n"


def progress_bar(fraction: float, width: int) -> str:
    fraction = min(max(fraction, 0.0), 1.0)
    filled = round(fraction * width)
    return "[" + "#" * filled + "." * (width - filled) + "]"


def render_watch(
    snapshot: dict[str, Any],
    previous: dict[str, Any] | None,
    elapsed: float,
    width: int = 80,
    devices: dict[str, list[str]] | None = None,
    wide: bool = False,
) -> str:
    """The ``--watch`` screen: header, then per log a line and a resync progress bar."""
    before = {(e["uuid"], e["luid"]): e["in_sync"] for e in (previous or {}).get("logs", [])}
    lines = [header(snapshot), ""]
    if not snapshot["logs"]:
        lines.append("no logs (no mirror with a userspace log is loaded)")
    for entry in snapshot["logs"]:
        n, done = entry["regions"], entry["in_sync"]
        lines.append(
            f"{_uuid(entry, wide)} {entry['luid']:#x}  dev {_devices(entry, devices)}"
            f"  {entry['type']}  {entry['state']}"
            f"  marked {entry['marked']}  recovering {_recovering(entry)}"
            f"  device {_device(entry)}"
            + (f"  group {entry['cluster']['phase']}" if entry.get("cluster") else "")
            + "".join(
                f"  ORPHAN node {o['node']}: {o['regions']} held (no daemon since "
                f"{time.strftime('%H:%M:%S', time.localtime(o['since']))})"
                for o in entry.get("orphans", [])
            )
        )
        rate = ""
        key = (entry["uuid"], entry["luid"])
        if key in before and elapsed > 0:
            per_second = (done - before[key]) / elapsed
            if per_second > 0:
                left = (n - done) / per_second
                rate = f"  {per_second:.1f} regions/s, {_duration(left)} left"
        tail = f" {entry['in_sync_percent']:5.1f}% {done}/{n}{rate}"
        bar_width = max(10, min(50, width - len(tail) - 4))
        lines.append("  " + progress_bar(done / n if n else 1.0, bar_width) + tail)
    errors = _errors(snapshot, wide)
    if errors:
        lines.append("")
        lines += errors
    return "\n".join(lines) + "\n"


def watch(
    run_dir: str | os.PathLike[str],
    interval: float,
    count: int | None,
    out: TextIO,
    wide: bool = False,
) -> int:
    """Redraw until interrupted (or ``count`` screens); returns the exit status."""
    previous: dict[str, Any] | None = None
    last = time.monotonic()
    shown = 0
    clear = "\x1b[H\x1b[2J" if out.isatty() else ""
    try:
        while count is None or shown < count:
            snapshot = fetch(run_dir)
            now = time.monotonic()
            width = shutil.get_terminal_size((100, 24)).columns
            screen = render_watch(snapshot, previous, now - last, width, local_devices(), wide)
            out.write(clear + screen)
            if not clear:
                out.write("\n")
            out.flush()
            previous, last = snapshot, now
            shown += 1
            if count is None or shown < count:
                time.sleep(interval)
    except KeyboardInterrupt:
        return 0
    return 0


def main(
    run_dir: str,
    as_json: bool,
    watch_mode: bool,
    interval: float,
    count: int | None,
    wide: bool = False,
) -> int:
    try:
        if watch_mode:
            return watch(run_dir, interval, count, sys.stdout, wide)
        snapshot = fetch(run_dir)
    except StatusError as exc:
        print(f"dm-ulogd status: {exc}", file=sys.stderr)
        return exc.code
    if as_json:
        json.dump(snapshot, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(render_table(snapshot, local_devices(), wide))
    return 0
