"""Write a seed corpus per target (``fuzz/corpus/<target>/``) from real inputs: the captures
in ``captures/``, encoded cluster messages and snapshots, disk images, the packaged config,
a real state file, and a few request programs for the server target."""

from __future__ import annotations

import struct
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fuzz import targets  # noqa: E402
from ulogd.cluster import checkpoint as ck  # noqa: E402
from ulogd.cluster import messages as m  # noqa: E402
from ulogd.edges import capture, capture_reader  # noqa: E402
from ulogd.protocol import ctr  # noqa: E402
from ulogd.state import disklog  # noqa: E402
from ulogd.state.regionlog import RegionLog, new_bitmaps  # noqa: E402
from ulogd.state.statefile import StateDir  # noqa: E402


def _seq(n: int) -> bytes:
    return struct.pack("<I", n)


def seeds() -> dict[str, list[bytes]]:
    out: dict[str, list[bytes]] = {name: [] for name in targets.TARGETS}
    requests = []
    for path in sorted((ROOT / "captures").glob("*.pcapng")):
        raw = path.read_bytes()
        out["capture"].append(raw)
        for pk in capture_reader.read_capture(path):
            if pk.direction is capture.Direction.TO_DAEMON:
                requests.append(pk.data)
    unique = sorted(set(requests), key=lambda d: (len(d), d))[:200]
    out["wire"] += [b"\0" + d for d in unique] + [b"\xff" + d for d in unique[:5]]
    out["ctr"] += [*targets._CTRS, b"4194304 clustered-disk 253:2 1024 sync\0"]
    ops = m.encode_ops([m.OpRecord(m.Op.MARK, 1, (1, 2)), m.OpRecord(m.Op.FLUSH, 2, (3,)),
                        m.OpRecord(m.Op.SET_SYNC, 3, (4, 1)),
                        m.OpRecord(m.Op.REMOTE_RECOVERING, 4, (5,)),
                        m.OpRecord(m.Op.RESYNC_WORK, 5)])  # fmt: skip
    config_ = ctr.parse(b"1024 clustered-disk 7:0 8")
    rl = RegionLog(config_, *new_bitmaps(config_), local_node=1)
    rl.mark(1, [3, 4])
    rl.set_region_sync(1, 9, True)
    blob = ck.snapshot(rl, ck.GroupBook(5, ((1, 100), (2, 200)), ((3, 300, 4),)))
    messages = [
        ops,
        m.encode_disk_done(7, 0),
        m.encode_checkpoint(3, 0, 1, (m.Target(2, 200, 3),), blob),
        targets.encode_merge(4, 0, 1, blob),
        targets.encode_merge(0, 0, 0, b""),
    ]
    out["messages"] += [b"\0" + msg for msg in messages]
    out["messages"] += [b"\1" + bytes([msg[6]]) + msg[24:] for msg in messages]
    out["group"] += [b"".join(bytes([i, len(msg) + 1, 0]) + msg for i, msg in
                              enumerate(messages) if len(msg) < 250)]  # fmt: skip
    out["group"] += [bytes([0, len(ops) - 22, 1, 1]) + ops[24:]]
    out["checkpoint"] += [bytes([127, 0]) + blob]
    for count in (0, 1, 100, 4096, 8191):
        store = disklog.MemoryDiskLog(disklog.io_size(count, 512))
        bits = new_bitmaps(ctr.parse(f"{max(count, 1) * 8} core 8 nosync".encode()))[0]
        disklog.write_image(store, bits, count)  # type: ignore[arg-type]
        out["disklog"].append(struct.pack("<H", count) + bytes(store.data))
    out["config"].append((ROOT / "packaging" / "dm-ulogd.toml").read_bytes())
    out["config"].append(b'run_dir = "/tmp/x"\nnode_id = 3\ncluster = "corosync"\n'
                         b'[corosync]\nexpected_nodes = 3\n[metrics]\nlisten = "[::1]:9813"\n')
    with tempfile.TemporaryDirectory() as tmp:
        state = StateDir(Path(tmp)).create("LVM-seed", 0x10, 100, 8, "800 core 8")
        state.save_scalars(rl.scalars())
        out["statefile"].append(b"\0\1" + state.path.read_bytes())
        state.close()
    u = lambda n: struct.pack("<H", n)  # noqa: E731
    life = [
        bytes([4, 0, 0, 1, 0, 12]) + _seq(1),  # CTR disk
        bytes([4, 0, 0, 5, 0, 0]) + _seq(2),  # RESUME
        bytes([4, 0, 0, 10, 0, 17]) + u(3) + u(5) + b"\1" + _seq(3),  # MARK 3 5
        bytes([4, 0, 0, 9, 0, 20, 1]) + _seq(4),  # FLUSH
        bytes([4, 0, 0, 7, 0, 20]) + u(3) + _seq(5),  # IS_CLEAN 3
        bytes([4, 0, 0, 11, 0, 17]) + u(3) + u(5) + b"\1" + _seq(6),  # CLEAR 3 5
        bytes([4, 0, 0, 12, 0, 0]) + _seq(7),  # GET_RESYNC_WORK
        bytes([4, 0, 0, 13, 0, 20]) + u(0) + b"\1" + _seq(8),  # SET_REGION_SYNC 0 1
        bytes([4, 0, 0, 15, 0, 0]) + _seq(9),  # STATUS_INFO
        bytes([4, 0, 0, 3, 0, 0]) + _seq(10),  # PRESUSPEND
        bytes([4, 0, 0, 4, 0, 0]) + _seq(11),  # POSTSUSPEND
        bytes([4, 0, 0, 2, 0, 0]) + _seq(12),  # DTR
    ]
    out["server"] += [b"".join(life), b"".join(life[:4]) + bytes([1, 1, 0]) + b"".join(life[2:]),
                      b"".join(life[:3]) + bytes([2, 0, 0, 9, 0, 20, 1]) + _seq(4) + b"\0\0\0"]
    return out


def write(directory: Path) -> None:
    for name, items in seeds().items():
        target = directory / name
        target.mkdir(parents=True, exist_ok=True)
        for i, item in enumerate(items):
            (target / f"seed-{i:03d}").write_bytes(item)


if __name__ == "__main__":
    write(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "fuzz" / "corpus")
