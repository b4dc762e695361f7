"""Guest-side helpers for the e2e scenarios: loop devices, dm tables, ulogd, writers, checks.

Runs inside the QEMU guest on Debian's python3 (3.11.2) with the standard library only (the
ulogd package is imported only to read capture files).  Everything here shells out to the
real tools (``losetup``, ``dmsetup``) and talks to real block devices; nothing is simulated.

Results are gathered in a :class:`Report`: each scenario records named checks (pass/fail with
a detail string) and the report is written as JSON into the run directory, where the host
side of the harness picks it up.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import mmap
import os
import random
import re
import signal
import subprocess
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

SECTOR = 512
BLOCK = 4096
MiB = 1 << 20
TMP = Path("/tmp/e2e")
#: What a boot leaves for the host (daemon logs, captures, dmesg), copied to the run directory.
ARTEFACTS = Path("/tmp/e2e-artefacts")


def now() -> float:
    return time.monotonic()


def kmsg(text: str) -> None:
    """Put a marker into the kernel log (shows up on the console, between kernel messages)."""
    try:
        with open("/dev/kmsg", "w") as fh:
            fh.write(f"e2e: {text}\n")
    except OSError:
        print(f"e2e: {text}", flush=True)


def run(argv: Sequence[str], *, timeout: float = 120, check: bool = True) -> str:
    """Run a command, return its stdout; raise with stderr on failure."""
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()} "
            f"{proc.stdout.strip()}"
        )
    return proc.stdout


def dmesg() -> str:
    return run(["dmesg"], check=False)


def save_artefacts(run_dir: Path) -> None:
    """Write the kernel log into :data:`ARTEFACTS` and copy every file there to ``run_dir``
    (the checkout's run directory, which the host reads after power-off)."""
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    (ARTEFACTS / "dmesg.txt").write_text(dmesg())
    for path in ARTEFACTS.iterdir():
        if path.is_file():
            with contextlib.suppress(OSError):
                (run_dir / path.name).write_bytes(path.read_bytes())


# ---------------------------------------------------------------------------------------------
# block devices


@dataclasses.dataclass
class Loop:
    """A loop device over a file on the guest's tmpfs."""

    file: Path
    dev: str

    @classmethod
    def create(cls, name: str, size: int, fill: bytes | None = None) -> Loop:
        TMP.mkdir(parents=True, exist_ok=True)
        path = TMP / f"{name}.img"
        with open(path, "wb") as fh:
            if fill is None:
                fh.truncate(size)
            else:
                chunk = (fill * (MiB // len(fill) + 1))[:MiB]
                for _ in range(size // MiB):
                    fh.write(chunk)
        dev = run(["losetup", "--find", "--show", str(path)]).strip()
        return cls(path, dev)

    @property
    def majmin(self) -> str:
        st = os.stat(self.dev)
        return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"

    def detach(self) -> None:
        run(["losetup", "-d", self.dev], check=False)
        self.file.unlink(missing_ok=True)


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def compare_legs(legs: Sequence[Loop]) -> tuple[bool, str]:
    """Compare the mirror legs' backing files (after dropping caches), MiB by MiB.

    Plain byte comparison (memcmp): hashing 128 MiB under TCG takes >10 s.
    """
    drop_caches()
    handles = [open(leg.file, "rb") for leg in legs]  # noqa: SIM115
    try:
        differing: list[list[int]] = [[] for _ in legs[1:]]
        index = 0
        while True:
            chunks = [fh.read(MiB) for fh in handles]
            if not chunks[0] and not any(chunks):
                break
            for k, other in enumerate(chunks[1:]):
                if other != chunks[0]:
                    differing[k].append(index)
            index += 1
    finally:
        for fh in handles:
            fh.close()
    for leg, diff in zip(legs[1:], differing, strict=True):
        if diff:
            return False, f"{legs[0].file.name} vs {leg.file.name}: differing MiB {diff[:20]}"
    return True, f"{len(legs)} legs identical ({index} MiB)"


# ---------------------------------------------------------------------------------------------
# device-mapper


def userspace_table(
    sectors: int,
    uuid: str,
    kind: str,
    legs: Sequence[Loop],
    *,
    region: int = 1024,
    log_dev: str | None = None,
    sync: str | None = None,
    integrated_flush: bool = False,
    handle_errors: bool = True,
) -> str:
    """A mirror table whose dirty log is ``userspace`` (``clustered-core``/``clustered-disk``)."""
    args = [uuid]
    if integrated_flush:
        args.append("integrated_flush")
    args.append(kind)
    if kind == "clustered-disk":
        assert log_dev is not None
        args.append(log_dev)
    args.append(str(region))
    if sync:
        args.append(sync)
    return _mirror_table(sectors, f"userspace {len(args)} {' '.join(args)}", legs, handle_errors)


def kernel_table(
    sectors: int,
    kind: str,
    legs: Sequence[Loop],
    *,
    region: int = 1024,
    log_dev: str | None = None,
    sync: str | None = None,
    handle_errors: bool = True,
) -> str:
    """A mirror table with the kernel's own ``core`` or ``disk`` dirty log."""
    args = [log_dev] if kind == "disk" and log_dev else []
    args.append(str(region))
    if sync:
        args.append(sync)
    return _mirror_table(sectors, f"{kind} {len(args)} {' '.join(args)}", legs, handle_errors)


def _mirror_table(sectors: int, log: str, legs: Sequence[Loop], handle_errors: bool) -> str:
    devs = " ".join(f"{leg.dev} 0" for leg in legs)
    features = " 1 handle_errors" if handle_errors else ""
    return f"0 {sectors} mirror {log} {len(legs)} {devs}{features}"


@dataclasses.dataclass
class MirrorStatus:
    raw: str
    in_sync: int
    regions: int
    health: str
    log: list[str]  # the dirty log's part, e.g. ["1", "clustered-core"]

    @property
    def synced(self) -> bool:
        return self.in_sync == self.regions


def parse_mirror_status(line: str) -> MirrorStatus:
    words = line.split()
    if len(words) < 4 or words[2] != "mirror":
        raise ValueError(f"not a mirror status: {line!r}")
    nlegs = int(words[3])
    pos = 4 + nlegs
    done, _, total = words[pos].partition("/")
    nhealth = int(words[pos + 1])
    health = words[pos + 2] if nhealth else ""
    return MirrorStatus(
        line, int(done), int(total), health, words[pos + 2 + (1 if nhealth else 0) :]
    )


class Mirror:
    """A dm device (mirror or other) driven with dmsetup."""

    def __init__(self, name: str, table: str, sectors: int) -> None:
        self.name = name
        self.table = table
        self.sectors = sectors
        self.path = f"/dev/mapper/{name}"

    def create(self, timeout: float = 120) -> None:
        run(["dmsetup", "create", self.name, "--table", self.table], timeout=timeout)

    def reload(self, table: str | None = None, timeout: float = 120) -> None:
        if table is not None:
            self.table = table
        run(["dmsetup", "reload", self.name, "--table", self.table], timeout=timeout)
        run(["dmsetup", "resume", self.name], timeout=timeout)

    def suspend(self, timeout: float = 120) -> None:
        run(["dmsetup", "suspend", self.name], timeout=timeout)

    def resume(self, timeout: float = 120) -> None:
        run(["dmsetup", "resume", self.name], timeout=timeout)

    def remove(self, timeout: float = 120) -> None:
        run(["dmsetup", "remove", self.name], timeout=timeout)

    def status_line(self, timeout: float = 60) -> str:
        return run(["dmsetup", "status", self.name], timeout=timeout).strip()

    def status(self, timeout: float = 60) -> MirrorStatus:
        return parse_mirror_status(self.status_line(timeout))

    def wait_synced(self, timeout: float = 120) -> MirrorStatus:
        deadline = now() + timeout
        while True:
            st = self.status()
            if st.synced or now() > deadline:
                return st
            time.sleep(0.5)

    @property
    def majmin(self) -> str:
        st = os.stat(self.path)
        return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"


def remove_all_dm() -> None:
    run(["dmsetup", "remove_all", "--force"], check=False)


def detach_all_loops() -> None:
    run(["losetup", "-D"], check=False)


# ---------------------------------------------------------------------------------------------
# ulogd


class Daemon:
    """dm-ulogd run in the foreground; its stderr is appended to one log file across restarts."""

    def __init__(
        self, run_dir: str, log_file: Path, capture_dir: Path, extra_args: Sequence[str] = ()
    ) -> None:
        self.run_dir = Path(run_dir)
        self.extra_args = list(extra_args)
        self.log_file = log_file
        self.capture_dir = capture_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.captures: list[Path] = []
        self.start_seconds: list[float] = []

    def start(self, timeout: float = 90) -> None:
        self.starts += 1
        self.capture_dir.mkdir(parents=True, exist_ok=True)
        capture = self.capture_dir / f"capture-{self.run_dir.name}-{self.starts}.pcapng"
        self.captures.append(capture)
        argv = [
            "python3", "-m", "ulogd", "run", "--foreground", "--run-dir", str(self.run_dir),
            "--log-level", "debug", "--capture", str(capture), *self.extra_args,
        ]  # fmt: skip
        with open(self.log_file, "ab") as fh:
            fh.write(f"==== e2e: start #{self.starts}: {' '.join(argv)}\n".encode())
            t0 = now()
            self.proc = subprocess.Popen(argv, stdout=fh, stderr=fh, stdin=subprocess.DEVNULL)
        pidfile = self.run_dir / "ulogd.pid"
        deadline = now() + timeout
        while now() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ulogd exited with {self.proc.returncode} before ready")
            with contextlib.suppress(OSError, ValueError):
                if int(pidfile.read_text().strip()) == self.proc.pid:
                    self.start_seconds.append(now() - t0)
                    kmsg(f"ulogd #{self.starts} ready (pid {self.proc.pid})")
                    return
            time.sleep(0.1)
        raise RuntimeError(f"ulogd not ready after {timeout} s")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        kmsg(f"ulogd pid {self.proc.pid} <- {signal.Signals(sig).name}")
        os.kill(self.proc.pid, sig)

    def kill9(self) -> None:
        self.signal(signal.SIGKILL)
        assert self.proc is not None
        self.proc.wait(timeout=30)

    def stop(self, timeout: float = 60) -> int | None:
        """SIGTERM and wait; the exit status (None if it had to be killed)."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None

    def log_text(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return ""


# request types (include/uapi/linux/dm-log-userspace.h)
REQUEST_NAMES = {
    1: "CTR", 2: "DTR", 3: "PRESUSPEND", 4: "POSTSUSPEND", 5: "RESUME", 6: "GET_REGION_SIZE",
    7: "IS_CLEAN", 8: "IN_SYNC", 9: "FLUSH", 10: "MARK_REGION", 11: "CLEAR_REGION",
    12: "GET_RESYNC_WORK", 13: "SET_REGION_SYNC", 14: "GET_SYNC_COUNT", 15: "STATUS_INFO",
    16: "STATUS_TABLE", 17: "IS_REMOTE_RECOVERING",
}  # fmt: skip


@dataclasses.dataclass
class Message:
    """One dm_ulog_request datagram from a capture, decoded by fixed offsets."""

    to_daemon: bool
    uuid: str
    luid: int
    error: int
    seq: int
    rtype: str
    payload: bytes


def read_messages(path: Path) -> list[Message]:
    """Decode a ulogd capture file (pcapng) with the project's own reader.

    Ack-only replies (``cn_msg.len == 0``: seq and positive errno in the cn_msg header) are
    returned as ``rtype == "ACK"`` with an empty uuid and ``error = -ack``.
    """
    from ulogd.edges.capture import Direction  # only needed for this
    from ulogd.edges.capture_reader import read_capture  # only needed for this

    out = []
    for pkt in read_capture(path):
        d = pkt.data
        to_daemon = pkt.direction is Direction.TO_DAEMON
        if len(d) >= 36 and int.from_bytes(d[32:34], "little") == 0:
            seq = int.from_bytes(d[24:28], "little")
            ack = int.from_bytes(d[28:32], "little")
            out.append(Message(to_daemon, "", 0, -ack, seq, "ACK", b""))
            continue
        if len(d) < 36 + 160:
            continue
        req = d[36:]
        size = int.from_bytes(req[156:160], "little")
        rtype = int.from_bytes(req[152:156], "little") & 0xFF
        out.append(
            Message(
                to_daemon=to_daemon,
                uuid=req[8:137].split(b"\0", 1)[0].decode(errors="replace"),
                luid=int.from_bytes(req[0:8], "little"),
                error=int.from_bytes(req[144:148], "little", signed=True),
                seq=int.from_bytes(req[148:152], "little"),
                rtype=REQUEST_NAMES.get(rtype, str(rtype)),
                payload=bytes(req[160 : 160 + size]),
            )
        )
    return out


# ---------------------------------------------------------------------------------------------
# I/O


def block_data(tag: str, offset: int, gen: int) -> bytes:
    """4 KiB of known data, unique per (tag, offset, generation)."""
    return hashlib.sha256(f"{tag}:{offset}:{gen}".encode()).digest() * (BLOCK // 32)


class Writer(threading.Thread):
    """O_DIRECT 4 KiB writes of known data at random block offsets of a device.

    Writes ``count`` blocks, or until :meth:`halt` when ``count`` is None.  ``expected`` maps
    byte offset -> the data last written there; ``errors`` collects I/O errors.  With
    ``stride`` > 1 only blocks ``k * stride + phase`` are written (nodes sharing a mirror write
    disjoint blocks of the same regions); ``in_flight`` is true while a write is issued.
    """

    def __init__(
        self,
        dev: str,
        size: int,
        tag: str,
        *,
        count: int | None,
        expected: dict[int, bytes],
        seed: int = 1,
        delay: float = 0.0,
        stride: int = 1,
        phase: int = 0,
    ) -> None:
        super().__init__(name=f"writer-{tag}", daemon=True)
        self.dev = dev
        self.blocks = size // BLOCK
        self.stride, self.phase = stride, phase
        self.in_flight = False
        self.tag = tag
        self.count = count
        self.expected = expected
        self.rng = random.Random(seed)
        self.delay = delay
        self.done = 0
        self.errors: list[str] = []
        self.last_completion = now()
        self.max_latency = 0.0
        self._halt = threading.Event()

    def halt(self) -> None:
        self._halt.set()

    def run(self) -> None:
        buf = mmap.mmap(-1, BLOCK)  # page aligned, as O_DIRECT wants
        try:
            fd = os.open(self.dev, os.O_WRONLY | os.O_DIRECT)
        except OSError as exc:
            self.errors.append(f"open: {exc}")
            return
        try:
            gen = 0
            while not self._halt.is_set() and (self.count is None or self.done < self.count):
                gen += 1
                k = self.rng.randrange(self.blocks // self.stride)
                off = (k * self.stride + self.phase) * BLOCK
                data = block_data(self.tag, off, gen)
                buf.seek(0)
                buf.write(data)
                t0 = now()
                self.in_flight = True
                try:
                    n = os.pwrite(fd, buf, off)
                except OSError as exc:
                    self.errors.append(f"write at {off}: {exc}")
                    self.expected.pop(off, None)  # content unknown now
                    continue
                finally:
                    self.in_flight = False
                if n != BLOCK:
                    self.errors.append(f"short write at {off}: {n}")
                self.expected[off] = data
                self.done += 1
                self.last_completion = now()
                self.max_latency = max(self.max_latency, self.last_completion - t0)
                if self.delay:
                    time.sleep(self.delay)
        finally:
            os.close(fd)


def verify_readback(dev: str, expected: dict[int, bytes]) -> list[int]:
    """Offsets whose O_DIRECT read-back differs from what was written."""
    buf = mmap.mmap(-1, BLOCK)
    bad = []
    fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
    try:
        for off, data in sorted(expected.items()):
            n = os.preadv(fd, [buf], off)
            if n != BLOCK or buf[:BLOCK] != data:
                bad.append(off)
    finally:
        os.close(fd)
    return bad


# ---------------------------------------------------------------------------------------------
# on-disk log (dm-log.c layout: header at 0, clean bitmap at byte 1024)

LOG_MAGIC = 0x4D695272


def read_disk_log(path: str, regions: int) -> list[int]:
    """(magic, version, nr_regions, number of clean regions) of a log device."""
    drop_caches()
    with open(path, "rb") as fh:
        head = fh.read(16)
        fh.seek(1024)
        bitmap = fh.read((regions + 7) // 8)
    magic = int.from_bytes(head[0:4], "little")
    version = int.from_bytes(head[4:8], "little")
    nr = int.from_bytes(head[8:16], "little")
    clean = sum(1 for i in range(regions) if bitmap[i // 8] >> (i % 8) & 1)
    return [magic, version, nr, clean]


# ---------------------------------------------------------------------------------------------
# results


@dataclasses.dataclass
class Check:
    name: str
    ok: bool
    detail: str


class ScenarioFailed(Exception):
    """A required step failed: the scenario cannot go on."""


class Scenario:
    """The checks of one scenario."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.checks: list[Check] = []
        self.error: str | None = None
        self.seconds = 0.0
        self.timings: dict[str, float] = {}
        self.info: dict[str, Any] = {}
        self._t0 = now()

    def check(self, name: str, ok: bool, detail: object = "") -> bool:
        self.checks.append(Check(name, bool(ok), str(detail)))
        kmsg(f"[{self.name}] {'PASS' if ok else 'FAIL'} {name}: {detail}")
        return bool(ok)

    def require(self, name: str, ok: bool, detail: object = "") -> None:
        if not self.check(name, ok, detail):
            raise ScenarioFailed(f"{name}: {detail}")

    def equal(self, name: str, actual: object, expected: object) -> bool:
        return self.check(name, actual == expected, f"got {actual!r}, expected {expected!r}")

    def mark(self, label: str) -> None:
        self.timings[label] = round(now() - self._t0, 2)
        kmsg(f"[{self.name}] t={self.timings[label]:.1f}s {label}")

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.checks) and all(c.ok for c in self.checks)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "ok": self.ok,
            "error": self.error,
            "seconds": round(self.seconds, 2),
            "timings": self.timings,
            "info": self.info,
            "checks": [dataclasses.asdict(c) for c in self.checks],
        }


class Report:
    """All scenarios of one boot; written to ``result.json`` after every scenario."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.scenarios: list[Scenario] = []

    @contextlib.contextmanager
    def scenario(self, name: str) -> Iterator[Scenario]:
        sc = Scenario(name)
        self.scenarios.append(sc)
        kmsg(f"==== scenario {name} ====")
        try:
            yield sc
        except ScenarioFailed as exc:
            sc.error = f"required step failed: {exc}"
        except Exception:
            sc.error = traceback.format_exc()
            kmsg(f"[{name}] ERROR {sc.error}")
        finally:
            sc.seconds = now() - sc._t0
            kmsg(f"==== scenario {name}: {'ok' if sc.ok else 'FAILED'} in {sc.seconds:.1f} s")
            self.write()

    def write(self) -> None:
        data = {"scenarios": {s.name: s.as_dict() for s in self.scenarios}}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(self.path)


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.2) -> bool:
    deadline = now() + timeout
    while now() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def kernel_errors(text: str, since: int = 0) -> list[str]:
    """Kernel log lines that indicate dm/mirror/log trouble (from line ``since`` on)."""
    pat = re.compile(
        r"(timed out|server not found|Attempting to contact|I/O error|"
        r"log (presuspend|postsuspend|resume) failed|Error|failed|BUG|WARNING|Call Trace)",
        re.IGNORECASE,
    )
    lines = text.splitlines()[since:]
    return [ln for ln in lines if pat.search(ln) and "e2e:" not in ln]
