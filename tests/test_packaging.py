"""Packaging checked with the real tools: ``systemd-analyze verify`` on the unit, the
system-call filter against what the daemon calls, ``systemd-tmpfiles`` in a scratch root,
``rst2man`` on the manual page, the bash completion ``shtab`` generates, the example
configuration, the product wheel, and (``--slow``) the Debian and RPM packages built by
``dpkg-buildpackage`` and ``rpmbuild``.  Everything a package installs is named ``dm-ulogd``:
``ulogd`` is netfilter's logging daemon (Debian's ``ulogd2``: ``/usr/sbin/ulogd``, ``ulogd(8)``,
``ulogd.service``).

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

from tests.harness import apt
from ulogd.ops import config

ROOT = Path(__file__).resolve().parent.parent
PACKAGING = ROOT / "packaging"
UNIT = PACKAGING / "dm-ulogd.service"


def apt_install(package: str) -> None:
    """Install Debian's ``package`` unless it is installed (root only; skips otherwise)."""
    if not apt.missing([package]):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip(f"{package} not installed (apt-get install {package})")
    try:
        apt.install([package])
    except apt.AptError as exc:
        pytest.skip(str(exc))


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


def unit_to_verify(tmp_path: Path) -> Path:
    """The unit, copied into ``tmp_path`` with an ExecStart= that exists here (verify checks
    it): this interpreter's entry point (the venv's, or /usr/bin's when installed), else
    ``python3 -m ulogd`` (a package build)."""
    entry = Path(sys.executable).parent / "dm-ulogd"
    command = str(entry) if entry.exists() else f"{sys.executable} -m ulogd"
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("/usr/bin/dm-ulogd", command))
    assert command in unit.read_text()
    return unit


def test_unit_verifies(tmp_path: Path) -> None:
    analyze = ensure("systemd-analyze", "systemd")
    unit = unit_to_verify(tmp_path)
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
    assert service["ExecStart"].split()[:3] == ["/usr/bin/dm-ulogd", "run", "--foreground"]
    assert re.fullmatch(r"\d+s", service["WatchdogSec"])
    assert service["RuntimeDirectory"] == "dm-ulogd"
    assert service["RuntimeDirectoryPreserve"] == "yes"  # state must survive a restart
    assert service["StateDirectory"] == "dm-ulogd"
    assert service["ConfigurationDirectory"] == "dm-ulogd"
    assert unit["Unit"]["Documentation"] == "man:dm-ulogd(8)"
    # Clustering is optional: the base unit never pulls corosync in (the drop-in does).
    assert [k for k, v in unit["Unit"].items() if "corosync" in v] == []
    assert "Requires" not in unit["Unit"]
    # Early start, as cmirrord's unit: before remote file systems, stopped at shutdown.
    assert unit["Unit"]["DefaultDependencies"] == "no"
    assert {"remote-fs-pre.target", "shutdown.target"} <= set(unit["Unit"]["Before"].split())
    assert unit["Unit"]["Conflicts"] == "shutdown.target"
    assert "systemd-modules-load.service" in unit["Unit"]["After"].split()
    caps = service["CapabilityBoundingSet"].split()
    assert {"CAP_NET_ADMIN", "CAP_SYS_ADMIN", "CAP_MKNOD"} <= set(caps)
    assert service["PrivateDevices"] == "no"
    # The recovery cycle runs dmsetup: device-mapper's control node (char 10:236) is allowed.
    assert unit_values("DeviceAllow") == ["block-* rwm", "/dev/mapper/control rw"]
    assert "AF_NETLINK" in service["RestrictAddressFamilies"]
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    # one descriptor per log and the 10 000 logs docs/operations.rst promises, with room
    assert int(service["LimitNOFILE"]) >= 2 * 10_000 + 64


def test_cluster_drop_in_pulls_corosync_in(tmp_path: Path) -> None:
    analyze = ensure("systemd-analyze", "systemd")
    dropin = configparser.RawConfigParser(strict=False, delimiters=("=",))
    dropin.optionxform = str  # type: ignore[assignment,method-assign]
    dropin.read(PACKAGING / "cluster.conf")
    assert dropin.sections() == ["Unit"]
    assert dropin["Unit"]["Wants"] == "corosync.service"
    assert dropin["Unit"]["After"] == "corosync.service"
    # The unit with the drop-in still verifies (a drop-in directory beside the unit file).
    unit = unit_to_verify(tmp_path)
    (tmp_path / f"{UNIT.name}.d").mkdir()
    (tmp_path / f"{UNIT.name}.d" / "cluster.conf").write_text(
        (PACKAGING / "cluster.conf").read_text()
    )
    result = subprocess.run(
        [analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True
    )
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


#: ``systemd-analyze security`` of the unit before DefaultDependencies=no (issue 15): the
#: unit must stay at least this good
EXPOSURE_BEFORE = 3.1


def test_security_exposure_stays_as_good(tmp_path: Path) -> None:
    analyze = ensure("systemd-analyze", "systemd")
    result = subprocess.run(
        [analyze, "security", "--offline=yes", "--no-pager", str(UNIT)],
        capture_output=True,
        text=True,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= EXPOSURE_BEFORE, result.stdout


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
    conf = PACKAGING / "tmpfiles.d/dm-ulogd.conf"
    result = subprocess.run(
        [tmpfiles, "--create", f"--root={tmp_path}", str(conf)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    for path in ("run/dm-ulogd", "var/lib/dm-ulogd"):
        st = (tmp_path / path).stat()
        assert oct(st.st_mode & 0o777) == "0o700", path


def test_man_page_renders(tmp_path: Path) -> None:
    rst2man = ensure("rst2man", "python3-docutils")
    out = tmp_path / "dm-ulogd.8"
    result = subprocess.run(
        [rst2man, "--strict", str(ROOT / "docs/dm-ulogd.8.rst"), str(out)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    roff = out.read_text()
    assert roff.startswith('.\\"') or ".TH" in roff
    assert re.search(r'^\.TH "?DM-ULOGD"? "?8"?', roff, re.MULTILINE), roff[:500]
    for section in ("SYNOPSIS", "DESCRIPTION", "FILES", "SIGNALS", "EXIT STATUS"):
        assert f".SH {section}" in roff
    if shutil.which("groff"):
        text = subprocess.run(
            ["groff", "-man", "-Tutf8", str(out)], capture_output=True, text=True, check=True
        ).stdout
        assert "dm-ulogd status" in text


@pytest.mark.parametrize(
    "guide", sorted(p.name for p in (ROOT / "docs").glob("*.rst") if not p.name.endswith(".8.rst"))
)
def test_guides_are_valid_rst(tmp_path: Path, guide: str) -> None:
    rst2html = ensure("rst2html", "python3-docutils")
    result = subprocess.run(
        [rst2html, "--strict", str(ROOT / "docs" / guide), str(tmp_path / "guide.html")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


def test_every_cli_option_is_in_the_man_page() -> None:
    from ulogd.ops.cli import build_parser

    page = (ROOT / "docs/dm-ulogd.8.rst").read_text()
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command")
    assert set(commands.choices) == {"run", "status", "table", "replay"}  # type: ignore[arg-type]
    for name, sub in commands.choices.items():  # type: ignore[union-attr]
        assert f"**dm-ulogd {name}**" in page, f"dm-ulogd {name} missing from the SYNOPSIS"
        assert f"\n**{name}**\n" in page, f"dm-ulogd {name} missing from COMMANDS"
        for action in sub._actions:
            for option in action.option_strings:
                if option in ("-h", "--help") or action.help == "==SUPPRESS==":
                    continue
                assert f"**{option}**" in page, f"dm-ulogd {name} {option} missing from dm-ulogd(8)"


def test_example_config_is_the_defaults(tmp_path: Path) -> None:
    text = (PACKAGING / "dm-ulogd.toml").read_text()
    assert config.from_document(tomllib.loads(text), text=text) == config.Settings(
        source="<config>"
    )
    # Uncommented, every example value is valid (the metrics address is the one example that
    # is not a default).
    uncommented = re.sub(r"^#(\w+ = )", r"\1", text, flags=re.MULTILINE)
    path = tmp_path / "dm-ulogd.toml"
    path.write_text(uncommented)
    settings = config.load(path)
    assert settings.metrics_listen == "127.0.0.1:9813"
    assert settings.capture == "/var/lib/dm-ulogd/capture.pcapng"
    assert settings.run_dir == config.DEFAULT_RUN_DIR


def test_bash_completion_is_generated_from_the_parser(tmp_path: Path) -> None:
    """What the packages' build runs (debian/rules, the spec): a static script, no hook that
    runs Python at each TAB."""
    result = subprocess.run(
        [sys.executable, "-m", "shtab", "--shell=bash", "ulogd.ops.cli.build_parser"],
        capture_output=True, text=True, cwd=ROOT, check=True,
    )  # fmt: skip
    script = result.stdout
    assert re.search(r"^complete .* dm-ulogd$", script, re.MULTILINE), script[-300:]
    assert "python" not in script.lower()  # nothing runs at completion time
    words = {
        name: set(re.findall(r"[-\w]+", value))
        for name, value in re.findall(r"^_shtab_\w*?_(\w+)=\((.*)\)$", script, re.MULTILINE)
    }
    assert {"run", "status", "table", "replay"} <= words["subparsers"], words
    for command, option in (("run", "--metrics-listen"), ("status", "--wide"),
                            ("table", "--create"), ("replay", "--until")):  # fmt: skip
        assert option in words[f"{command}_option_strings"], (command, option)
    path = tmp_path / "dm-ulogd"
    path.write_text(script)
    bash = shutil.which("bash")
    assert bash is not None
    check = subprocess.run(
        [bash, "-c", f'source {path} && complete -p dm-ulogd'], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stderr
    assert check.stdout.strip().endswith(" dm-ulogd")


def test_the_product_wheel_holds_no_test_harness(tmp_path: Path) -> None:
    """ulogd/testing (QEMU harness, corosync clusters, guest scripts) stays in the tree."""
    import zipfile
    from importlib.util import find_spec

    out = tmp_path / "wheel"
    if find_spec("build") and find_spec("wheel"):  # a package build: offline, system setuptools
        command = ["-m", "build", "--wheel", "--no-isolation", "--skip-dependency-check",
                   "--outdir", str(out), str(ROOT)]  # fmt: skip
    else:  # a venv: pip builds with the build-system requirements of pyproject.toml
        command = ["-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(ROOT)]
    result = subprocess.run(
        [sys.executable, *command], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = out.glob("dm_ulogd-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "ulogd/ops/cli.py" in names and "cpg/handle.py" in names
    assert not [n for n in names if n.startswith("ulogd/testing")]
    assert not [n for n in names if n.startswith("tests/")]
    dist = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
    assert any(n.startswith(dist) and n.endswith("LICENSE") for n in names), names
    entry_points = zipfile.ZipFile(wheel).read(f"{dist}/entry_points.txt").decode()
    assert "dm-ulogd = ulogd.ops.cli:main" in entry_points
    assert re.search(r"^ulogd\s*=", entry_points, re.MULTILINE) is None  # not netfilter's name
    metadata = zipfile.ZipFile(wheel).read(f"{dist}/METADATA").decode()
    # Debian 12's version; see docs/operations.rst.  (Older setuptools write "bitarray (>=...)".)
    assert re.search(r"^Requires-Dist: bitarray ?\(?>=2\.7\.3\)?$", metadata, re.MULTILINE)


# Nothing a package installs may carry netfilter's names (Debian's ulogd2 owns them).
FOREIGN = ("/usr/bin/ulogd", "/usr/sbin/ulogd", "man8/ulogd.8", "/ulogd.service", "/etc/ulogd/")


@pytest.mark.slow
def test_debian_package_builds(tmp_path: Path) -> None:
    for command, package in (
        ("dpkg-buildpackage", "dpkg-dev"),
        ("dh", "debhelper"),
        ("dh_python3", "dh-python"),
        ("rst2man", "python3-docutils"),
    ):
        ensure(command, package)
    for package in (
        *("pybuild-plugin-pyproject", "python3-all", "python3-setuptools", "python3-wheel"),
        "python3-shtab",
        *("python3-bitarray", "python3-cffi", "python3-prometheus-client"),
        *("python3-pytest", "python3-hypothesis"),
    ):
        apt_install(package)
    result = subprocess.run(
        [str(PACKAGING / "build-deb"), str(tmp_path)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(r"\d+ passed", result.stdout), "the unit tier did not run at build time"
    (deb,) = tmp_path.glob("dm-ulogd_*_all.deb")
    listing = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True).stdout
    for path in (
        "./usr/bin/dm-ulogd",
        "./lib/systemd/system/dm-ulogd.service",
        "./usr/lib/tmpfiles.d/dm-ulogd.conf",
        "./usr/lib/modules-load.d/dm-ulogd.conf",
        "./etc/dm-ulogd/dm-ulogd.toml",
        "./usr/share/man/man8/dm-ulogd.8.gz",
        "./usr/share/bash-completion/completions/dm-ulogd",
        "./usr/share/doc/dm-ulogd/copyright",
        "./usr/share/doc/dm-ulogd/migrating-from-cmirrord.rst",
        "./usr/share/doc/dm-ulogd/examples/prometheus-alerts.yml",
        "/dist-packages/ulogd/ops/control.py",
        "/dist-packages/cpg/handle.py",
    ):
        assert path in listing, path
    for path in (*FOREIGN, "/ulogd/testing/"):
        assert path not in listing, path
    info = subprocess.run(["dpkg-deb", "-I", str(deb)], capture_output=True, text=True).stdout
    assert "Package: dm-ulogd" in info
    assert "Conflicts:" not in info
    assert "Breaks: ulogd (<= 0.1.0)" in info and "Replaces: ulogd (<= 0.1.0)" in info
    assert "python3-bitarray (>= 2.7.3)" in info
    assert "python3-prometheus-client" in info


@pytest.mark.slow
def test_rpm_package_builds(tmp_path: Path) -> None:
    ensure("rpmbuild", "rpm")
    for command, package in (("rst2man", "python3-docutils"),):
        ensure(command, package)
    for package in (
        *("python3-build", "python3-installer", "python3-shtab"),
        *("python3-bitarray", "python3-cffi", "python3-prometheus-client"),
        *("python3-pytest", "python3-hypothesis"),
    ):
        apt_install(package)
    env = dict(os.environ, RPMBUILD_FLAGS="--nodeps")
    result = subprocess.run(
        [str(PACKAGING / "build-rpm"), str(tmp_path)], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(r"\d+ passed", result.stdout + result.stderr), "%check ran no test"
    (rpm,) = tmp_path.glob("dm-ulogd-*.noarch.rpm")
    files = subprocess.run(["rpm", "-qpl", str(rpm)], capture_output=True, text=True).stdout
    for path in (
        "/usr/bin/dm-ulogd",
        "/usr/lib/systemd/system/dm-ulogd.service",
        "/usr/lib/tmpfiles.d/dm-ulogd.conf",
        "/etc/dm-ulogd/dm-ulogd.toml",
        "/usr/share/man/man8/dm-ulogd.8",
        "/usr/share/bash-completion/completions/dm-ulogd",
        "/LICENSE",
        "/site-packages/ulogd/ops/control.py",
    ):
        assert path in files, path
    for path in (*FOREIGN, "/ulogd/testing/"):
        assert path not in files, path
    info = subprocess.run(["rpm", "-qpi", str(rpm)], capture_output=True, text=True).stdout
    assert re.search(r"^Name\s*: dm-ulogd$", info, re.MULTILINE), info
    licensed = subprocess.run(["rpm", "-qpL", str(rpm)], capture_output=True, text=True).stdout
    assert licensed.strip().endswith("/LICENSE"), licensed
