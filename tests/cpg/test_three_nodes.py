"""Three corosync nodes in network namespaces, one member process per node.

Failure timings with token 1000 / token_coefficient 0: a lost node is noticed after about
2.2 token timeouts (~2.2 s); the tests allow 6 s.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.harness.corosync import MemberClient, MultiNode, member

pytestmark = pytest.mark.corosync

NODE_LOSS_TIMEOUT = 6.0


def start_members(cluster: MultiNode, group: str) -> list[MemberClient]:
    members = [member(cluster, n) for n in (1, 2, 3)]
    assert [m.nodeid for m in members] == [1, 2, 3]
    for m in members:
        m.send(f"join {group}")
    for m in members:
        m.wait_for("confchg", pred=lambda e: len(e["members"]) == 3)
    return members


def entries(event: dict[str, Any], key: str) -> set[tuple[int, int, str]]:
    return {tuple(x) for x in event[key]}  # type: ignore[misc]


def stream(m: MemberClient) -> list[tuple[Any, ...]]:
    """Messages and confchgs from the first 3-member view on, without local timestamps."""
    out: list[tuple[Any, ...]] = []
    for e in list(m.events):
        if e["ev"] == "confchg":
            if not out and len(e["members"]) < 3:
                continue
            out.append(("confchg", repr(e["members"]), repr(e["left"]), repr(e["joined"])))
        elif e["ev"] == "msg" and out:
            out.append(("msg", e["n"], e["p"], e["len"], e["h"]))
    return out


def wait_stats(m: MemberClient, count: int, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        stats = m.request("stats", "stats")
        if stats["count"] >= count or time.monotonic() > deadline:
            return stats
        time.sleep(0.1)


def test_identical_streams_under_a_4k_burst_with_flow_control(corosync_three: MultiNode) -> None:
    members = start_members(corosync_three, "streams")
    per_sender = 2000
    for m in members:
        m.send(f"burst {per_sender} 4096")
    sent = [m.wait_for("burst_sent", timeout=90) for m in members]
    stats = [wait_stats(m, 3 * per_sender) for m in members]

    assert [s["count"] for s in stats] == [3 * per_sender] * 3  # nothing lost
    assert [s["gaps"] for s in stats] == [0, 0, 0]  # per-sender FIFO
    assert len({s["digest"] for s in stats}) == 1  # byte-identical payload streams
    assert sum(s["try_again"] for s in sent) > 0  # the burst did hit TRY_AGAIN
    streams = [stream(m) for m in members]
    assert len(streams[0]) == 1 + 3 * per_sender
    assert streams[0] == streams[1] == streams[2]  # same messages and confchgs, same order


def test_join_leave_procdown_reasons(corosync_three: MultiNode) -> None:
    m1, m2 = member(corosync_three, 1), member(corosync_three, 2)
    for m in (m1, m2):
        m.send("join reasons")
    m1.wait_for("confchg", pred=lambda e: len(e["members"]) == 2)

    m3 = member(corosync_three, 3)
    m3.send("join reasons")
    for m in (m1, m2, m3):
        e = m.wait_for("confchg", pred=lambda e: len(e["members"]) == 3)
        assert entries(e, "joined") == {(3, m3.pid, "JOIN")}

    marks = [m1.mark(), m2.mark()]
    m3.send("leave")
    for m, mark in zip((m1, m2), marks, strict=True):
        e = m.wait_for("confchg", after=mark)
        assert entries(e, "left") == {(3, m3.pid, "LEAVE")} and len(e["members"]) == 2

    m4 = member(corosync_three, 3)
    m4.send("join reasons")
    for m in (m1, m2):
        m.wait_for("confchg", pred=lambda e: entries(e, "joined") == {(3, m4.pid, "JOIN")})
    marks = [m1.mark(), m2.mark()]
    killed = time.time()
    m4.kill()
    for m, mark in zip((m1, m2), marks, strict=True):
        e = m.wait_for("confchg", after=mark)
        assert entries(e, "left") == {(3, m4.pid, "PROCDOWN")}
        assert e["t"] - killed < 2.0
    # Both survivors saw the same membership history from their common 2-member view on.
    histories = []
    for m in (m1, m2):
        views = [(e["members"], e["left"], e["joined"]) for e in m.of("confchg")]
        first = next(i for i, v in enumerate(views) if len(v[0]) == 2)
        histories.append(views[first:])
    assert histories[0] == histories[1] and len(histories[0]) == 5


def test_nodedown_lost_event_and_reconnect_after_revive(corosync_three: MultiNode) -> None:
    m1, m2, m3 = start_members(corosync_three, "nodedown")
    marks = [m.mark() for m in (m1, m2, m3)]
    killed = time.time()
    corosync_three.kill(3)

    lost = m3.wait_for("lost", after=marks[2], timeout=5)
    assert lost["code"] == 2 and lost["t"] - killed < 2.0  # CS_ERR_LIBRARY, promptly
    detection = []
    for m, mark in zip((m1, m2), marks[:2], strict=True):
        e = m.wait_for("confchg", after=mark, timeout=NODE_LOSS_TIMEOUT + 2)
        assert entries(e, "left") == {(3, m3.pid, "NODEDOWN")}
        detection.append(e["t"] - killed)
    assert max(detection) < NODE_LOSS_TIMEOUT
    print(f"NODEDOWN seen after {[round(d, 3) for d in detection]} s")

    corosync_three.revive(3)
    marks = [m1.mark(), m2.mark()]
    m3.request("reconnect 20", "reconnected", timeout=25)
    for m, mark in zip((m1, m2), marks, strict=True):
        e = m.wait_for("confchg", after=mark, timeout=10)
        assert entries(e, "joined") == {(3, m3.pid, "JOIN")} and len(e["members"]) == 3
    m3.send("burst 10 100")
    for m in (m1, m2, m3):
        assert wait_stats(m, 10, timeout=10)["count"] >= 10


def test_partition_heal_nodedown_nodeup_and_quorum(corosync_three: MultiNode) -> None:
    members = start_members(corosync_three, "partition")
    m1, m2, m3 = members
    for m in members:
        m.send("quorum")
        m.wait_for("quorum", pred=lambda e: e["quorate"] is True)
    marks = [m.mark() for m in members]
    cut = time.time()
    corosync_three.partition(3)

    for m, mark in zip((m1, m2), marks[:2], strict=True):
        e = m.wait_for("confchg", after=mark, timeout=NODE_LOSS_TIMEOUT + 2)
        assert entries(e, "left") == {(3, m3.pid, "NODEDOWN")}
    # The isolated node sees both others go (in one confchg or two).
    deadline = time.monotonic() + NODE_LOSS_TIMEOUT + 2
    while True:
        gone = set().union(*(entries(e, "left") for e in m3.of("confchg", after=marks[2])))
        if gone >= {(1, m1.pid, "NODEDOWN"), (2, m2.pid, "NODEDOWN")}:
            break
        assert time.monotonic() < deadline, m3.events[-5:]
        time.sleep(0.05)
    assert gone == {(1, m1.pid, "NODEDOWN"), (2, m2.pid, "NODEDOWN")}
    e = m3.wait_for("quorum", after=marks[2], pred=lambda e: e["quorate"] is False)
    assert e["t"] - cut < NODE_LOSS_TIMEOUT
    # The majority stays quorate (no notification may say otherwise).
    assert all(q["quorate"] for m, mark in zip((m1, m2), marks[:2], strict=True)
               for q in m.of("quorum", after=mark))  # fmt: skip
    assert not corosync_three.quorum_status(3).get("Quorate", "").startswith("Yes")
    assert corosync_three.quorum_status(1).get("Quorate") == "Yes"

    marks = [m.mark() for m in members]
    corosync_three.heal(3)
    for m, mark in zip((m1, m2), marks[:2], strict=True):
        e = m.wait_for("confchg", after=mark, timeout=NODE_LOSS_TIMEOUT + 2)
        assert entries(e, "joined") == {(3, m3.pid, "NODEUP")}
    deadline = time.monotonic() + NODE_LOSS_TIMEOUT + 2
    while True:
        back = set().union(*(entries(e, "joined") for e in m3.of("confchg", after=marks[2])))
        if back >= {(1, m1.pid, "NODEUP"), (2, m2.pid, "NODEUP")}:
            break
        assert time.monotonic() < deadline, m3.events[-5:]
        time.sleep(0.05)
    m3.wait_for("quorum", after=marks[2], pred=lambda e: e["quorate"] is True)
    m3.send("burst 5 64")
    for m in members:
        assert wait_stats(m, 5, timeout=10)["count"] == 5
