"""e2e scenarios against the real kernel (see conftest.py for how they run).

Each test first requires every check the guest recorded for its scenario to have passed
(``dmsetup status``, data read back, identical mirror legs, kernel log, ...), then checks the
daemon's side of the conversation in its capture file.
"""

from __future__ import annotations

import pytest

from .conftest import E2E, error_replies, request_counts, requests, unanswered

pytestmark = pytest.mark.e2e


def test_harness_selftest_with_kernel_logs(e2e: E2E) -> None:
    """The kernel's own core/disk logs: validates boot, I/O, leg comparison, disk-log reader."""
    sc = e2e.scenario("basic", "kernel-logs")
    names = {c["name"] for c in sc.data["checks"]}
    assert {
        "legs differ before the mirror exists",
        "disk: legs identical after resync",
        "disk: on-disk log after remove",
        "disk: re-created mirror is in sync at once (log honoured)",
    } <= names, names


@pytest.mark.parametrize("name", ["clustered-core", "integrated-flush"])
def test_clustered_core_life_cycle(e2e: E2E, name: str) -> None:
    sc = e2e.scenario("basic", name)
    uuid = sc.uuid()
    msgs = sc.messages(uuid=uuid)
    counts = request_counts(msgs)
    assert counts["CTR"] == 2, counts  # create + reload
    assert len({m.luid for m in msgs}) == 2, "the reload must be a second log instance"
    assert counts["DTR"] == 2, counts
    assert counts["GET_RESYNC_WORK"] >= 1 and counts["SET_REGION_SYNC"] >= 64, counts
    if name == "integrated-flush":
        assert counts["MARK_REGION"] == 0, counts
        assert any(m.rtype == "FLUSH" and m.payload for m in requests(msgs))
    else:
        assert counts["MARK_REGION"] >= 1 and counts["FLUSH"] >= 1, counts
    assert error_replies(msgs) == []
    assert unanswered(sc.messages(), uuid) == []


def test_clustered_disk(e2e: E2E) -> None:
    sc = e2e.scenario("basic", "clustered-disk")
    all_msgs = sc.messages()
    for role in ("mirror", "nosync", "sync"):
        msgs = sc.messages(uuid=sc.uuid(role))
        assert error_replies(msgs) == [], role
        assert unanswered(all_msgs, sc.uuid(role)) == [], role
    # create, re-create, after the kernel's disk log: three instances of the same uuid
    assert request_counts(sc.messages(uuid=sc.uuid()))["CTR"] == 3


def test_two_mirrors_interleaved(e2e: E2E) -> None:
    sc = e2e.scenario("basic", "two-mirrors")
    for role in ("core", "disk"):
        msgs = sc.messages(uuid=sc.uuid(role))
        assert error_replies(msgs) == [], role
        assert request_counts(msgs)["MARK_REGION"] >= 1, role


def test_log_device_failure(e2e: E2E) -> None:
    sc = e2e.scenario("basic", "log-failure")
    failing = sc.messages(uuid=sc.uuid("failing"))
    assert ("FLUSH", -5) in error_replies(failing), "FLUSH must be answered -EIO"
    other = sc.messages(uuid=sc.uuid("other"))
    assert error_replies(other) == []
    assert unanswered(sc.messages(), sc.uuid("other")) == []


def test_basic_shutdown(e2e: E2E) -> None:
    e2e.scenario("basic", "shutdown")


def test_sigstop_longer_than_kernel_timeout(e2e: E2E) -> None:
    sc = e2e.scenario("restart", "sigstop")
    assert sc.info["max_write_latency_s"] >= 15
    assert error_replies(sc.messages(uuid=sc.uuid())) == []


def test_kill9_with_active_writer(e2e: E2E) -> None:
    sc = e2e.scenario("restart", "kill9-writer")
    after = requests(sc.messages(sc.info["capture_after_restart"], uuid=sc.uuid()))
    kinds = [m.rtype for m in after]
    assert "CTR" in kinds and "RESUME" in kinds[kinds.index("CTR") :], kinds[:10]
    ctr = after[kinds.index("CTR")]
    assert ctr.payload.endswith(b"\0"), ctr.payload  # the reconnect form of CTR
    replies = sc.messages(sc.info["capture_after_restart"], uuid=sc.uuid())
    assert error_replies(replies) == []


def test_restart_while_idle_restores_state(e2e: E2E) -> None:
    sc = e2e.scenario("restart", "restart-idle")
    after = sc.messages(sc.info["capture_after_restart"], uuid=sc.uuid())
    assert "CTR" not in {m.rtype for m in requests(after)}, "no reconnect needed"
    assert error_replies(after) == []


def test_restart_with_wiped_run_dir_answers_esrch(e2e: E2E) -> None:
    sc = e2e.scenario("restart", "wiped-rundir")
    after = sc.messages(sc.info["capture_after_restart"], uuid=sc.uuid())
    assert after, "the restarted daemon saw no request for the mirror"
    first_reply = next(m for m in after if not m.to_daemon)
    assert first_reply.error == -3, (first_reply.rtype, first_reply.error)  # -ESRCH
    kinds = [m.rtype for m in requests(after)]
    assert "CTR" in kinds and "RESUME" in kinds[kinds.index("CTR") :], kinds[:10]
    assert requests(after)[kinds.index("CTR")].payload.endswith(b"\0")


def test_restart_shutdown(e2e: E2E) -> None:
    e2e.scenario("restart", "shutdown")
