"""The QEMU harness's path logic (no boot here; tests/e2e/test_checkout_paths.py boots):
where run directories go so that the guest sees them, and what the kernel command line
tells the guest."""

from __future__ import annotations

from pathlib import Path

from tests.harness import qemu


def test_run_dirs_stay_in_the_cache_inside_the_checkout(tmp_path: Path) -> None:
    repo = tmp_path / "checkout"
    (repo / ".cache" / "qemu").mkdir(parents=True)
    assert qemu.runs_dir(repo, repo / ".cache" / "qemu") == repo / ".cache" / "qemu" / "runs"


def test_run_dirs_leave_a_cache_symlinked_out_of_the_checkout(tmp_path: Path) -> None:
    shared = tmp_path / "main" / ".cache"
    (shared / "qemu").mkdir(parents=True)
    repo = tmp_path / "worktree"
    repo.mkdir()
    (repo / ".cache").symlink_to(shared)  # the guest would see a dangling link
    runs = qemu.runs_dir(repo, repo / ".cache" / "qemu")
    assert runs == repo.resolve() / ".e2e-runs"
    assert runs.resolve().is_relative_to(repo.resolve())


def test_a_checkout_reached_through_a_symlink_is_named_by_its_real_path(tmp_path: Path) -> None:
    real = tmp_path / "real"
    (real / ".cache" / "qemu").mkdir(parents=True)
    link = tmp_path / "link"
    link.symlink_to(real)
    runs = qemu.runs_dir(link, link / ".cache" / "qemu")
    assert runs.resolve().is_relative_to(real)


def _art(flavour: str) -> qemu.Artefacts:
    kernel = qemu.Kernel(Path("/k"), "6.1.0-0-amd64")
    return qemu.Artefacts(kernel, Path("/i"), Path("/r.ext4"), flavour)


def test_the_command_line_names_the_run_dir_only_when_there_is_a_command(tmp_path: Path) -> None:
    words = qemu.kernel_cmdline(_art("init"), tmp_path).split()
    assert f"ulogd.run={tmp_path}" in words and f"ulogd.work={qemu.REPO}" in words
    assert "ulogd.init=systemd" not in words
    assert not [w for w in qemu.kernel_cmdline(_art("init"), None).split() if "ulogd.run" in w]


def test_the_systemd_flavour_hands_pid_1_to_systemd(tmp_path: Path) -> None:
    assert "ulogd.init=systemd" in qemu.kernel_cmdline(_art("systemd"), tmp_path).split()
    prefix, packages = qemu.FLAVOURS["systemd"]
    assert prefix != qemu.FLAVOURS["init"][0]  # its own root and image, never pruned together
    assert {"systemd", "udev"} <= set(packages)
    assert not {"systemd", "udev"} & set(qemu.FLAVOURS["init"][1])
