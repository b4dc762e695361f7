"""The configuration file (TOML, ``/etc/dm-ulogd/dm-ulogd.toml``) and how it meets the command line.

Theory of operation
-------------------
The file is optional.  ``dm-ulogd run`` reads ``--config FILE`` when given (a missing file is then
an error), otherwise :data:`DEFAULT_PATH` if it exists.  Every value has a built-in default
(:class:`Settings`); the file overrides the defaults and a command-line flag overrides the file.
The parser defines its ``run`` flags with ``default=None`` so that :func:`merge` can tell a flag
the operator typed from one left alone.

The schema is small and closed: an unknown key or table, a value of the wrong type or out of
range is refused, and the error names the file, the line and the dotted key
(``/etc/dm-ulogd/dm-ulogd.toml:7: metrics.listen: ...``) — ``tomllib`` reports syntax errors with a
line but knows nothing of meaning, so :func:`_key_lines` finds each key's line with a small
line scanner (enough for the flat tables this file uses)::

    run_dir   = "/run/dm-ulogd"       # tmpfs: live state must not outlive a reboot
    log_level = "info"             # debug | info | warning | error
    capture   = "/var/lib/dm-ulogd/capture.pcapng"   # optional
    transport = "netlink"          # or "unix:PATH" (tests)
    node_id   = 0
    cluster   = "off"              # off | corosync
    poll      = "off"              # off | adaptive | a fixed budget in µs ("250")

    [corosync]
    expected_nodes = 3             # 0: do not check
    require_quorum = true

    [metrics]
    listen = "127.0.0.1:9813"      # empty or absent: no HTTP listener; loopback only
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

DEFAULT_PATH = Path("/etc/dm-ulogd/dm-ulogd.toml")
DEFAULT_RUN_DIR = Path("/run/dm-ulogd")
#: Where the file and the live state were up to 0.1.0, before the rename to dm-ulogd: read
#: (never written) by a daemon that finds nothing under the new names; see docs/operations.rst.
PREVIOUS_PATH = Path("/etc/ulogd/ulogd.toml")
PREVIOUS_RUN_DIR = Path("/run/ulogd")
LOG_LEVELS = ("debug", "info", "warning", "error")
CLUSTER_MODES = ("off", "corosync")


class ConfigError(Exception):
    """A configuration file that cannot be used; the message names file, line and key."""

    def __init__(self, path: str | os.PathLike[str], line: int | None, key: str, reason: str):
        self.path = str(path)
        self.line = line
        self.key = key
        self.reason = reason
        where = f"{self.path}:{line}" if line else self.path
        super().__init__(f"{where}: {key}: {reason}" if key else f"{where}: {reason}")


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything ``dm-ulogd run`` can be told, with its built-in defaults."""

    run_dir: Path = DEFAULT_RUN_DIR
    log_level: str = "info"
    capture: str | None = None
    transport: str = "netlink"
    node_id: int = 0
    cluster: str = "off"
    expected_nodes: int = 0
    require_quorum: bool = True
    metrics_listen: str | None = None
    #: polling after a reply: "off", "adaptive" or a fixed budget ("250us"); ulogd.edges.poll
    #: off by default: adaptive lost IOPS at queue depth 1 under QEMU (bench/README.rst)
    poll: str = "off"
    #: the file these settings came from (None: built-in defaults only)
    source: str | None = None


# dotted key in the file → (Settings field, check)
def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError("must be a string")
    return value


def _path(value: Any) -> Path:
    text = _str(value)
    if not text.startswith("/"):
        raise ValueError(f"must be an absolute path, not {text!r}")
    return Path(text)


def _optional_path(value: Any) -> str | None:
    text = _str(value)
    if not text:
        return None
    if not text.startswith("/"):
        raise ValueError(f"must be an absolute path, not {text!r}")
    return text


def _choice(choices: tuple[str, ...]):  # type: ignore[no-untyped-def]
    def check(value: Any) -> str:
        text = _str(value)
        if text not in choices:
            raise ValueError(f"{text!r} is not one of {', '.join(choices)}")
        return text

    return check


def _transport(value: Any) -> str:
    text = _str(value)
    if text != "netlink" and not (text.startswith("unix:/") and len(text) > 6):
        raise ValueError(f"{text!r} is neither 'netlink' nor 'unix:/absolute/path'")
    return text


def _int_range(low: int, high: int):  # type: ignore[no-untyped-def]
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError("must be an integer")
        if not low <= value <= high:
            raise ValueError(f"{value} is outside {low}..{high}")
        return value

    return check


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError("must be true or false")
    return value


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` on a loopback address → (host, port); ValueError if not."""
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\[\]]+):(\d+)", text)
    if not match:
        raise ValueError(f"{text!r} is not HOST:PORT (IPv6: [::1]:PORT)")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if not 0 <= port <= 65535:  # 0: any free port (tests; status shows the one bound)
        raise ValueError(f"port {port} is outside 0..65535")
    if host != "localhost":
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IP address or 'localhost'") from None
        if not address.is_loopback:
            raise ValueError(
                f"{host} is not a loopback address: metrics are served on loopback only "
                "(expose them further with a reverse proxy or an exporter you control)"
            )
    else:
        host = "127.0.0.1"
    return host, port


def _poll(value: Any) -> str:
    from ulogd.edges.poll import PollSetting

    if isinstance(value, bool) or not isinstance(value, str | int):
        raise TypeError("must be 'off', 'adaptive' or a budget in microseconds")
    return str(PollSetting.parse(value))


def _listen(value: Any) -> str | None:
    text = _str(value)
    if not text:
        return None
    parse_listen(text)
    return text


_SCHEMA: dict[str, tuple[str, Any]] = {
    "run_dir": ("run_dir", _path),
    "log_level": ("log_level", _choice(LOG_LEVELS)),
    "capture": ("capture", _optional_path),
    "transport": ("transport", _transport),
    "node_id": ("node_id", _int_range(0, 2**32 - 1)),
    "cluster": ("cluster", _choice(CLUSTER_MODES)),
    "corosync.expected_nodes": ("expected_nodes", _int_range(0, 64)),
    "corosync.require_quorum": ("require_quorum", _bool),
    "metrics.listen": ("metrics_listen", _listen),
    "poll": ("poll", _poll),
}
_TABLES = {key.split(".")[0] for key in _SCHEMA if "." in key}
#: Settings field → (dotted key, check): the command line's flags use the file's checks.
_BY_FIELD = {name: (key, check) for key, (name, check) in _SCHEMA.items()}

_HEADER = re.compile(r"\s*\[\s*([A-Za-z0-9_.\-\s\"]+?)\s*\]\s*(#.*)?$")
_ASSIGN = re.compile(r"\s*([A-Za-z0-9_\-]+|\"[^\"]*\")\s*=")


def _key_lines(text: str) -> dict[str, int]:
    """Dotted key → line number (1-based) of its assignment or table header."""
    lines: dict[str, int] = {}
    table = ""
    for number, line in enumerate(text.splitlines(), 1):
        if header := _HEADER.match(line):
            table = header.group(1).replace('"', "").replace(" ", "")
            lines.setdefault(table, number)
        elif assign := _ASSIGN.match(line):
            key = assign.group(1).strip('"')
            lines.setdefault(f"{table}.{key}" if table else key, number)
    return lines


def load(path: str | os.PathLike[str], base: Settings | None = None) -> Settings:
    """Read and check a configuration file; raises :class:`ConfigError`."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(path, None, "", f"cannot read: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(path, line, "", "not UTF-8 text") from None
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        match = re.search(r"\(at line (\d+), column \d+\)", str(exc))
        reason = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(exc))
        at = int(match.group(1)) if match else None
        raise ConfigError(path, at, "", f"TOML syntax: {reason}") from None
    return from_document(document, path, text, base)


def from_document(
    document: dict[str, Any],
    path: str | os.PathLike[str] = "<config>",
    text: str = "",
    base: Settings | None = None,
) -> Settings:
    """Check a decoded document against the schema and apply it to ``base``."""
    lines = _key_lines(text)
    values: dict[str, Any] = {}

    def fail(key: str, reason: str) -> ConfigError:
        return ConfigError(path, lines.get(key), key, reason)

    for key, value in document.items():
        if isinstance(value, dict):
            if key not in _TABLES:
                raise fail(key, f"unknown table (known: {', '.join(sorted(_TABLES))})")
            items = [(f"{key}.{sub}", v) for sub, v in value.items()]
        else:
            items = [(key, value)]
        for dotted, v in items:
            if dotted not in _SCHEMA:
                table = dotted.rpartition(".")[0]
                known = ", ".join(
                    k.rpartition(".")[2] for k in _SCHEMA if k.rpartition(".")[0] == table
                )
                raise fail(dotted, f"unknown key (known here: {known})")
            name, check = _SCHEMA[dotted]
            try:
                values[name] = check(v)
            except (TypeError, ValueError) as exc:
                raise fail(dotted, f"{exc} (got {v!r})") from None
    settings = replace(base or Settings(), **values, source=str(path))
    if settings.cluster == "off" and "expected_nodes" in values and settings.expected_nodes > 1:
        raise fail(
            "corosync.expected_nodes",
            f'expects {settings.expected_nodes} nodes but cluster = "off"',
        )
    return settings


def merge(settings: Settings, overrides: dict[str, Any]) -> Settings:
    """Apply command-line values (None = not given) on top of ``settings``.

    Each value goes through the same check as the file's key for it; a value that fails is a
    :class:`ConfigError` naming the flag (``command line: --node-id: -1 is outside ...``).
    """
    given = {k: v for k, v in overrides.items() if k in _BY_FIELD and v is not None}
    checked: dict[str, Any] = {}
    for name, value in given.items():
        _, check = _BY_FIELD[name]
        try:
            checked[name] = check(str(value) if isinstance(value, Path) else value)
        except (TypeError, ValueError) as exc:
            flag = "--" + name.replace("_", "-")
            raise ConfigError("command line", None, flag, f"{exc} (got {value!r})") from None
    return replace(settings, **checked)


def resolve(config: str | None, overrides: dict[str, Any]) -> Settings:
    """The settings ``dm-ulogd run`` uses: defaults ← file ← flags.

    Without ``--config``, :data:`DEFAULT_PATH` is read if it exists, else the file of the old
    name (:data:`PREVIOUS_PATH`) if that exists: an upgraded node keeps its cluster mode
    (``settings.source`` says which file; the daemon logs a warning about the old one).  When
    both exist and say different things (the package installed its commented example beside
    the operator's old file) the start is refused: guessing could bring a clustered node back
    with ``cluster = "off"``.
    """
    settings = Settings()
    if config is not None:
        settings = load(config)
    elif DEFAULT_PATH.exists():
        settings = load(DEFAULT_PATH)
        if PREVIOUS_PATH.exists():
            previous = load(PREVIOUS_PATH)
            if replace(previous, source=None) != replace(settings, source=None):
                raise ConfigError(
                    PREVIOUS_PATH,
                    None,
                    "",
                    f"the configuration of ulogd's old name differs from {DEFAULT_PATH}: move "
                    f"its settings to {DEFAULT_PATH} and remove it",
                )
    elif PREVIOUS_PATH.exists():
        settings = load(PREVIOUS_PATH)
    return merge(settings, overrides)
