"""CPG and quorum against one real corosync on loopback, clients in this process."""

from __future__ import annotations

import os
import selectors
import time
from collections.abc import Callable

import pytest

import cpg
from tests.harness.corosync import SingleNode

pytestmark = pytest.mark.corosync

GROUP = b"0f6b8a38-6d3c-4d0e-9a4e-single\0"


class Recorder:
    """Collects one handle's events in arrival order."""

    def __init__(self) -> None:
        self.events: list[object] = []
        self.lost: list[cpg.Lost] = []

    def messages(self) -> list[cpg.Message]:
        return [e for e in self.events if isinstance(e, cpg.Message)]

    def confchgs(self) -> list[cpg.ConfChg]:
        return [e for e in self.events if isinstance(e, cpg.ConfChg)]

    def handle(self) -> cpg.Handle:
        return cpg.Handle(self.events.append, self.events.append, self.lost.append)


def pump(handles: list[cpg.Handle], until: Callable[[], bool], timeout: float = 10.0) -> None:
    """A minimal event loop: poll, dispatch, flush, as the daemon's loop will."""
    sel = selectors.DefaultSelector()
    for h in handles:
        sel.register(h.fileno(), selectors.EVENT_READ, h)
    deadline = time.monotonic() + timeout
    try:
        while not until():
            if time.monotonic() > deadline:
                raise AssertionError("condition not reached in time")
            waits = [w for w in (h.retry_after() for h in handles) if w is not None]
            for key, _ in sel.select(min(waits) if waits else 0.1):
                handle: cpg.Handle = key.data
                if not handle.dispatch():
                    sel.unregister(key.fileobj)
            for h in handles:
                if h.is_open and h.pending:
                    h.flush_outbound()
    finally:
        sel.close()


def test_join_send_deliver_membership_leave(corosync_single: SingleNode) -> None:
    rec = Recorder()
    with rec.handle() as h:
        assert h.local_get() == 1
        assert h.max_atomic_msgsize() > 64 * 1024
        h.join(GROUP)
        me = cpg.Member(1, os.getpid(), cpg.Reason.JOIN)
        pump([h], lambda: len(rec.confchgs()) == 1)
        first = rec.confchgs()[0]
        assert first.group == GROUP and first.joined == (me,) and first.left == ()
        assert [m.ident for m in first.members] == [(1, os.getpid())]
        assert [m.ident for m in h.membership_get()] == [(1, os.getpid())]

        assert h.send(b"head:", b"payload") is True
        pump([h], lambda: len(rec.messages()) == 1)
        assert rec.messages() == [cpg.Message(GROUP, 1, os.getpid(), b"head:payload")]

        h.leave()
        pump([h], lambda: len(rec.confchgs()) == 2)
        assert rec.confchgs()[1].left == (cpg.Member(1, os.getpid(), cpg.Reason.LEAVE),)


def test_second_join_of_the_same_group_maps_cs_err_exist(corosync_single: SingleNode) -> None:
    with cpg.Handle() as a, cpg.Handle() as b:
        a.join(GROUP)
        with pytest.raises(cpg.CpgError) as info:
            b.join(GROUP)
        assert info.value.code is cpg.CsError.CS_ERR_EXIST
        assert info.value.name == "CS_ERR_EXIST" and info.value.op == "cpg_join"


def test_message_above_atomic_size_is_refused(corosync_single: SingleNode) -> None:
    rec = Recorder()
    with rec.handle() as h:
        h.join(GROUP)
        limit = h.max_atomic_msgsize()
        with pytest.raises(cpg.MessageTooLarge) as info:
            h.send(b"x" * (limit + 1))
        assert (info.value.size, info.value.limit) == (limit + 1, limit)
        with pytest.raises(cpg.MessageTooLarge):
            h.mcast(b"x" * limit, b"y")
        assert h.pending == 0
        h.send(b"x" * limit)  # exactly the limit is fine
        h.send(b"after")
        pump([h], lambda: len(rec.messages()) == 2)
        assert [len(m.data) for m in rec.messages()] == [limit, 5]


def test_burst_through_the_queue_keeps_order(corosync_single: SingleNode) -> None:
    """Queue 4 KiB messages faster than corosync takes them, until it answers TRY_AGAIN (its
    IPC ring is 1 MiB; a fast host may drain tens of MB before that, so the burst grows in
    batches, with nothing dispatched between them), then deliver everything in order."""
    rec = Recorder()
    batch, limit = 5_000, 200_000
    count = 0
    with rec.handle() as h:
        h.join(GROUP)
        pump([h], lambda: len(rec.confchgs()) == 1)
        while h.try_again_count == 0 and count < limit:
            h.send_many(i.to_bytes(4, "big") * 1024 for i in range(count, count + batch))
            count += batch
        assert h.try_again_count > 0, f"corosync took {count} x 4 KiB without a TRY_AGAIN"
        pump([h], lambda: len(rec.messages()) == count, timeout=120)
        assert h.pending == 0
        assert [int.from_bytes(m.data[:4], "big") for m in rec.messages()] == list(range(count))
        assert all(len(m.data) == 4096 for m in rec.messages())


def test_lost_corosync_is_an_event_and_reconnect_works(corosync_single: SingleNode) -> None:
    rec = Recorder()
    h = rec.handle()
    quorum_lost: list[cpg.Lost] = []
    q = cpg.Quorum(on_lost=quorum_lost.append)
    assert q.quorate is True and q.provider_set
    h.join(GROUP)
    pump([h], lambda: len(rec.confchgs()) == 1)
    h.send(b"queued before the crash")
    fd, qfd = h.fileno(), q.fileno()
    corosync_single.kill(1)

    start = time.monotonic()
    pump([h], lambda: bool(rec.lost), timeout=5)
    noticed = time.monotonic() - start
    assert noticed < 2.0
    assert rec.lost[0].code is cpg.CsError.CS_ERR_LIBRARY and h.lost is rec.lost[0]
    assert rec.lost[0].fd == fd  # what the loop must unregister
    assert not h.is_open and h.dispatch() is False and len(rec.lost) == 1
    assert q.dispatch() is False and quorum_lost[0].code is cpg.CsError.CS_ERR_LIBRARY
    assert quorum_lost[0].fd == qfd and not q.is_open

    with pytest.raises(cpg.CpgError) as info:  # nothing to reconnect to yet
        h.open()
    assert info.value.name == "CS_ERR_LIBRARY"

    corosync_single.revive(1)
    h.open()
    h.join(GROUP)
    h.send(b"after revive")
    pump([h], lambda: any(m.data == b"after revive" for m in rec.messages()))
    assert h.lost is None
    q.open()
    assert q.quorate is True
    h.close()
    q.close()


def test_quorum_single_node_is_quorate(corosync_single: SingleNode) -> None:
    changes: list[cpg.QuorumChange] = []
    with cpg.Quorum(on_change=changes.append) as q:
        assert q.is_quorate() is True
        assert q.fileno() >= 0
        assert q.dispatch() is True


def test_totem_callback_reports_the_ring_on_join(corosync_single: SingleNode) -> None:
    rings: list[cpg.TotemConfChg] = []
    with cpg.Handle(on_totem=rings.append) as h:
        h.join(GROUP)  # corosync sends the initial ring on join
        pump([h], lambda: bool(rings), timeout=5)
    assert rings[0].nodes == (1,) and rings[0].ring_nodeid == 1 and rings[0].ring_seq > 0
