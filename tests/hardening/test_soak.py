"""Soak: one daemon on the unix test transport under a continuous, realistic request mix for
``ULOGD_SOAK_SECONDS`` (default 1800), its memory and descriptors sampled and asserted flat.

The mix (one kernel stand-in, requests back to back): three long-lived logs (``core``,
``disk`` on a file, ``clustered-core`` run alone) taking writes (MARK/FLUSH/CLEAR/FLUSH,
integrated flushes), resync (GET_RESYNC_WORK/SET_REGION_SYNC, with regions put out of sync
again as failed writes would), queries (IS_CLEAN, IN_SYNC, IS_REMOTE_RECOVERING, status,
sync count), suspend/resume and table reloads (new luid, state carried over); mirrors
created and removed with fresh uuids (CTR … DTR, half of them disk logs); the control
socket's ``status`` and the Prometheus endpoint scraped as an operator's tools would.

Every reply is checked (no error where none is due, held regions never clean).  RSS and the
descriptor and thread counts are sampled every few seconds; after a warm-up (the first 10 % of the
samples) the last quarter's mean RSS must stay within 5 % (at least 2 MiB) of the first
quarter's, and the last quarter's descriptor and thread counts never exceed the first
quarter's maxima.
The figures are printed and, with ``ULOGD_SOAK_REPORT=path``, written as JSON.
"""

from __future__ import annotations

import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.harness.cluster import KernelLink, wait_until
from ulogd.ops import control
from ulogd.protocol.spec import RequestType as T
from ulogd.testing.driver import LogDriver

pytestmark = pytest.mark.slow

REGIONS = 4096
LOGS = {
    "LVM-soak-core": f"{REGIONS * 8} core 8",
    "LVM-soak-disk": f"{REGIONS * 8} disk {{dev}} 8",
    "LVM-soak-ccore": f"{REGIONS * 8} clustered-core 8 nosync",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads")


def _sample(pid: int, t: float) -> tuple[float, int, int, int]:
    return (round(t, 2), _rss_kib(pid), _fds(pid), _threads(pid))


class Soak:
    def __init__(self, base: Path, seed: int = 9) -> None:
        self.base = base
        self.rng = random.Random(seed)
        self.sock = base / "u.sock"
        self.run_dir = base / "run"
        self.port = _free_port()
        self.devices: list[str] = []
        for i in range(4):  # the daemon takes block devices only: loop devices on files
            image = base / f"log{i}.img"
            image.write_bytes(bytes(1 << 20))
            out = subprocess.run(["losetup", "-f", "--show", str(image)], check=True,
                                 capture_output=True, text=True)  # fmt: skip
            self.devices.append(out.stdout.strip())
        self.link = KernelLink(self.sock, timeout=10.0)
        self.counts: dict[str, int] = {}
        self.luids: dict[str, int] = {}
        self.held: dict[str, set[int]] = {}
        self.next_uuid = 0

    def close(self) -> None:
        self.link.close()
        for dev in self.devices:
            subprocess.run(["losetup", "-d", dev], check=False)

    def start(self) -> subprocess.Popen[bytes]:
        self.proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "ulogd", "run", "-f", "--log-level", "warning"),
                *("--transport", f"unix:{self.sock}", "--run-dir", str(self.run_dir)),
                *("--metrics-listen", f"127.0.0.1:{self.port}"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(self.base / "ulogd.log", "wb"),  # noqa: SIM115
        )
        wait_until(lambda: self.sock.exists() and (self.run_dir / "ulogd.pid").exists(), 15.0,
                   "the daemon to serve")  # fmt: skip
        return self.proc

    def driver(self, uuid: str) -> LogDriver:
        return LogDriver(self.link, uuid=uuid, luid=self.luids.get(uuid, 1))

    def count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    def ok(self, d: LogDriver, rtype: int, data: bytes = b"") -> bytes:
        reply = d.call(rtype, data)
        assert reply.error == 0, f"{T(rtype).name} on {d.uuid}: {reply.error}"
        self.count(T(rtype).name)
        return reply.data

    def create(self, uuid: str, ctr: str) -> LogDriver:
        d = self.driver(uuid)
        assert d.ctr(ctr).error == 0, ctr
        self.count("CTR")
        self.ok(d, T.GET_REGION_SIZE)
        self.ok(d, T.RESUME)
        self.held[uuid] = set()
        return d

    def setup(self) -> None:
        for uuid, ctr in LOGS.items():
            self.create(uuid, ctr.format(dev=self.devices[0]))

    # -- the mix -----------------------------------------------------------------------
    def write(self, uuid: str) -> None:
        d, rng, held = self.driver(uuid), self.rng, self.held[uuid]
        if len(held) < 32 and (rng.random() < 0.55 or not held):
            new = rng.sample(range(REGIONS), rng.randint(1, 4))
            if rng.random() < 0.3:
                assert d.flush(new).error == 0
                self.count("FLUSH+marks")
            else:
                assert d.mark(new).error == 0 and d.flush().error == 0
                self.count("MARK+FLUSH")
            held.update(new)
            r = rng.choice(new)
            assert d.is_clean(r) == 0, f"{uuid}: held region {r} clean"
        else:
            gone = rng.sample(sorted(held), rng.randint(1, len(held)))
            assert d.clear(gone).error == 0 and d.flush().error == 0
            held.difference_update(gone)
            self.count("CLEAR+FLUSH")

    def resync(self, uuid: str) -> None:
        d, rng = self.driver(uuid), self.rng
        for _ in range(rng.randint(1, 8)):
            i, r = d.resync_work()
            self.count("GET_RESYNC_WORK")
            if not i:
                break
            assert d.set_region_sync(r, True).error == 0
            self.count("SET_REGION_SYNC")
        if rng.random() < 0.2:  # a failed write: the region must be recovered again
            assert d.set_region_sync(rng.randrange(REGIONS), False).error == 0
            self.count("SET_REGION_SYNC")

    def query(self, uuid: str) -> None:
        d, r = self.driver(uuid), self.rng.randrange(REGIONS)
        d.in_sync(r)
        d.is_clean(r)
        self.ok(d, T.IS_REMOTE_RECOVERING, r.to_bytes(8, "little"))
        self.ok(d, T.GET_SYNC_COUNT)
        self.ok(d, T.STATUS_INFO)
        self.ok(d, T.STATUS_TABLE)

    def suspend_resume(self, uuid: str) -> None:
        d = self.driver(uuid)
        if self.held[uuid]:  # the kernel quiesces I/O before a suspend
            assert d.clear(sorted(self.held[uuid])).error == 0 and d.flush().error == 0
            self.held[uuid].clear()
        for rtype in (T.PRESUSPEND, T.POSTSUSPEND, T.RESUME):
            self.ok(d, rtype)

    def reload(self, uuid: str) -> None:
        """A table reload: the new table's log is constructed, the old one suspended, the
        new one resumed, the old one destroyed."""
        old = self.driver(uuid)
        if self.held[uuid]:
            assert old.clear(sorted(self.held[uuid])).error == 0 and old.flush().error == 0
            self.held[uuid].clear()
        self.luids[uuid] = self.luids.get(uuid, 1) + 1
        new = self.driver(uuid)
        ctr = LOGS[uuid].format(dev=self.rng.choice(self.devices[:1]))
        assert new.ctr(ctr).error == 0
        self.ok(old, T.PRESUSPEND)
        self.ok(old, T.POSTSUSPEND)
        self.ok(new, T.RESUME)
        self.ok(old, T.DTR)
        self.count("reload")

    def life_cycle(self) -> None:
        self.next_uuid += 1
        uuid = f"LVM-soak-life-{self.next_uuid:08d}"
        if self.rng.random() < 0.5:
            ctr = f"{REGIONS * 8} disk {self.rng.choice(self.devices[1:])} 8"
        else:
            ctr = f"{REGIONS * 8} core 8 nosync"
        d = self.create(uuid, ctr)
        for _ in range(self.rng.randint(1, 6)):
            self.write(uuid)
        self.resync(uuid)
        held = sorted(self.held.pop(uuid))
        if held:
            assert d.clear(held).error == 0 and d.flush().error == 0
        for rtype in (T.PRESUSPEND, T.POSTSUSPEND, T.DTR):
            self.ok(d, rtype)
        self.count("life cycle")

    def operator(self) -> None:
        answer = control.request(self.run_dir / control.SOCKET_NAME, "status", timeout=5)
        assert answer.get("ok"), answer
        self.count("control status")
        if self.rng.random() < 0.5:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
                assert r.status == 200 and b"ulogd" in r.read()
            self.count("metrics scrape")

    def step(self) -> None:
        x = self.rng.random()
        uuid = self.rng.choice(list(LOGS))
        if x < 0.55:
            self.write(uuid)
        elif x < 0.70:
            self.resync(uuid)
        elif x < 0.85:
            self.query(uuid)
        elif x < 0.90:
            self.life_cycle()
        elif x < 0.93:
            self.suspend_resume(uuid)
        elif x < 0.95:
            self.reload(uuid)
        else:
            self.operator()


def soak(base: Path, seconds: float, sample_every: float) -> dict[str, object]:
    s = Soak(base)
    try:
        proc = s.start()
    except BaseException:
        s.close()
        raise
    try:
        s.setup()
        samples: list[tuple[float, int, int, int]] = []
        start = time.monotonic()
        next_sample = start
        while (now := time.monotonic()) < start + seconds:
            if now >= next_sample:
                samples.append(_sample(proc.pid, now - start))
                next_sample += sample_every
            s.step()
            assert proc.poll() is None, "the daemon died"
        samples.append(_sample(proc.pid, time.monotonic() - start))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        s.close()
    kept = samples[len(samples) // 10 :]
    q = max(1, len(kept) // 4)
    first, last = kept[:q], kept[-q:]
    summary = {
        "seconds": round(samples[-1][0], 1),
        "requests": sum(s.counts.values()),
        "mix": dict(sorted(s.counts.items())),
        "samples": len(samples),
        "rss_kib_start": samples[0][1],
        "rss_kib_first_quarter_mean": round(statistics.mean(x[1] for x in first)),
        "rss_kib_last_quarter_mean": round(statistics.mean(x[1] for x in last)),
        "rss_kib_max": max(x[1] for x in samples),
        "fds_first_quarter_max": max(x[2] for x in first),
        "fds_last_quarter_max": max(x[2] for x in last),
        "fds_max": max(x[2] for x in samples),
        "threads_first_quarter_max": max(x[3] for x in first),
        "threads_last_quarter_max": max(x[3] for x in last),
        "exit_status": proc.returncode,
    }
    print(f"\nsoak summary: {json.dumps(summary)}")
    if os.environ.get("ULOGD_SOAK_REPORT"):
        Path(os.environ["ULOGD_SOAK_REPORT"]).write_text(
            json.dumps({**summary, "trace": samples}, indent=1)
        )
    return summary


def test_soak_memory_and_descriptors_stay_flat(tmp_path: Path) -> None:
    seconds = float(os.environ.get("ULOGD_SOAK_SECONDS", "1800"))
    summary = soak(tmp_path, seconds, sample_every=max(1.0, seconds / 360))
    first = summary["rss_kib_first_quarter_mean"]
    last = summary["rss_kib_last_quarter_mean"]
    assert isinstance(first, int) and isinstance(last, int)
    assert last <= first + max(first * 0.05, 2048), f"RSS grew: {summary}"
    assert summary["fds_last_quarter_max"] <= summary["fds_first_quarter_max"], summary  # type: ignore[operator]
    assert summary["threads_last_quarter_max"] <= summary["threads_first_quarter_max"], summary  # type: ignore[operator]
    assert summary["exit_status"] == 0, f"unclean exit on SIGTERM: {summary}"
    assert summary["mix"]["life cycle"] > 0 and summary["mix"]["reload"] > 0  # type: ignore[index]
