"""Scenario tests of the per-log group state machine over the virtual-synchrony model: each
test pins one behaviour (joins, departures, disk server, quorum, corrupt input, direct mode)."""

from __future__ import annotations

import struct

from ulogd.testing.vsgroup import SimNode, T, VirtualGroup, replica_differences

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
