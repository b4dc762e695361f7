"""Packaging checked with the real tools: ``systemd-analyze verify`` on the unit, the
system-call filter against what the daemon calls, ``systemd-tmpfiles`` in a scratch root,
``rst2man`` on the manual page, the example configuration, and (``--slow``) the Debian and RPM
packages built by ``dpkg-buildpackage`` and ``rpmbuild``.

Missing Debian tools are installed when running as root (as the corosync and QEMU fixtures
do); elsewhere those checks skip with the reason.
"""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from ulogd import config

ROOT = Path(__file__).resolve().parent.parent
PACKAGING = ROOT / "packaging"
UNIT = PACKAGING / "ulogd.service"
APT_ENV = dict(os.environ, DEBIAN_FRONTEND="noninteractive")


def apt_install(package: str) -> None:
    """Install Debian's ``package`` unless it is installed (root only; skips otherwise)."""
    if subprocess.run(["dpkg", "-s", package], capture_output=True).returncode == 0:
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip(f"{package} not installed (apt-get install {package})")
    apt = ["apt-get", "-q", "-y", "-o", "Dpkg::Use-Pty=0"]
    install = [*apt, "install", "--no-install-recommends", package]
    if subprocess.run(install, env=APT_ENV, capture_output=True).returncode != 0:
        subprocess.run([*apt, "update"], env=APT_ENV, capture_output=True)
        result = subprocess.run(install, env=APT_ENV, capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"apt-get install {package} failed: {result.stderr[-500:]}")


def ensure(command: str, package: str) -> str:
    """Path of ``command``, installing Debian's ``package`` first when missing (root only)."""
    search = "/usr/sbin:/usr/bin:/sbin:/bin"
    found = shutil.which(command, path=search)
    if not found:
        apt_install(package)
        found = shutil.which(command, path=search)
    if not found:
        pytest.skip(f"{package} installed no {command}")
    return found


def unit_sections() -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNIT)
    return parser


def unit_values(key: str) -> list[str]:
    return [
        line.split("=", 1)[1]
        for line in UNIT.read_text().splitlines()
        if line.startswith(f"{key}=")
    ]


def test_unit_verifies(tmp_path: Path) -> None:
    analyze = ensure("systemd-analyze", "systemd")
    # verify checks that ExecStart= exists: point it at this checkout's entry point.
    entry = Path(sys.executable).parent / "ulogd"
    assert entry.exists()
    unit = tmp_path / "ulogd.service"
    unit.write_text(UNIT.read_text().replace("/usr/bin/ulogd", str(entry)))
    result = subprocess.run(
        [analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr  # no warnings either


def test_unit_contract() -> None:
    unit = unit_sections()
    service = unit["Service"]
    assert service["Type"] == "notify"
    assert service["NotifyAccess"] == "main"
    assert service["ExecStart"].split()[:3] == ["/usr/bin/ulogd", "run", "--foreground"]
    assert re.fullmatch(r"\d+s", service["WatchdogSec"])
    assert service["RuntimeDirectory"] == "ulogd"
    assert service["RuntimeDirectoryPreserve"] == "yes"  # state must survive a restart
    assert service["StateDirectory"] == "ulogd"
    assert "corosync.service" in unit["Unit"]["Wants"]
    assert "corosync.service" in unit["Unit"]["After"]
    assert "Requires" not in unit["Unit"]  # clustering is optional
    caps = service["CapabilityBoundingSet"].split()
    assert {"CAP_NET_ADMIN", "CAP_SYS_ADMIN", "CAP_MKNOD"} <= set(caps)
    assert service["PrivateDevices"] == "no"
    assert unit_values("DeviceAllow") == ["block-* rwm"]
    assert "AF_NETLINK" in service["RestrictAddressFamilies"]
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    # one descriptor per log and the 10 000 logs docs/operations.rst promises, with room
    assert int(service["LimitNOFILE"]) >= 2 * 10_000 + 64


def _expand(analyze: str, group: str, seen: set[str]) -> set[str]:
    if group in seen:
        return set()
    seen.add(group)
    out = subprocess.run(
        [analyze, "syscall-filter", group], capture_output=True, text=True, check=True
    ).stdout
    names: set[str] = set()
    for line in out.splitlines()[1:]:
        word = line.strip()
        if not word or word.startswith("#"):
            continue
        names |= _expand(analyze, word, seen) if word.startswith("@") else {word}
    return names


def test_syscall_filter_admits_what_the_daemon_calls() -> None:
    analyze = ensure("systemd-analyze", "systemd")
    (filter_,) = unit_values("SystemCallFilter")
    allowed = set()
    for group in filter_.split():
        allowed |= _expand(analyze, group, set())
    needed = {
        "socket", "bind", "setsockopt", "getsockopt", "sendto", "recvfrom", "sendmsg",
        "recvmsg", "accept4", "listen", "connect", "epoll_create1", "epoll_ctl",
        "epoll_wait", "eventfd2", "pipe2", "mmap", "munmap", "msync", "openat", "pread64",
        "pwrite64", "fdatasync", "fsync", "ioctl", "flock", "mknodat", "renameat",
        "unlinkat", "mkdirat", "clone3", "futex", "rt_sigaction", "getpid", "lseek",
        "ftruncate", "fallocate", "newfstatat", "statx", "umask", "prctl", "kill",
        "preadv", "prlimit64",
    }  # fmt: skip
    assert needed - allowed == set()


def test_tmpfiles_create_the_directories(tmp_path: Path) -> None:
    tmpfiles = ensure("systemd-tmpfiles", "systemd")
    (tmp_path / "run").mkdir()
    (tmp_path / "var/lib").mkdir(parents=True)
    conf = PACKAGING / "tmpfiles.d/ulogd.conf"
    result = subprocess.run(
        [tmpfiles, "--create", f"--root={tmp_path}", str(conf)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    for path in ("run/ulogd", "var/lib/ulogd"):
        st = (tmp_path / path).stat()
        assert oct(st.st_mode & 0o777) == "0o700", path


def test_man_page_renders(tmp_path: Path) -> None:
    rst2man = ensure("rst2man", "python3-docutils")
    out = tmp_path / "ulogd.8"
    result = subprocess.run(
        [rst2man, "--strict", str(ROOT / "docs/ulogd.8.rst"), str(out)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    roff = out.read_text()
    assert roff.startswith('.\\"') or ".TH" in roff
    assert re.search(r'^\.TH "?ULOGD"? "?8"?', roff, re.MULTILINE), roff[:500]
    for section in ("SYNOPSIS", "DESCRIPTION", "FILES", "SIGNALS", "EXIT STATUS"):
        assert f".SH {section}" in roff
    if shutil.which("groff"):
        text = subprocess.run(
            ["groff", "-man", "-Tutf8", str(out)], capture_output=True, text=True, check=True
        ).stdout
        assert "ulogd status" in text


def test_operations_guide_is_valid_rst(tmp_path: Path) -> None:
    rst2html = ensure("rst2html", "python3-docutils")
    result = subprocess.run(
        [rst2html, "--strict", str(ROOT / "docs/operations.rst"), str(tmp_path / "ops.html")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


def test_every_cli_option_is_in_the_man_page() -> None:
    from ulogd.cli import build_parser

    page = (ROOT / "docs/ulogd.8.rst").read_text()
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command")
    for name in ("run", "status", "table"):
        sub = commands.choices[name]  # type: ignore[index]
        for action in sub._actions:
            for option in action.option_strings:
                if option in ("-h", "--help") or action.help == "==SUPPRESS==":
                    continue
                assert f"**{option}**" in page, f"ulogd {name} {option} missing from ulogd(8)"


def test_example_config_is_the_defaults(tmp_path: Path) -> None:
    text = (PACKAGING / "ulogd.toml").read_text()
    assert config.from_document(tomllib.loads(text), text=text) == config.Settings(
        source="<config>"
    )
    # Uncommented, every example value is valid (the metrics address is the one example that
    # is not a default).
    uncommented = re.sub(r"^#(\w+ = )", r"\1", text, flags=re.MULTILINE)
    path = tmp_path / "ulogd.toml"
    path.write_text(uncommented)
    settings = config.load(path)
    assert settings.metrics_listen == "127.0.0.1:9813"
    assert settings.capture == "/var/lib/ulogd/capture.pcapng"
    assert settings.run_dir == config.DEFAULT_RUN_DIR


@pytest.mark.slow
def test_debian_package_builds(tmp_path: Path) -> None:
    for command, package in (
        ("dpkg-buildpackage", "dpkg-dev"),
        ("dh", "debhelper"),
        ("dh_python3", "dh-python"),
        ("rst2man", "python3-docutils"),
    ):
        ensure(command, package)
    for package in ("pybuild-plugin-pyproject", "python3-all", "python3-setuptools"):
        apt_install(package)
    result = subprocess.run(
        [str(PACKAGING / "build-deb"), str(tmp_path)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (deb,) = tmp_path.glob("ulogd_*_all.deb")
    listing = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True).stdout
    for path in (
        "./usr/bin/ulogd",
        "./lib/systemd/system/ulogd.service",
        "./usr/lib/tmpfiles.d/ulogd.conf",
        "./usr/lib/modules-load.d/ulogd.conf",
        "./etc/ulogd/ulogd.toml",
        "./usr/share/man/man8/ulogd.8.gz",
        "/dist-packages/ulogd/control.py",
    ):
        assert path in listing, path
    info = subprocess.run(["dpkg-deb", "-I", str(deb)], capture_output=True, text=True).stdout
    assert "Conflicts: ulogd2" in info
    assert "python3-prometheus-client" in info


@pytest.mark.slow
def test_rpm_package_builds(tmp_path: Path) -> None:
    ensure("rpmbuild", "rpm")
    for command, package in (("rst2man", "python3-docutils"),):
        ensure(command, package)
    for package in ("python3-build", "python3-installer"):
        apt_install(package)
    env = dict(os.environ, RPMBUILD_FLAGS="--nodeps")
    result = subprocess.run(
        [str(PACKAGING / "build-rpm"), str(tmp_path)], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (rpm,) = tmp_path.glob("ulogd-*.noarch.rpm")
    files = subprocess.run(["rpm", "-qpl", str(rpm)], capture_output=True, text=True).stdout
    for path in (
        "/usr/bin/ulogd",
        "/usr/lib/systemd/system/ulogd.service",
        "/usr/lib/tmpfiles.d/ulogd.conf",
        "/etc/ulogd/ulogd.toml",
        "/usr/share/man/man8/ulogd.8",
        "/site-packages/ulogd/control.py",
    ):
        assert path in files, path
