"""The in-process benchmarks run in their tiny ``--quick`` mode and write sane JSON.

Keeps ``bench/`` from rotting: the scripts import the code they measure, so an API change
breaks them here first.  fio_qemu.py (a QEMU boot) is not run; its analysis is checked on a
made-up guest result.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def run_quick(script: str, tmp_path: Path, *extra: str) -> dict[str, Any]:
    out = tmp_path / f"{script}.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / f"{script}.py"), "--quick", "--out", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data: dict[str, Any] = json.loads(out.read_text())
    assert data["benchmark"] == script
    assert data["machine"]["nproc"] >= 1 and len(data["machine"]["loadavg"]) == 3
    return data


def test_request_path(tmp_path: Path) -> None:
    data = run_quick("request_path", tmp_path)
    assert set(data["mixes"]) == {"resync", "write", "write-integrated"}
    for mix in data["mixes"].values():
        rates = mix["per_cpu_s"]["req_per_s"]
        assert set(rates) == {"ulogd_shm", "ulogd_memory", "bare_decode", "minimal_loop"}
        assert all(r > 1000 for r in rates.values()), rates
        assert 0 < mix["per_cpu_s"]["shm_to_bare_decode"] < 2


def test_transport_latency(tmp_path: Path) -> None:
    data = run_quick("transport_latency", tmp_path)
    for who in ("daemon-off", "daemon-adaptive", "echo"):
        assert 0 < data[who]["p50_us"] <= data[who]["p99_us"] < 1e6
        assert 0 < data[who]["cpu_us_per_request"] < 1e6
    assert data["daemon-adaptive_to_echo"]["p50_us"] > 0
    assert data["adaptive_to_off"]["cpu_us_per_request"] > 0


def test_scale(tmp_path: Path) -> None:
    data = run_quick("scale", tmp_path)
    (mem,) = data["memory"]
    assert mem["state_file_bits_per_region"] >= 2.0
    assert 0 < mem["bits_per_region"] < 8 and mem["bytes_per_mark"] > 0
    assert [r["fill"] for r in data["resync"]] == [0.0, 0.5, 0.99, 1.0]
    assert all(r["next_calls_median_us"] > 0 for r in data["resync"])


def test_disk_flush(tmp_path: Path) -> None:
    data = run_quick("disk_flush", tmp_path)
    mem = data["devices"]["memory-512"]
    assert mem["ulogd"]["bytes_per_flush"] == 512  # one block per single-region flush
    assert mem["whole_bitmap"]["bytes_per_flush"] == mem["io_size"]
    assert mem["bytes_ratio"] < 1 / 100


def test_durable_path(tmp_path: Path) -> None:
    data = run_quick("durable_path", tmp_path)
    hand_off = data["hand_off"]["us"]
    assert hand_off["worker"] > 0 and hand_off["inline"] > 0
    if "loop_skipped" not in data:
        assert set(data["device"]["us"]) == {
            "pwritev+fdatasync", "pwritev(RWF_DSYNC)", "durable write_extents", "cached pwritev"
        }  # fmt: skip
        for poll in ("off", "adaptive"):
            assert data[f"cycle-{poll}"]["disk_to_core"] > 0


def test_fio_analysis_on_a_made_up_result() -> None:
    sys.path.insert(0, str(BENCH))
    try:
        import fio_qemu
    finally:
        sys.path.remove(str(BENCH))
    stats = {
        "requests": 600,
        "requests_per_write": 6.0,
        "receive_us_mean": 50.0,
        "loop_us_per_datagram": 100.0,
        "by_type": {"IN_SYNC": 200},
        "wall_s": 1.0,
    }
    iops = {
        "linear": 300, "core": 200, "disk": 100, "c": 150, "c-if": 160, "py": 90,
        "ulogd-off": 80, "ulogd": 100, "ulogd-if-off": 100, "ulogd-if": 120,
        "ulogd-disk-off": 40, "ulogd-disk": 60,
    }  # fmt: skip
    legs = []
    for rnd in range(3):
        for dev, n in iops.items():
            leg: dict[str, Any] = {"round": rnd, "depth": 1, "device": dev, "iops": n + rnd}
            leg["ios"] = 10 * n
            if dev not in ("linear", "core", "disk"):
                leg["server_cpu_s"] = 0.5
            if dev.startswith("ulogd"):
                leg["ulogd"] = stats
            legs.append(leg)
    out = fio_qemu.analyse({"legs": legs}, [1])["1"]
    assert out["core"]["to_core"] == 1.0
    assert out["ulogd"]["to_core"] == pytest.approx(101 / 201)
    assert out["ulogd"]["to_c"] == pytest.approx(101 / 151)
    assert out["ulogd-if"]["to_c"] == pytest.approx(121 / 161)  # to the C responder's -if
    assert out["ulogd"]["adaptive_to_off"] == pytest.approx(101 / 81)
    assert out["ulogd"]["cpu_s_per_1000_writes"] == pytest.approx(0.5)
    assert out["core"]["cpu_s_per_1000_writes"] is None
    assert out["ulogd"]["requests_per_write"] == 6.0
    assert out["ulogd"]["daemon_busy_fraction"] == pytest.approx(0.06)
    assert out["disk_to_core"]["kernel"] == pytest.approx(101 / 201)
    assert out["disk_to_core"]["ulogd"] == pytest.approx(61 / 101)


def test_huge_log_stall(tmp_path: Path) -> None:
    data = run_quick("huge_log_stall", tmp_path)
    (one,) = data["rounds"]
    assert one["create_s"] > 0 and one["census_s"] > 0
    assert one["idle_longest_wait_ms"] > 0 and one["create_longest_wait_ms"] > 0
    assert data["log2"] == 24 and data["worst_wait_ms"] >= one["create_longest_wait_ms"]
