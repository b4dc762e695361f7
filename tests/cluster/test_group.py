"""Scenario tests of the per-log group state machine over the virtual-synchrony model: each
test pins one behaviour (joins, departures, disk server, quorum, corrupt input, direct mode)."""

from __future__ import annotations

import logging
import struct

import pytest

from ulogd.cluster import group as g
from ulogd.cluster import messages as m
from ulogd.protocol import spec as p
from ulogd.testing.vsgroup import Msg, SimNode, T, VirtualGroup, replica_differences

U64 = struct.Struct("=Q")
CORE = "1024 clustered-core 64 nosync"  # 16 regions, all clean and in sync
DISK = "1024 clustered-disk 7:0 64 nosync"


def regions(*rs: int) -> bytes:
    return b"".join(U64.pack(r) for r in rs)


def identical(*nodes: SimNode) -> None:
    assert not replica_differences(nodes), replica_differences(nodes)


def cluster(ctr: str, *ids: int, chunk_size: int = 64) -> tuple[VirtualGroup, list[SimNode]]:
    """Nodes joining one after another, each getting state before the next joins."""
    vg = VirtualGroup(seed=1)
    nodes = []
    for i in ids:
        n = SimNode(i, ctr, chunk_size=chunk_size)
        vg.join(n)
        vg.run()
        assert n.ready
        nodes.append(n)
    return vg, nodes


def write(vg: VirtualGroup, node: SimNode, *rs: int) -> int:
    """MARK + FLUSH (what the kernel does before writing): returns the FLUSH seq."""
    vg.request(node, T.MARK_REGION, regions(*rs))
    return vg.request(node, T.FLUSH)


def test_master_after_elder_crash_numbers_later_joiners_from_their_join() -> None:
    """B and A join together (A master), C and D join before B has A's state, then A and C
    crash in one change: B becomes master and must give D the index of D's own join (not 0),
    or D's delivery count is off by one from B's for ever (found by test_group_model)."""
    vg = VirtualGroup(seed=1)
    a, b, c, d = (SimNode(i, CORE) for i in (1, 2, 3, 5))
    vg.change(joined=[a, b])
    vg.change(joined=[c, d])
    vg.crash(a, c, at=len(vg.queue))
    vg.run()
    assert b.master is True and d.master is False
    assert b.group is not None and d.group is not None
    assert b.group.index == d.group.index
    identical(b, d)


def test_snapshot_at_a_server_change_includes_the_change() -> None:
    """A change that admits a joiner and removes the disk server: the new server's snapshot must
    be taken after the change's own effects (the full rewrite it schedules), or the joiner's
    disk bookkeeping differs from everyone else's (found by test_group_model)."""
    vg, (a, b) = cluster(DISK, 1, 2)
    write(vg, b, 3)
    vg.run()
    vg.request(b, T.CLEAR_REGION, regions(3))
    vg.request(b, T.GET_RESYNC_WORK)  # carries the CLEAR: a dirty chunk, no flush yet
    vg.run()
    assert b.log is not None and b.log.dirty_chunks == {0}
    c = SimNode(3, DISK)
    vg.change(joined=[c], left=[a], drop_after=[a])  # a crashed; c joined: one change
    a.group = None
    vg.run_events()
    assert c.ready
    identical(b, c)
    vg.run()
    identical(b, c)


def test_lower_id_joiner_becoming_disk_server_rewrites_and_releases_flushes() -> None:
    """A joiner with the lowest node id becomes disk server when its checkpoint completes; the
    old server then leaves before its write finished.  The new server must rewrite the log at
    the hand-over, or the FLUSH that waited for the old server is never answered (found by
    test_group_model)."""
    vg, (c, d) = cluster(DISK, 3, 4)
    flush = write(vg, d, 1)
    while vg.queue:
        vg.deliver_one()  # the FLUSH is delivered, server 3's write stays pending
    assert flush not in d.answers and len(vg.pending_writes) == 1
    a = SimNode(1, DISK)
    vg.join(a)
    vg.run_events()
    assert a.ready and a.group is not None and a.group.disk_server == 1
    vg.postsuspend(c)
    vg.leave_if_done()
    vg.run_events()
    assert c.group is not None and c.group.phase.name == "LEFT"
    vg.run()  # server 3's write is gone with it; server 1's rewrite completes
    assert d.answers[flush].error == 0
    assert d.answer_counts[flush] == 1
    identical(a, d)


def test_held_clear_is_not_reordered_after_a_new_mark() -> None:
    """Without quorum CLEARs are held back; the kernel then marks the same region again for a
    new write.  The held CLEAR must not be sent after that MARK (it would make the region clean
    while the new write is in flight) — found by test_group_model."""
    vg, (a, b) = cluster(CORE, 1, 2)
    write(vg, a, 0)
    vg.run()
    vg.set_quorate(a, False)
    vg.request(a, T.CLEAR_REGION, regions(0))  # first write done
    flush = write(vg, a, 0)  # a second write to region 0
    vg.run()
    assert a.answers[flush].error == 0
    vg.set_quorate(a, True)  # the held CLEARs go out now
    vg.run()
    for n in (a, b):
        assert n.log is not None
        assert n.log.clean[0] == 0 and n.log.holders.get(0) == {1}


def test_late_joiner_gets_every_nodes_mark_references() -> None:
    """cmirrord §9.1: a joiner without the others' marks would clean a region another node is
    still writing when it clears its own mark on it."""
    vg, (a, b) = cluster(CORE, 1, 2)
    write(vg, a, 3, 4)
    write(vg, b, 4)
    vg.run()
    c = SimNode(3, CORE)
    vg.join(c)
    vg.run()
    assert c.log is not None and c.log.holders == {3: {1}, 4: {1, 2}}
    write(vg, c, 4)
    vg.run()
    vg.request(c, T.CLEAR_REGION, regions(4))
    vg.request(b, T.CLEAR_REGION, regions(4))
    vg.request(c, T.FLUSH)
    vg.request(b, T.FLUSH)
    vg.run()
    for n in (a, b, c):
        assert n.log is not None and n.log.clean[4] == 0 and n.log.holders[4] == {1}
    identical(a, b, c)


def test_lowest_id_joiner_is_neither_server_nor_answers_before_state() -> None:
    vg, (b, c) = cluster(DISK, 2, 3)
    write(vg, b, 1)
    write(vg, c, 2)
    vg.run()
    a = SimNode(1, DISK)
    vg.join(a)
    vg.deliver_one()  # only the change that admits it
    assert a.group is not None and a.group.phase is g.Phase.JOINING and not a.ready
    assert b.group is not None and b.group.disk_server == 2
    assert a.group.disk_server is None
    flush = write(vg, c, 5)  # delivered to `a` while it waits for state
    writes_before = a.writes
    while vg.queue:
        vg.deliver_one()
        if a.group.phase is g.Phase.JOINING:
            assert a.writes == writes_before and not a.answers
    assert a.ready
    vg.run()
    assert c.answers[flush].error == 0
    assert a.log is not None and a.log.holders == {1: {2}, 2: {3}, 5: {3}}
    identical(a, b, c)


def test_requests_between_join_and_checkpoint_are_applied_once() -> None:
    vg, (a, b) = cluster(CORE, 1, 2, chunk_size=24)
    c = SimNode(3, CORE, chunk_size=24)
    flush = write(vg, b, 6)  # multicast before the join, ordered after it
    vg.join(c, at=0)
    rs = vg.request(b, T.GET_RESYNC_WORK)
    vg.request(a, T.SET_REGION_SYNC, struct.pack("=Qq", 9, 0))
    vg.run()
    assert c.ready and b.answers[flush].error == 0 and rs in b.answers
    assert c.log is not None and c.log.holders == {6: {2}}
    assert c.log.sync[9] == 0 and c.log.sync_count == 15
    identical(a, b, c)


def test_checkpoint_sender_crash_mid_transfer() -> None:
    vg, (a, b) = cluster(CORE, 1, 2, chunk_size=16)
    write(vg, a, 1)
    write(vg, b, 2)
    vg.run()
    c = SimNode(3, CORE, chunk_size=16)
    vg.join(c)
    vg.deliver_one()  # the change
    vg.deliver_one()  # one chunk of several
    assert len(vg.queue) >= 2  # more chunks of a's snapshot to come
    vg.crash(a, at=len(vg.queue) - 2)  # before its last chunks: they are lost
    senders = []
    while vg.queue:
        e = vg.queue[0]
        if isinstance(e, Msg) and isinstance(m.decode(e.data), m.CheckpointChunk):
            senders.append(e.sender.nodeid)
        vg.deliver_one()
    vg.run()
    assert 2 in senders  # b sent a new snapshot
    assert c.ready and c.master is False
    assert c.log is not None and c.log.holders == {2: {2}}
    assert c.log.sync[1] == 0  # a's marked region lost sync
    identical(b, c)


def test_several_joins_and_leaves_in_one_change() -> None:
    vg, (a, b, c) = cluster(CORE, 1, 2, 3)
    write(vg, b, 7)
    write(vg, c, 8)
    vg.run()
    d, e = SimNode(4, CORE), SimNode(5, CORE)
    vg.change(joined=[d, e], left=[a, c], drop_after=[a, c])
    a.group = c.group = None
    vg.run()
    assert d.ready and e.ready
    identical(b, d, e)
    assert b.log is not None and b.log.holders == {7: {2}} and b.log.sync[8] == 0


def test_everyone_joins_at_once_one_master() -> None:
    vg = VirtualGroup()
    nodes = [SimNode(i, CORE) for i in (4, 2, 3)]
    vg.change(joined=nodes)
    vg.run()
    assert [n.master for n in nodes] == [False, True, False]
    identical(*nodes)


def test_crash_loses_sync_of_marked_regions_and_hands_recovery_out_again() -> None:
    vg, (a, b) = cluster("1024 clustered-core 64", 1, 2)  # not nosync: all out of sync
    for r in range(16):
        vg.request(a, T.SET_REGION_SYNC, struct.pack("=Qq", r, 1))
    vg.run()
    vg.request(b, T.SET_REGION_SYNC, struct.pack("=Qq", 9, 0))
    got = vg.request(b, T.GET_RESYNC_WORK)
    write(vg, b, 3)
    vg.run()
    assert struct.unpack("=qQ", b.answers[got].data) == (1, 9)
    vg.crash(b, at=len(vg.queue))
    vg.run()
    assert a.log is not None
    assert a.log.sync[3] == 0 and a.log.clean[3] == 0 and 3 not in a.log.holders
    assert a.log.recovering == -1 and a.recover == [[3]]
    again = vg.request(a, T.GET_RESYNC_WORK)
    vg.run()
    assert struct.unpack("=qQ", a.answers[again].data)[0] == 1


def test_graceful_leave_after_own_messages() -> None:
    vg, (a, b) = cluster(CORE, 1, 2)
    write(vg, b, 2)
    vg.request(b, T.CLEAR_REGION, regions(2))
    ps = vg.postsuspend(b)
    assert not b.left_ok  # its FLUSH and CLEAR are still in flight
    vg.run_events()
    assert b.left_ok and b.answers[ps].error == 0
    vg.leave_if_done()
    vg.run()
    assert a.log is not None and a.log.clean[2] == 1 and a.log.sync[2] == 1
    assert a.group is not None and a.group.members == (a.member,)


def test_clustered_disk_flush_waits_for_disk_done() -> None:
    vg, (a, b) = cluster(DISK, 1, 2)
    vg.run()
    flush = write(vg, b, 4)
    vg.run_events()
    assert flush not in b.answers and len(vg.pending_writes) == 1
    assert vg.pending_writes[0][0] is a  # the server writes
    vg.complete_write(0, True)
    vg.run_events()
    assert b.answers[flush].error == 0


def test_disk_server_crash_releases_waiting_flushes_at_once() -> None:
    vg, (a, b, c) = cluster(DISK, 1, 2, 3)
    vg.run()
    f1, f2 = write(vg, b, 4), write(vg, c, 5)
    vg.run_events()
    assert not ({f1} & set(b.answers)) and not ({f2} & set(c.answers))
    vg.crash(a, at=len(vg.queue))
    vg.run_events()
    assert [n.nodeid for n, _ in vg.pending_writes] == [2]  # full rewrite by the new server
    vg.complete_write(0, True)
    vg.run_events()
    assert b.answers[f1].error == 0 and c.answers[f2].error == 0


def test_write_failure_every_member_reports_disk_failed() -> None:
    vg, (a, b) = cluster(DISK, 1, 2)
    vg.run()
    flush = write(vg, b, 4)
    vg.run_events()
    vg.complete_write(0, False)
    vg.run_events()
    assert b.answers[flush].error == p.EIO
    for n in (a, b):
        assert n.log is not None and n.log.health() == "D" and n.log.full_write
    identical(a, b)


def test_quorum_lost_no_clear_applied_until_it_returns() -> None:
    vg, (a, b) = cluster(CORE, 1, 2)
    write(vg, a, 2)
    vg.run()
    vg.set_quorate(a, False)
    vg.request(a, T.CLEAR_REGION, regions(2))
    flush = vg.request(a, T.FLUSH)
    vg.run()
    assert a.answers[flush].error == 0
    for n in (a, b):
        assert n.log is not None and n.log.clean[2] == 0 and n.log.holders[2] == {1}
    vg.set_quorate(a, True)
    vg.run()
    for n in (a, b):
        assert n.log is not None and n.log.clean[2] == 1 and 2 not in n.log.holders


def test_foreign_and_corrupt_messages_dropped_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    vg, (a, b) = cluster(CORE, 1, 2)
    good = m.encode_ops([m.OpRecord(m.Op.MARK, 1, (3,))])
    vg.queue.append(Msg(a, good[:-1] + bytes([good[-1] ^ 1])))  # body CRC
    vg.queue.append(Msg(a, b"not ulogd"))
    stranger = SimNode(9, CORE)  # a sender that is not a member holding state
    vg.queue.append(Msg(stranger, good))
    with caplog.at_level(logging.ERROR):
        vg.run()
    for n in (a, b):
        assert n.group is not None and n.group.dropped == 3
        assert n.log is not None and not n.log.holders
    assert "body CRC" in caplog.text and "not a member holding state" in caplog.text
    identical(a, b)


def test_direct_mode_only_alone_and_idle() -> None:
    vg, (a,) = cluster(CORE, 1)
    assert a.group is not None and a.group.direct
    vg.request(a, T.MARK_REGION, regions(1))
    assert not a.group.direct  # a MARK waits in the outbox
    vg.request(a, T.FLUSH)
    assert not a.group.direct  # in flight
    vg.run()
    assert a.group.direct
    b = SimNode(2, CORE)
    vg.join(b)
    vg.run()
    assert not a.group.direct and b.group is not None and not b.group.direct
    vg.crash(b, at=len(vg.queue))
    vg.run()
    assert a.group.direct


def test_new_master_ignores_a_departed_elders_chunks_with_the_same_point() -> None:
    """Checkpoint points are in the sender's numbering.  Joiners 3 and 5 get part of elder 1's
    checkpoint (point 3); 1 crashes; 3 becomes master at its own index 3 and replays 1's queued
    chunks: they must not count as its own checkpoint's (found by test_group_model)."""
    vg = VirtualGroup()
    a = SimNode(1, CORE, chunk_size=24)
    vg.join(a)
    vg.run()
    vg.request(a, T.GET_RESYNC_WORK)
    vg.request(a, T.GET_RESYNC_WORK)
    vg.run()
    assert a.group is not None and a.group.index == 2
    c, e = SimNode(3, CORE, chunk_size=24), SimNode(5, CORE, chunk_size=24)
    vg.change(joined=[c, e])
    vg.deliver_one()
    assert a.group.ckpt_point == 3 and len(vg.queue) >= 3
    vg.deliver_one()
    vg.deliver_one()  # two chunks of a's snapshot
    vg.crash(a, at=0)  # the rest are lost
    vg.run()
    assert c.master is True and e.ready and e.master is False
    identical(c, e)
    assert c.group is not None and e.group is not None and c.group.valid == e.group.valid
