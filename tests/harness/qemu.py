"""Boot a real Debian kernel under QEMU and run a command in it: the e2e test harness.

Theory of operation
===================

The end-to-end tier needs the *real* ``dm-log-userspace`` kernel module talking to ulogd over
the netlink connector, which a container cannot offer.  So each scenario boots a throwaway
virtual machine:

* **Accelerator.**  The machines this runs on offer no usable KVM, so QEMU runs in TCG mode
  (``-accel tcg,thread=multi -cpu max``), which is 20-50x slower than native for CPU-bound
  work.  Measured on a 2-core host (ranges: idle to heavily loaded): boot to the guest's
  prompt 11-28 s; ``python3 -c 'import sys'`` 1.5-2 s; ulogd from start to ready (Python
  imports) 14-40 s; 4 KiB O_DIRECT mirror writes served by ulogd ~3-10/s.
* **Kernel.**  Debian's stock ``linux-image-<abi>-amd64`` package (the one the
  ``linux-image-amd64`` metapackage currently points at) is fetched with ``apt-get download``
  and unpacked with ``dpkg-deb -x`` (never installed on the host); ``depmod -b`` indexes its
  modules.  Device-mapper, the mirror target and ``dm-log-userspace`` are modules there.
* **Initramfs.**  A tiny ``newc`` archive written by this module: ``busybox`` from Debian's
  ``busybox-static``, the handful of ``.ko`` files needed to reach the root (virtio, ext4, 9p,
  overlay and their dependencies, resolved through ``modules.dep``) and
  ``guest/initramfs-init.sh``.  That script mounts the read-only root image, puts a tmpfs
  overlay on top, mounts the checkout read-write over virtio-9p at the *same absolute path* as
  on the host and ``switch_root`` into ``guest/init.sh`` of the checkout (read live, so
  editing it needs no rebuild).  The checkout is mounted with ``cache=loose``: a boot does
  not see host edits made while it runs, and its own writes (results, ``__pycache__``, which
  git ignores) reach the host when it syncs before powering off.
* **Guest root.**  ``debootstrap --variant=minbase bookworm`` from the host's own Debian
  mirror (read from the apt sources) with python3, dmsetup, fio, corosync, ... .  The tree,
  the kernel's modules and the Python dependencies are packed into one ext4 image attached
  read-only as a virtio disk: one cached image serves every boot, also concurrent ones.  (A
  9p root works too, but every file lookup is a trip through the emulated virtio queue and
  Python's start-up made it several times slower.)
* **Python dependencies.**  The guest has no network, so ulogd's runtime dependencies are
  installed on the host with ``pip install --target`` for CPython 3.11 / manylinux, at exactly
  the versions the host venv has, byte-compiled on the host, and put into the image as
  ``/opt/ulogd-pydeps``, which the guest puts on ``PYTHONPATH`` after the checkout.
* **Running a command.**  :func:`run_in_guest` creates a run directory under
  ``.cache/qemu/runs/``, writes the command to ``cmd.sh`` there and passes the directory on
  the kernel command line.  ``guest/init.sh`` prepares the guest (proc/sys/tmpfs, modules,
  ``DM_DISABLE_UDEV=1``), runs ``cmd.sh`` with the run directory as working directory, writes
  its exit status to ``rc`` and powers the machine off through sysrq; QEMU runs with
  ``-no-reboot`` and the kernel with ``panic=-1`` so it always terminates.  A checkout
  under a directory that ``init.sh`` covers with a fresh tmpfs (``/tmp``, ``/run``) is
  mounted again on top; a guest given a run directory in which it finds no ``cmd.sh`` says
  so and powers off at once (only a boot without a run directory gets a shell).  Run
  directories must be inside the checkout as the guest sees it: with a ``.cache`` symlinked
  out of the checkout they go to ``.e2e-runs/`` (:func:`runs_dir`).
* **systemd flavour.**  ``prepare("systemd")`` builds a second root and image
  (``sdroot-*``) with systemd and udev; its boots pass ``ulogd.init=systemd`` and
  ``init.sh`` hands PID 1 over to systemd, which runs ``cmd.sh`` as a service
  (``ulogd-e2e-run.service``) and powers off after it.  The default flavour's artefacts
  and boots are unchanged.  Scenario scripts
  write structured results (``result.json``) into the run directory; the serial console is
  captured in ``console.log`` beside it.  The host enforces a wall-clock timeout and kills
  QEMU when it is exceeded.

Caching
=======

Everything lives under ``.cache/qemu/`` in the checkout.  Each artefact's directory name
carries a short hash of its inputs (kernel package and version, guest package list, mirror,
pinned Python versions, the initramfs script and module list), so changing an input builds a
new artefact and an unchanged one is reused.  Artefacts are built in a temporary directory and
renamed into place when complete, so an interrupted build is never mistaken for a good one.
The first build on a fresh machine installs the host packages it needs with apt (QEMU,
debootstrap, busybox-static, kmod) and takes 1.5-3 minutes: kernel download and unpack ~9 s,
debootstrap ~60 s, the Python dependencies a few seconds, the ext4 image ~18 s.  Stale builds
of other input hashes are deleted when a new one is published.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import gzip
import hashlib
import importlib.metadata
import io
import json
import logging
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from tests.harness import apt

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache" / "qemu"
GUEST_DIR = Path(__file__).resolve().parent / "guest"


def runs_dir(repo: Path = REPO, cache: Path = CACHE) -> Path:
    """Where run directories go: inside the checkout *as the guest sees it*.

    The guest mounts only the checkout (at its host path), so a run directory must resolve
    inside it: ``.cache/qemu/runs`` normally, ``.e2e-runs`` when ``.cache`` is a symlink
    out of the checkout (a worktree sharing another checkout's artefacts), whose target the
    guest cannot see.
    """
    runs = cache / "runs"
    real_repo = repo.resolve()
    if runs.resolve().is_relative_to(real_repo):
        return runs
    return real_repo / ".e2e-runs"


RUNS = runs_dir()

SUITE = "bookworm"
#: Packages debootstrap adds to the minbase guest root.
GUEST_PACKAGES: tuple[str, ...] = (
    "python3",
    "dmsetup",
    "kmod",
    "util-linux",
    "procps",
    "fio",
    "corosync",
    "libcpg4",
    "iproute2",
)
#: More packages for the systemd flavour of the guest (systemd as PID 1, udev running): a
#: separate root and image, so that the busybox-init boots keep their own, unchanged.
SYSTEMD_PACKAGES: tuple[str, ...] = ("systemd", "udev")
#: guest flavours: (artefact name prefix, packages)
FLAVOURS: dict[str, tuple[str, tuple[str, ...]]] = {
    "init": ("root", GUEST_PACKAGES),
    "systemd": ("sdroot", GUEST_PACKAGES + SYSTEMD_PACKAGES),
}
#: Modules the initramfs loads before it can mount the root (dependencies are added).
INITRAMFS_MODULES: tuple[str, ...] = (
    "virtio_pci",
    "virtio_rng",
    "virtio_blk",
    "crc32c_generic",
    "ext4",
    "9pnet_virtio",
    "9p",
    "overlay",
)
#: Host commands the harness needs, with the Debian package that provides each.
HOST_TOOLS: dict[str, str] = {
    "qemu-system-x86_64": "qemu-system-x86",
    "debootstrap": "debootstrap",
    "/bin/busybox": "busybox-static",
    "dpkg-deb": "dpkg",
    "depmod": "kmod",
    "mkfs.ext4": "e2fsprogs",
}
#: ulogd's runtime dependencies, installed for the guest at the host venv's versions.
PY_DEPENDENCIES: tuple[str, ...] = ("bitarray", "cffi", "pycparser")

QEMU_BASE_ARGS: tuple[str, ...] = (
    "-accel", "tcg,thread=multi",
    "-cpu", "max",
    "-nodefaults",
    "-no-reboot",
    "-display", "none",
    "-vga", "none",
)  # fmt: skip



class HarnessError(RuntimeError):
    """The harness could not prepare or boot the guest."""


# ---------------------------------------------------------------------------------------------
# small helpers


def _run(
    cmd: Sequence[str | os.PathLike[str]],
    *,
    env: dict[str, str] | None = None,
    capture: bool = True,
    check: bool = True,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a host command, raising :class:`HarnessError` with its output on failure."""
    argv = [os.fspath(c) for c in cmd]
    log.info("run: %s", shlex.join(argv))
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(
        argv,
        env=full_env,
        cwd=cwd,
        text=True,
        stdout=subprocess.PIPE if capture else None,
        stderr=subprocess.STDOUT if capture else None,
        check=False,
    )
    if check and proc.returncode != 0:
        tail = (proc.stdout or "")[-4000:]
        raise HarnessError(f"command failed ({proc.returncode}): {shlex.join(argv)}\n{tail}")
    return proc


def _digest(*parts: object) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(repr(part).encode())
        h.update(b"\0")
    return h.hexdigest()[:12]


@contextlib.contextmanager
def _build_lock(name: str) -> Iterator[None]:
    """Serialise builds of one artefact between concurrent test processes."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f".{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _publish(tmp: Path, final: Path) -> None:
    """Atomically move a finished build into place."""
    if final.exists():
        shutil.rmtree(final) if final.is_dir() else final.unlink()
    os.replace(tmp, final)


def _prune(pattern: str, keep: Path) -> None:
    """Remove stale builds of the same artefact (other input hashes)."""
    for old in CACHE.glob(pattern):
        if old != keep and not old.name.endswith(".tmp") and old.suffix == keep.suffix:
            log.info("removing stale artefact %s", old)
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()


# ---------------------------------------------------------------------------------------------
# host packages


def _tool_present(tool: str) -> bool:
    return Path(tool).exists() if tool.startswith("/") else shutil.which(tool) is not None


def ensure_host_packages(extra: Iterable[str] = ()) -> None:
    """Install (with apt) whatever host packages the harness needs and are missing."""
    missing = sorted({pkg for tool, pkg in HOST_TOOLS.items() if not _tool_present(tool)})
    missing += [p for p in extra if p not in missing]
    if not missing:
        return
    log.info("installing host packages: %s", " ".join(missing))
    apt.install(missing)


def debian_mirror() -> str:
    """The host's Debian archive URI serving the ``bookworm`` suite (for debootstrap)."""
    candidates: list[tuple[str, list[str]]] = []
    sources = Path("/etc/apt/sources.list.d")
    for path in sorted(sources.glob("*.sources")) if sources.is_dir() else []:
        for stanza in re.split(r"\n\s*\n", path.read_text()):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if line.startswith("#") or ":" not in line:
                    continue
                key, _, value = line.partition(":")
                fields[key.strip().lower()] = value.strip()
            if fields.get("enabled", "yes").lower() == "no":
                continue
            if "deb" not in fields.get("types", "").split():
                continue
            for uri in fields.get("uris", "").split():
                candidates.append((uri, fields.get("suites", "").split()))
    list_files = [Path("/etc/apt/sources.list"), *sorted(sources.glob("*.list"))]
    for path in list_files:
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
            if len(words) >= 3 and words[0] == "deb":
                candidates.append((words[1], [words[2]]))
    for uri, suites in candidates:
        if SUITE in suites and "security" not in uri:
            return uri.rstrip("/")
    raise HarnessError(f"no apt source for suite {SUITE!r} found in /etc/apt")


# ---------------------------------------------------------------------------------------------
# kernel


@dataclasses.dataclass(frozen=True)
class Kernel:
    """An unpacked Debian kernel package."""

    root: Path  # the dpkg-deb -x tree
    release: str  # e.g. 6.1.0-56-amd64

    @property
    def vmlinuz(self) -> Path:
        return self.root / "boot" / f"vmlinuz-{self.release}"

    @property
    def modules(self) -> Path:
        """The directory to be mounted on the guest's ``/lib/modules``."""
        return self.root / "lib" / "modules"


def _kernel_package() -> tuple[str, str]:
    """(package name, version) of the kernel image the metapackage depends on."""
    for attempt in range(2):
        proc = _run(["apt-cache", "depends", "linux-image-amd64"], check=False)
        names = re.findall(r"Depends:\s+(linux-image-[\d.]+-\d+-amd64)\b", proc.stdout or "")
        if names:
            name = names[0]
            policy = _run(["apt-cache", "policy", name]).stdout
            match = re.search(r"Candidate:\s+(\S+)", policy)
            if match and match.group(1) != "(none)":
                return name, match.group(1)
        if attempt == 0:
            apt.update()
    raise HarnessError("cannot resolve linux-image-amd64 with apt-cache")


def build_kernel() -> Kernel:
    """Download and unpack the kernel package (cached)."""
    existing = sorted(CACHE.glob("kernel-*/.complete"))
    try:
        name, version = _kernel_package()
    except HarnessError:
        if not existing:
            raise
        final = existing[-1].parent  # offline: reuse what we have
        return Kernel(final, (final / ".release").read_text().strip())
    final = CACHE / f"kernel-{_digest(name, version)}"
    with _build_lock("kernel"):
        if not (final / ".complete").exists():
            t0 = time.monotonic()
            tmp = Path(tempfile.mkdtemp(prefix="kernel-", suffix=".tmp", dir=CACHE))
            _run(["apt-get", "download", f"{name}={version}"], cwd=tmp)
            (deb,) = tmp.glob("*.deb")
            tree = tmp / "tree"
            _run(["dpkg-deb", "-x", deb, tree])
            deb.unlink()
            releases = [p.name for p in (tree / "lib" / "modules").iterdir()]
            if len(releases) != 1:
                raise HarnessError(f"unexpected module trees in {name}: {releases}")
            release = releases[0]
            _run(["depmod", "-b", tree, release])
            for entry in tree.iterdir():
                entry.rename(tmp / entry.name)
            tree.rmdir()
            (tmp / ".release").write_text(release + "\n")
            (tmp / ".package").write_text(f"{name}={version}\n")
            (tmp / ".complete").write_text("")
            _publish(tmp, final)
            log.info("kernel %s unpacked in %.1f s", release, time.monotonic() - t0)
            _prune("kernel-*", final)
    return Kernel(final, (final / ".release").read_text().strip())


# ---------------------------------------------------------------------------------------------
# initramfs


def _module_closure(kernel: Kernel, wanted: Iterable[str]) -> list[str]:
    """Relative paths of the wanted modules and their dependencies, in load order."""
    moddir = kernel.modules / kernel.release
    deps: dict[str, list[str]] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        mod, _, rest = line.partition(":")
        deps[mod] = rest.split()
    by_name = {Path(p).name.split(".ko")[0].replace("-", "_"): p for p in deps}
    builtin = {
        Path(p).name.split(".ko")[0].replace("-", "_")
        for p in (moddir / "modules.builtin").read_text().split()
    }
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for dep in reversed(deps[path]):  # modules.dep lists the deepest dependency last
            visit(dep)
        order.append(path)

    for name in wanted:
        key = name.replace("-", "_")
        if key in by_name:
            visit(by_name[key])
        elif key not in builtin:
            raise HarnessError(f"kernel {kernel.release} has no module {name}")
    return order


class _Cpio:
    """Minimal writer for the ``newc`` cpio format the kernel unpacks as initramfs."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", nlink: int = 1) -> None:
        encoded = name.encode() + b"\0"
        fields = [self.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, 0, 0, len(encoded), 0]
        self.ino += 1
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self.buf.write(header + encoded)
        self.buf.write(b"\0" * (-(len(header) + len(encoded)) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))

    def directory(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755, nlink=2)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0, nlink=1)
        return self.buf.getvalue()


def build_initramfs(kernel: Kernel) -> Path:
    """Write (cached) the busybox initramfs that mounts the root image and the 9p checkout."""
    init = (GUEST_DIR / "initramfs-init.sh").read_bytes()
    busybox = Path("/bin/busybox")
    modules = _module_closure(kernel, INITRAMFS_MODULES)
    key = _digest(kernel.release, kernel.root.name, init, modules, busybox.stat().st_size)
    final = CACHE / f"initramfs-{key}.cpio.gz"
    with _build_lock("initramfs"):
        if final.exists():
            return final
        cpio = _Cpio()
        for d in ("bin", "dev", "proc", "sys", "lib", "lib/modules", "newroot", "lower", "rw"):
            cpio.directory(d)
        cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
        cpio.symlink("bin/sh", "busybox")
        cpio.file("init", init, 0o755)
        names = []
        for rel in modules:
            name = Path(rel).name
            names.append(name)
            data = (kernel.modules / kernel.release / rel).read_bytes()
            cpio.file(f"lib/modules/{name}", data)
        cpio.file("lib/modules/load-order", ("\n".join(names) + "\n").encode())
        tmp = final.with_suffix(".tmp")
        tmp.write_bytes(gzip.compress(cpio.finish(), compresslevel=6))
        os.replace(tmp, final)  # old initramfs files are tiny: never pruned
    return final


# ---------------------------------------------------------------------------------------------
# guest root and Python dependencies


def build_rootfs(flavour: str = "init") -> Path:
    """debootstrap (cached) the read-only guest root of a flavour (see :data:`FLAVOURS`)."""
    prefix, packages = FLAVOURS[flavour]
    mirror = debian_mirror()
    key = _digest(SUITE, mirror, packages, "minbase", 1)
    final = CACHE / f"{prefix}-{key}"
    with _build_lock(prefix):
        if (final / ".complete").exists():
            return final
        t0 = time.monotonic()
        tmp = Path(tempfile.mkdtemp(prefix=f"{prefix}-", suffix=".tmp", dir=CACHE))
        try:
            _run(
                [
                    "debootstrap",
                    "--variant=minbase",
                    f"--include={','.join(packages)}",
                    SUITE,
                    tmp,
                    mirror,
                ],
                env=apt.ENV,
            )
            for deb in (tmp / "var/cache/apt/archives").glob("*.deb"):
                deb.unlink()
            (tmp / "etc/hostname").write_text("ulogd-e2e\n")
            (tmp / "etc/fstab").write_text("")
            (tmp / ".complete").write_text(f"built in {time.monotonic() - t0:.0f} s\n")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _publish(tmp, final)
        log.info("guest root built in %.0f s", time.monotonic() - t0)
        _prune(f"{prefix}-*", final)
    return final


def _pinned_dependencies() -> list[str]:
    pins = []
    for name in PY_DEPENDENCIES:
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pins.append(name)
    return pins


def build_pydeps() -> Path:
    """pip-install (cached) ulogd's dependencies for the guest's CPython 3.11."""
    pins = _pinned_dependencies()
    final = CACHE / f"pydeps-{_digest(pins, 'cp311', 'manylinux_2_17_x86_64')}"
    with _build_lock("pydeps"):
        if (final / ".complete").exists():
            return final
        tmp = Path(tempfile.mkdtemp(prefix="pydeps-", suffix=".tmp", dir=CACHE))
        try:
            _run(
                [
                    sys.executable, "-m", "pip", "install", "--quiet", "--no-compile",
                    "--disable-pip-version-check", "--target", tmp,
                    "--only-binary=:all:", "--implementation", "cp", "--python-version", "3.11",
                    "--abi", "cp311", "--abi", "abi3", "--abi", "none",
                    "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64",
                    "--platform", "any", *pins,
                ]
            )  # fmt: skip
            # Compile on the host (same 3.11 bytecode): importing uncompiled pyroute2 under
            # TCG costs many seconds per boot, and the guest must not write into the cache.
            _run([sys.executable, "-m", "compileall", "-q", "-j", "0", tmp])
            (tmp / ".complete").write_text("\n".join(pins) + "\n")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _publish(tmp, final)
        _prune("pydeps-*", final)
    return final


GUEST_PYDEPS = "/opt/ulogd-pydeps"


def build_image(root: Path, kernel: Kernel, pydeps: Path) -> Path:
    """Pack root + kernel modules + Python dependencies into a read-only ext4 image (cached).

    9p costs a round trip through the emulated virtio queue for every lookup, which made a
    bare ``python3 -c 'import pyroute2'`` take ~45 s under TCG; a block device with the
    guest's own page cache avoids that.
    """
    prefix = root.name.rsplit("-", 1)[0]  # one image per root flavour
    final = CACHE / f"{prefix}-{_digest(root.name, kernel.root.name, pydeps.name, 1)}.ext4"
    with _build_lock("image" if prefix == "root" else f"{prefix}-image"):
        if final.exists():
            return final
        t0 = time.monotonic()
        staging = Path(tempfile.mkdtemp(prefix="image-", suffix=".tmp", dir=CACHE))
        tmp = final.with_suffix(".tmp")
        try:
            tree = staging / "tree"
            _run(["cp", "-a", "--link", root, tree])
            (tree / ".complete").unlink()
            moddir = tree / "usr" / "lib" / "modules"
            moddir.mkdir(parents=True, exist_ok=True)
            _run(["cp", "-a", "--link", kernel.modules / kernel.release, moddir])
            _run(["cp", "-a", "--link", pydeps, tree / GUEST_PYDEPS.lstrip("/")])
            used = int(_run(["du", "-s", "--block-size=1M", tree]).stdout.split()[0])
            size_mb = int(used * 1.25) + 128
            _run(
                [
                    "mkfs.ext4", "-q", "-F", "-L", "ulogdroot", "-O", "^has_journal",
                    "-E", "root_owner=0:0", "-d", tree, tmp, f"{size_mb}M",
                ]
            )  # fmt: skip
            os.replace(tmp, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            tmp.unlink(missing_ok=True)
        log.info("root image built in %.1f s", time.monotonic() - t0)
        _prune(f"{prefix}-*.ext4", final)
    return final


@dataclasses.dataclass(frozen=True)
class Artefacts:
    kernel: Kernel
    initramfs: Path
    image: Path
    flavour: str = "init"


def prepare(flavour: str = "init") -> Artefacts:
    """Install host tools and build (or reuse) every artefact a boot needs.

    ``flavour`` "init" boots ``guest/init.sh`` as PID 1 (the default, fast); "systemd" boots
    an image with systemd and udev, where ``guest/init.sh`` hands PID 1 over to systemd, which
    runs the command as a service (see :func:`start_guest`).
    """
    ensure_host_packages()
    kernel = build_kernel()
    initramfs = build_initramfs(kernel)
    image = build_image(build_rootfs(flavour), kernel, build_pydeps())
    return Artefacts(kernel, initramfs, image, flavour)


# ---------------------------------------------------------------------------------------------
# booting


@dataclasses.dataclass
class GuestRun:
    """What one boot produced."""

    run_dir: Path
    returncode: int | None  # exit status of cmd.sh, None if it never finished
    timed_out: bool
    wall_seconds: float
    console: str

    @property
    def result(self) -> dict[str, Any] | None:
        """``result.json`` written by a guest scenario script, if any."""
        path = self.run_dir / "result.json"
        if not path.exists():
            return None
        loaded: dict[str, Any] = json.loads(path.read_text())
        return loaded

    def artefact(self, name: str) -> str:
        """A text file the guest left in the run directory ('' if missing)."""
        path = self.run_dir / name
        return path.read_text(errors="replace") if path.exists() else ""

    def describe(self, tail: int = 200) -> str:
        """Human-readable diagnostics for an assertion message."""
        lines = self.console.splitlines()[-tail:]
        return (
            f"run dir: {self.run_dir}\nrc={self.returncode} timed_out={self.timed_out} "
            f"wall={self.wall_seconds:.1f}s\n--- console (last {tail} lines) ---\n"
            + "\n".join(lines)
        )


def kernel_cmdline(art: Artefacts, run_dir: Path | None, extra: str = "") -> str:
    parts = [
        "console=ttyS0",
        "panic=-1",
        "loglevel=5",
        "rdinit=/init",
        f"ulogd.work={REPO}",
    ]
    if run_dir is not None:
        parts.append(f"ulogd.run={run_dir}")
    if art.flavour == "systemd":
        parts.append("ulogd.init=systemd")
    if extra:
        parts.append(extra)
    return " ".join(parts)


def qemu_argv(
    art: Artefacts,
    cmdline: str,
    *,
    serial: Sequence[str],
    smp: int = 2,
    memory_mb: int = 2048,
    extra: Sequence[str] = (),
) -> list[str]:
    return [
        "qemu-system-x86_64",
        *QEMU_BASE_ARGS,
        "-smp", str(smp),
        "-m", str(memory_mb),
        "-kernel", str(art.kernel.vmlinuz),
        "-initrd", str(art.initramfs),
        "-append", cmdline,
        "-device", "virtio-rng-pci",
        "-drive", f"file={art.image},format=raw,if=none,id=root,readonly=on",
        "-device", "virtio-blk-pci,drive=root,serial=ulogdroot",
        "-fsdev", f"local,id=work,path={REPO},security_model=none",
        "-device", "virtio-9p-pci,fsdev=work,mount_tag=ulogdwork",
        *serial,
        *extra,
    ]  # fmt: skip


def shared_disk_args(
    index: int, image: Path, serial: str, *, write_iops: int | None = None
) -> list[str]:
    """QEMU arguments attaching a raw image that another guest attaches too.

    ``cache=none`` (O_DIRECT: both guests see each other's writes; so the image must not be on
    tmpfs), no image locking, ``share-rw`` on the device; the guest finds it by ``serial``.
    ``write_iops`` throttles this guest's writes to it (QEMU's block throttling): writes queue
    in QEMU, so a guest killed meanwhile leaves them unwritten.
    """
    throttle = f",throttling.iops-write={write_iops}" if write_iops else ""
    return [
        "-drive", f"file={image},format=raw,if=none,id=shared{index},cache=none,aio=threads,"
                  f"file.locking=off{throttle}",
        "-device", f"virtio-blk-pci,drive=shared{index},serial={serial},share-rw=on",
    ]  # fmt: skip


def link_args(local: Path, remote: Path, mac: str) -> list[str]:
    """A virtio-net device whose frames go to ``remote`` and come from ``local``: two unix
    datagram sockets make a private point-to-point link between two guests (no host network;
    either side may start first)."""
    return [
        "-netdev", f"dgram,id=link,local.type=unix,local.path={local},"
                   f"remote.type=unix,remote.path={remote}",
        "-device", f"virtio-net-pci,netdev=link,mac={mac}",
    ]  # fmt: skip


def _die_with_parent() -> None:
    """In the QEMU child: get SIGKILL when the test process dies (no orphaned guests)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def new_run_dir(name: str) -> Path:
    RUNS.mkdir(parents=True, exist_ok=True)
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", name)[:60]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(tempfile.mkdtemp(prefix=f"{safe}-{stamp}-", dir=RUNS))


class Guest:
    """A QEMU running in the background: :meth:`wait` for its :class:`GuestRun`, or
    :meth:`kill` it (``kill -9``, the power cord).  ``events`` is a second serial port the
    guest can write progress lines to (``/dev/ttyS1``); the host reads it while it runs."""

    def __init__(self, run_dir: Path, argv: list[str], timeout: float) -> None:
        self.run_dir = run_dir
        self.timeout = timeout
        self.killed_at: float | None = None
        (run_dir / "qemu-argv.json").write_text(json.dumps(argv, indent=1))
        self.t0 = time.monotonic()
        with open(run_dir / "qemu.log", "w") as qlog:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=qlog, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=_die_with_parent,
            )  # fmt: skip

    @property
    def events_path(self) -> Path:
        return self.run_dir / "events.log"

    def events(self) -> list[str]:
        """The lines the guest wrote to its events port so far."""
        try:
            return self.events_path.read_text(errors="replace").splitlines()
        except OSError:
            return []

    def wait_event(self, prefix: str, timeout: float) -> str:
        """Wait for an events line starting with ``prefix``; HarnessError if the guest ends
        or the time runs out first."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.events():
                if line.startswith(prefix):
                    return line
            if self.proc.poll() is not None:
                raise HarnessError(f"guest {self.run_dir.name} ended before {prefix!r}")
            if time.monotonic() > deadline:
                raise HarnessError(f"no {prefix!r} from guest {self.run_dir.name} in {timeout} s")
            time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL the QEMU process: the guest's in-flight I/O never completes."""
        self.killed_at = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def wait(self) -> GuestRun:
        """Wait for the guest to power off (killing it at its timeout)."""
        timed_out = False
        remaining = self.timeout - (time.monotonic() - self.t0)
        try:
            self.proc.wait(timeout=max(remaining, 1.0))
        except subprocess.TimeoutExpired:
            timed_out = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        wall = time.monotonic() - self.t0
        rc_file = self.run_dir / "rc"
        rc = int(rc_file.read_text().strip()) if rc_file.exists() else None
        console = self.run_dir / "console.log"
        text = console.read_text(errors="replace") if console.exists() else ""
        qemu_out = (self.run_dir / "qemu.log").read_text(errors="replace")
        if self.proc.returncode not in (0, -signal.SIGKILL) and not text:
            raise HarnessError(f"qemu failed ({self.proc.returncode}):\n{qemu_out[-3000:]}")
        return GuestRun(self.run_dir, rc, timed_out, wall, text)


def start_guest(
    script: str,
    *,
    name: str = "run",
    timeout: float = 300,
    art: Artefacts | None = None,
    smp: int = 2,
    memory_mb: int = 2048,
    files: dict[str, str] | None = None,
    extra: Sequence[str] = (),
    cmdline: str = "",
) -> Guest:
    """Boot the guest in the background to run the shell ``script`` (as ``sh cmd.sh`` in the
    run dir) and power off.

    ``files`` are written into the run directory first (e.g. scenario parameters).  The guest
    sees the checkout at its host path; ``$ULOGD_RUN`` is the run directory, ``$ULOGD_SRC``
    the checkout, ``$ULOGD_GUEST`` this package's ``guest/`` directory.  ``extra`` are more
    QEMU arguments (devices), ``cmdline`` more kernel command-line words.
    """
    art = art or prepare()
    run_dir = new_run_dir(name)
    (run_dir / "cmd.sh").write_text(script if script.endswith("\n") else script + "\n")
    for fname, content in (files or {}).items():
        (run_dir / fname).write_text(content)
    serial = ["-serial", f"file:{run_dir / 'console.log'}",
              "-serial", f"file:{run_dir / 'events.log'}"]  # fmt: skip
    argv = qemu_argv(
        art,
        kernel_cmdline(art, run_dir, cmdline),
        serial=serial,
        smp=smp,
        memory_mb=memory_mb,
        extra=extra,
    )
    return Guest(run_dir, argv, timeout)


def run_in_guest(script: str, **kw: Any) -> GuestRun:
    """:func:`start_guest` and wait for it to power off (see there for the arguments)."""
    return start_guest(script, **kw).wait()


def interactive(command: str | None = None, *, smp: int = 2, memory_mb: int = 2048) -> int:
    """Boot with the console on this terminal: a shell, or ``command`` then power off."""
    art = prepare()
    run_dir = new_run_dir("shell")
    if command is not None:
        (run_dir / "cmd.sh").write_text(command + "\n")
    argv = qemu_argv(
        art,
        # No run directory without a command: the guest then starts a shell (given a run
        # directory without cmd.sh, it reports that and powers off).
        kernel_cmdline(art, run_dir if command is not None else None),
        serial=["-serial", "mon:stdio"],
        smp=smp,
        memory_mb=memory_mb,
    )
    rc = subprocess.call(argv)
    rc_file = run_dir / "rc"
    print(f"[run dir: {run_dir}]", file=sys.stderr)
    return int(rc_file.read_text()) if rc_file.exists() else rc


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tests.harness.qemu prepare`` builds the artefacts and prints timings."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tests.harness.qemu")
    parser.add_argument("action", choices=["prepare", "shell"])
    parser.add_argument("command", nargs="?")
    parser.add_argument("--flavour", choices=sorted(FLAVOURS), default="init")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.action == "prepare":
        t0 = time.monotonic()
        art = prepare(args.flavour)
        print(json.dumps({k: str(v) for k, v in dataclasses.asdict(art).items()}, indent=1))
        print(f"prepared in {time.monotonic() - t0:.1f} s")
        return 0
    return interactive(args.command)


if __name__ == "__main__":
    sys.exit(main())
