"""Real kernel: capture a mirror's traffic with ``dm-ulogd run --capture`` and replay it offline.

Boots Debian's kernel in QEMU (:mod:`tests.harness.qemu`), runs two scenarios of
``captures/scenarios.sh`` in the guest -- a clustered-core mirror's whole life cycle, and a
daemon killed with SIGKILL and restarted while a write waits -- and replays the captures on the
host with ``dm-ulogd replay``: every recorded answer must be reproduced, none unverifiable.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness.qemu import GuestRun, run_in_guest
from ulogd.edges.capture import Direction
from ulogd.edges.capture_reader import read_capture
from ulogd.ops import replay, replay_report
from ulogd.protocol import wire

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def guest_captures() -> GuestRun:
    run = run_in_guest(
        'sh "$ULOGD_SRC/captures/scenarios.sh" "$ULOGD_RUN/out" lifecycle restart\n',
        name="e2e-capture-replay",
        timeout=1800,
    )
    assert run.returncode == 0 and not run.timed_out, run.describe()
    return run


def test_lifecycle_capture_replays_without_mismatch(guest_captures: GuestRun) -> None:
    path = guest_captures.run_dir / "out" / "lifecycle.pcapng"
    packets = list(read_capture(path))
    requests = [p for p in packets if p.direction is Direction.TO_DAEMON]
    replies = [p for p in packets if p.direction is Direction.FROM_DAEMON]
    assert len(requests) > 50 and len(replies) == len(requests)

    report = replay.replay([path])
    assert report.error is None
    assert report.total(replay.MISMATCH) == 0, report.render()
    assert report.total(replay.UNVERIFIABLE) == 0, report.render()
    assert report.total(replay.UNANSWERED) == 0, report.render()
    assert report.total(replay.MATCH) == report.replayed == len(requests)
    # the kernel's requests of a life cycle: create, resync, writes, status, suspend, reload
    for name in (
        "CTR",
        "RESUME",
        "GET_RESYNC_WORK",
        "SET_REGION_SYNC",
        "MARK_REGION",
        "CLEAR_REGION",
        "FLUSH",
        "IN_SYNC",
        "STATUS_INFO",
        "POSTSUSPEND",
        "DTR",
    ):
        assert report.counts[name][replay.MATCH] > 0, (name, report.render())
    assert report.counts["CTR"][replay.MATCH] == 2  # create + reload (new luid)
    assert len(report.logs) == 2 and all(info.removed for info in report.logs.values())


def test_restart_captures_replay_as_one_kernel_and_two_daemons(guest_captures: GuestRun) -> None:
    out = guest_captures.run_dir / "out"
    first, second = out / "restart-1.pcapng", out / "restart-2.pcapng"
    report = replay.replay([first, second])
    assert report.restarts == 1
    assert report.total(replay.MISMATCH) == 0, report.render()
    assert report.total(replay.UNVERIFIABLE) == 0, report.render()
    assert report.total(replay.UNANSWERED) == 0, report.render()
    # the second daemon's first request is the kernel's reconnect: CTR with its NUL
    (reconnect,) = [o for o in _all_requests(second) if o.startswith("CTR")]
    assert reconnect.endswith("+NUL (reconnect)")
    # replayed alone, the second file starts mid-stream: reported, never a mismatch
    alone = replay.replay([second])
    assert alone.exit_status == replay_report.EXIT_OK
    assert [info.origin for info in alone.logs.values()] == [replay.MID_STREAM]


def _all_requests(path: Path) -> list[str]:
    texts = []
    for packet in read_capture(path):
        if packet.direction is Direction.TO_DAEMON:
            request = wire.decode(packet.data)
            if isinstance(request, wire.Request):
                texts.append(replay.request_text(request))
    return texts
