"""Any checkout path works (QEMU): a copy of the package under /tmp — where the guest puts a
fresh tmpfs over the checkout's mount point — still runs its command; and a guest given a run
directory without a command says so and powers off at once instead of waiting in a shell."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.harness import qemu

pytestmark = pytest.mark.e2e

PROBE = r"""
import json, sys
from tests.harness import qemu
art = qemu.prepare()
run = qemu.run_in_guest(
    'python3 -c "import ulogd; print(ulogd.__file__)" > where.txt', name="tmp-checkout",
    timeout=300, art=art)
print(json.dumps({"rc": run.returncode, "timed_out": run.timed_out, "wall": run.wall_seconds,
                  "run_dir": str(run.run_dir), "where": run.artefact("where.txt").strip(),
                  "console": run.console[-3000:]}))
"""


def test_a_checkout_under_tmp_runs_its_command() -> None:
    qemu.prepare()  # the artefacts exist before the copy borrows them
    with tempfile.TemporaryDirectory(prefix="ulogd-checkout-", dir="/tmp") as tmp:
        copy = Path(tmp)
        for pkg in ("ulogd", "cpg", "tests/harness"):  # the product and the QEMU harness
            shutil.copytree(qemu.REPO / pkg, copy / pkg)
        shutil.copy(qemu.REPO / "tests" / "__init__.py", copy / "tests" / "__init__.py")
        (copy / ".cache").mkdir()
        (copy / ".cache" / "qemu").symlink_to(qemu.CACHE.resolve())
        env = dict(os.environ, PYTHONPATH=str(copy))
        out = subprocess.run([sys.executable, "-c", PROBE], cwd=copy, env=env,
                             capture_output=True, text=True, timeout=600)  # fmt: skip
        assert out.returncode == 0, out.stderr[-3000:]
        result = json.loads(out.stdout.splitlines()[-1])
        assert result["run_dir"].startswith(str(copy)), result
        assert not result["timed_out"] and result["rc"] == 0, result["console"]
        assert result["where"] == f"{copy}/ulogd/__init__.py", result
        print(f"\nboot from {copy}: {result['wall']:.1f} s wall")


def test_a_guest_without_its_command_says_so_and_powers_off() -> None:
    art = qemu.prepare()
    run_dir = qemu.new_run_dir("no-command")  # and no cmd.sh in it
    argv = qemu.qemu_argv(
        art,
        qemu.kernel_cmdline(art, run_dir),
        serial=["-serial", f"file:{run_dir / 'console.log'}", "-serial", "null"],
    )
    run = qemu.Guest(run_dir, argv, timeout=300).wait()
    try:
        assert not run.timed_out, run.describe(40)
        assert run.returncode is None
        assert f"init: no command: {run_dir}/cmd.sh does not exist" in run.console, run.describe()
        assert "init: powering off" in run.console
        print(f"\npowered off {run.wall_seconds:.1f} s after the start")
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
