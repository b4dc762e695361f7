"""The TOML configuration: defaults, file, flags over file, and errors that name line and key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ulogd.ops import config
from ulogd.ops.config import ConfigError, Settings

FULL = """\
# ulogd configuration
run_dir = "/run/dm-ulogd-test"
log_level = "debug"
capture = "/var/lib/dm-ulogd/capture.pcapng"
transport = "unix:/tmp/ulogd.sock"
node_id = 3
cluster = "corosync"

[corosync]
expected_nodes = 3
require_quorum = false

[metrics]
listen = "127.0.0.1:9813"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "dm-ulogd.toml"
    path.write_text(text)
    return path


def error_of(tmp_path: Path, text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        config.load(write(tmp_path, text))
    return info.value


def test_full_file(tmp_path: Path) -> None:
    s = config.load(write(tmp_path, FULL))
    assert s.run_dir == Path("/run/dm-ulogd-test")
    assert s.log_level == "debug"
    assert s.capture == "/var/lib/dm-ulogd/capture.pcapng"
    assert s.transport == "unix:/tmp/ulogd.sock"
    assert s.node_id == 3
    assert s.cluster == "corosync"
    assert s.expected_nodes == 3
    assert s.require_quorum is False
    assert s.metrics_listen == "127.0.0.1:9813"
    assert s.source == str(tmp_path / "dm-ulogd.toml")


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    s = config.load(write(tmp_path, "# nothing\n"))
    assert s == Settings(source=str(tmp_path / "dm-ulogd.toml"))
    assert s.run_dir == Path("/run/dm-ulogd") and s.metrics_listen is None and s.cluster == "off"


def test_empty_strings_mean_off(tmp_path: Path) -> None:
    s = config.load(write(tmp_path, 'capture = ""\n[metrics]\nlisten = ""\n'))
    assert s.capture is None and s.metrics_listen is None


def test_flags_override_file(tmp_path: Path) -> None:
    path = write(tmp_path, FULL)
    s = config.resolve(str(path), {"log_level": "warning", "node_id": None, "run_dir": "/x"})
    assert s.log_level == "warning"  # flag
    assert s.node_id == 3  # file (flag not given)
    assert s.run_dir == Path("/x")
    assert s.expected_nodes == 3


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        config.resolve(str(tmp_path / "absent.toml"), {})


@pytest.mark.parametrize(
    ("text", "line", "key", "reason"),
    [
        ('run_dir = "/run/u"\nlog_level = "loud"\n', 2, "log_level", "'loud' is not one of"),
        ('\n\nnode_id = "three"\n', 3, "node_id", "must be an integer"),
        ("node_id = -1\n", 1, "node_id", "outside 0..4294967295"),
        ('run_dir = "relative/dir"\n', 1, "run_dir", "absolute path"),
        ('cluster = "pacemaker"\n', 1, "cluster", "not one of off, corosync"),
        ('log_lvl = "info"\n', 1, "log_lvl", "unknown key"),
        ('[metrics]\nlisten = "0.0.0.0:9813"\n', 2, "metrics.listen", "not a loopback"),
        ('[metrics]\nlisten = "192.168.1.5:80"\n', 2, "metrics.listen", "loopback only"),
        ('[metrics]\n\nlisten = "localhost"\n', 3, "metrics.listen", "not HOST:PORT"),
        ('[metrics]\nport = 9813\n', 2, "metrics.port", "unknown key (known here: listen)"),
        ('cluster = "corosync"\n[corosync]\nrequire_quorum = "yes"\n', 3,
         "corosync.require_quorum", "must be true or false"),
        ('[corosync]\nexpected_nodes = 3\n', 2, "corosync.expected_nodes", 'cluster = "off"'),
        ("[cluster]\nmode = 1\n", 1, "cluster", "unknown table"),
        ('transport = "tcp:1"\n', 1, "transport", "neither 'netlink' nor"),
    ],
)
def test_errors_name_line_and_key(
    tmp_path: Path, text: str, line: int, key: str, reason: str
) -> None:
    err = error_of(tmp_path, text)
    assert err.line == line
    assert err.key == key
    assert reason in err.reason
    assert str(err).startswith(f"{tmp_path / 'dm-ulogd.toml'}:{line}: {key}: ")


def test_syntax_error_names_the_line(tmp_path: Path) -> None:
    err = error_of(tmp_path, 'run_dir = "/run/dm-ulogd"\nlog_level = info\n')
    assert err.line == 2
    assert "TOML syntax" in str(err)
    assert str(err).startswith(f"{tmp_path / 'dm-ulogd.toml'}:2: ")


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "dm-ulogd.toml"
    path.write_bytes(b'run_dir = "/run"\n# caf\xe9\n')
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert info.value.line == 2 and "UTF-8" in str(info.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9813", ("127.0.0.1", 9813)),
        ("127.1.2.3:1", ("127.1.2.3", 1)),
        ("[::1]:9813", ("::1", 9813)),
        ("localhost:9813", ("127.0.0.1", 9813)),
        ("127.0.0.1:0", ("127.0.0.1", 0)),
    ],
)
def test_listen_addresses(text: str, expected: tuple[str, int]) -> None:
    assert config.parse_listen(text) == expected


@pytest.mark.parametrize("text", ["[::]:9813", "10.0.0.1:9813", "127.0.0.1:70000", "host:1"])
def test_listen_addresses_refused(text: str) -> None:
    with pytest.raises(ValueError):
        config.parse_listen(text)


def test_run_refuses_a_bad_file_before_starting(tmp_path: Path) -> None:
    path = write(tmp_path, '[metrics]\nlisten = "0.0.0.0:9813"\n')
    result = subprocess.run(
        [sys.executable, "-m", "ulogd", "run", "-f", "--config", str(path),
         "--run-dir", str(tmp_path / "run"), "--transport", f"unix:{tmp_path}/s"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert f"{path}:2: metrics.listen:" in result.stderr
    assert "loopback" in result.stderr
    assert not (tmp_path / "run").exists()


def test_run_flag_overrides_bad_value_check(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    result = subprocess.run(
        [sys.executable, "-m", "ulogd", "run", "-f", "--config", str(path),
         "--metrics-listen", "8.8.8.8:80", "--run-dir", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert "not a loopback address" in result.stderr


@pytest.mark.parametrize(
    ("flag", "value", "words"),
    [
        ("node_id", -1, "--node-id: -1 is outside 0..4294967295"),
        ("transport", "tcp:x", "--transport: 'tcp:x' is neither 'netlink' nor"),
        ("run_dir", Path("relative/run"), "--run-dir: must be an absolute path"),
        ("capture", "capture.pcapng", "--capture: must be an absolute path"),
        ("metrics_listen", "10.0.0.1:9813", "--metrics-listen: 10.0.0.1 is not a loopback"),
    ],
)
def test_flags_get_the_checks_the_file_gets(flag: str, value: object, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.merge(Settings(), {flag: value})
    assert str(info.value).startswith(f"command line: {words}"), str(info.value)


def test_valid_flags_override_the_file(tmp_path: Path) -> None:
    base = config.load(write(tmp_path, FULL))
    s = config.merge(base, {"node_id": 7, "run_dir": Path("/run/x"), "transport": "netlink"})
    assert (s.node_id, s.run_dir, s.transport) == (7, Path("/run/x"), "netlink")
    assert s.log_level == "debug"  # not given: the file's value stays


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--node-id", "-1"], "command line: --node-id: -1 is outside"),
        (["--transport", "tcp:x"], "command line: --transport: 'tcp:x'"),
    ],
)
def test_run_refuses_a_bad_flag_like_a_bad_file(
    tmp_path: Path, args: list[str], words: str
) -> None:
    """A bad flag and the same bad value in the file both stop ``run`` with status 2 before
    anything is created."""
    path = write(tmp_path, "")
    result = subprocess.run(
        [sys.executable, "-m", "ulogd", "run", "-f", "--config", str(path),
         "--run-dir", str(tmp_path / "run"), *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"dm-ulogd: configuration: {words}"), result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "run").exists()
    in_file = write(tmp_path, "node_id = -1\n" if "--node-id" in args else 'transport = "tcp:x"\n')
    result = subprocess.run(
        [sys.executable, "-m", "ulogd", "run", "-f", "--config", str(in_file),
         "--run-dir", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2 and f"{in_file}:1:" in result.stderr


def test_the_file_of_the_old_name_is_read_when_the_new_one_is_absent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    new, old = tmp_path / "dm-ulogd/dm-ulogd.toml", tmp_path / "ulogd/ulogd.toml"
    old.parent.mkdir()
    old.write_text('cluster = "corosync"\n')
    monkeypatch.setattr(config, "DEFAULT_PATH", new)
    monkeypatch.setattr(config, "PREVIOUS_PATH", old)
    s = config.resolve(None, {})
    assert s.cluster == "corosync" and s.source == str(old)
    new.parent.mkdir()
    new.write_text("# every key commented, as the package installs it\n")
    with pytest.raises(ConfigError, match=r"differs from .*dm-ulogd\.toml: move its settings"):
        config.resolve(None, {})  # a guess could serve clustered logs with cluster off
    new.write_text('cluster = "corosync"  # moved\n')
    s = config.resolve(None, {})
    assert s.cluster == "corosync" and s.source == str(new)  # the same settings: the new file
    old.unlink()
    assert config.resolve(None, {}).source == str(new)


def test_poll_defaults_to_off_and_reads_every_mode(tmp_path: Path) -> None:
    assert Settings().poll == "off"
    assert config.load(write(tmp_path, 'poll = "off"\n')).poll == "off"
    assert config.load(write(tmp_path, 'poll = "250us"\n')).poll == "250us"
    assert config.load(write(tmp_path, "poll = 80\n")).poll == "80us"
    assert config.merge(Settings(), {"poll": "300"}).poll == "300us"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ('poll = "often"\n', "is not 'off', 'adaptive' or a budget"),
        ("poll = true\n", "must be 'off', 'adaptive' or a budget"),
        ("poll = 1000000\n", "above 100000 us"),
    ],
)
def test_bad_poll_values_name_line_and_key(tmp_path: Path, text: str, reason: str) -> None:
    err = error_of(tmp_path, text)
    assert (err.line, err.key) == (1, "poll") and reason in err.reason
