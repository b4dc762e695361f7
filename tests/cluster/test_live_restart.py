"""A dead daemon is not a dead node: the group rules for a member whose process dies while its
node (and its kernel, which keeps writing) stays in the ring.

Kernel facts these scenarios follow (drivers/md/dm-log-userspace-base.c, -transfer.c,
dm-raid1.c, dm-region-hash.c): a kernel whose log server died keeps its mirror and keeps
writing the regions it has marked (their FLUSH returned before the first write); it re-sends a
request only when its 15 s timeout expires, never a MARK that was acknowledged, and reconnects
(CTR + RESUME) only after an -ESRCH; after a write completes the region hash marks the region
again before the next write to it.
"""

from __future__ import annotations

import struct

from ulogd.cluster import group as g
from ulogd.state.regionlog import Rejoin
from ulogd.testing.vsgroup import SimNode, T, VirtualGroup, replica_differences

U64 = struct.Struct("=Q")
CORE = "1024 clustered-core 64 nosync"  # 16 regions, all clean and in sync


def regions(*rs: int) -> bytes:
    return b"".join(U64.pack(r) for r in rs)


def three() -> tuple[VirtualGroup, list[SimNode]]:
    vg = VirtualGroup(seed=3)
    nodes = []
    for i in (1, 2, 3):
        n = SimNode(i, CORE)
        vg.join(n)
        vg.run()
        assert n.ready
        nodes.append(n)
    return vg, nodes


def write(vg: VirtualGroup, node: SimNode, *rs: int) -> None:
    vg.request(node, T.MARK_REGION, regions(*rs))
    vg.request(node, T.FLUSH)
    vg.run()


def held_by(node: SimNode, nodeid: int) -> set[int]:
    assert node.log is not None
    return {r for r, h in node.log.holders.items() if nodeid in h}


def test_procdown_keeps_the_members_marks_and_sync_bits() -> None:
    vg, (a, b, c) = three()
    write(vg, b, 3, 4)
    vg.kill_daemon(b, at=len(vg.queue))
    vg.run()
    for n in (a, c):
        assert n.log is not None
        assert held_by(n, 2) == {3, 4}
        assert n.log.orphans == {2}
        assert n.log.sync_count == 16  # nothing lost sync
        assert not n.log.clean[3] and not n.log.clean[4]
        assert not n.recover  # nobody cycles its mirror: nothing is recovered
    assert not replica_differences([a, c])


def test_an_orphans_regions_are_never_made_clean_by_others() -> None:
    vg, (a, b, c) = three()
    write(vg, b, 5)
    vg.kill_daemon(b, at=len(vg.queue))
    vg.run()
    write(vg, a, 5)  # another node writes the same region: goes on as usual
    vg.request(a, T.CLEAR_REGION, regions(5))
    vg.request(a, T.FLUSH)
    vg.run()
    assert a.log is not None and c.log is not None
    assert not a.log.clean[5] and not c.log.clean[5]
    assert held_by(a, 2) == {5}


def test_an_orphans_out_of_sync_region_is_not_handed_out_for_recovery() -> None:
    vg, (a, b, _c) = three()
    write(vg, b, 6)
    vg.request(b, T.SET_REGION_SYNC, struct.pack("=Qq", 6, 0))  # a write to it failed
    vg.run()
    vg.request(b, T.SET_REGION_SYNC, struct.pack("=Qq", 9, 0))
    vg.run()
    vg.kill_daemon(b, at=len(vg.queue))
    vg.run()
    assert a.log is not None
    seq = vg.request(a, T.GET_RESYNC_WORK)
    vg.run()
    assert struct.unpack("=qQ", a.answers[seq].data) == (1, 9)  # region 9, never 6
    vg.request(a, T.SET_REGION_SYNC, struct.pack("=Qq", 9, 1))
    vg.run()
    seq = vg.request(a, T.GET_RESYNC_WORK)
    vg.run()
    assert struct.unpack("=qQ", a.answers[seq].data) == (0, 0)


def test_restarted_daemon_rejoins_with_its_kernels_marks() -> None:
    vg, (a, b, c) = three()
    write(vg, b, 3, 4)
    vg.request(b, T.CLEAR_REGION, regions(3))  # acknowledged, never multicast: b dies now
    vg.request(b, T.MARK_REGION, regions(7))  # acknowledged, never multicast either
    vg.kill_daemon(b, at=len(vg.queue))
    vg.run()
    assert held_by(a, 2) == {3, 4}
    vg.rejoin_after_restart(b)
    vg.run()
    assert b.ready and b.master is False
    # the kernel's own view (what it was acknowledged) replaced what the group kept
    for n in (a, b, c):
        assert held_by(n, 2) == {4, 7}
        assert n.log is not None and n.log.orphans == set()
        assert n.log.clean[3] and not n.log.clean[4] and not n.log.clean[7]
    assert not replica_differences([a, b, c])
    vg.request(b, T.CLEAR_REGION, regions(4, 7))
    vg.request(b, T.FLUSH)
    vg.run()
    assert a.log is not None and a.log.clean[4] and a.log.clean[7]


def test_orphan_node_leaving_the_ring_loses_sync_of_its_regions() -> None:
    vg, (a, b, c) = three()
    write(vg, b, 2, 8)
    vg.kill_daemon(b, at=len(vg.queue))
    vg.run()
    vg.ring_changed([1, 2, 3])
    vg.run()
    assert a.log is not None and a.log.sync_count == 16  # still in the ring: kept
    vg.ring_changed([1, 3])  # now the node itself is gone (its kernel with it)
    vg.run()
    for n in (a, c):
        assert n.log is not None
        assert n.log.orphans == set() and held_by(n, 2) == set()
        assert not n.log.sync[2] and not n.log.sync[8]
        assert n.recover and set(n.recover[-1]) == {2, 8}
    assert not replica_differences([a, c])


def test_a_node_back_with_a_new_kernel_releases_the_old_marks_as_lost() -> None:
    vg, (a, b, c) = three()
    write(vg, b, 1)
    vg.kill_daemon(b, at=len(vg.queue))
    vg.run()
    b.restart()  # the node rebooted: a fresh CTR, nothing restored
    vg.join(b)
    vg.run()
    for n in (a, b, c):
        assert n.log is not None and n.log.orphans == set()
        assert held_by(n, 2) == set() and not n.log.sync[1]
    assert a.recover and 1 in a.recover[-1]
    assert not replica_differences([a, b, c])


def test_postsuspend_clears_leftover_marks_so_the_leaver_is_no_orphan() -> None:
    vg, (a, b, _c) = three()
    write(vg, b, 10)
    vg.postsuspend(b)
    vg.run()
    vg.leave_if_done()
    vg.run()
    assert a.log is not None
    assert a.log.orphans == set() and held_by(a, 2) == set()
    assert a.log.clean[10] and a.log.sync_count == 16


def test_rejoin_without_quorum_releases_nothing() -> None:
    vg, (a, b, _c) = three()
    write(vg, b, 3)
    vg.request(b, T.CLEAR_REGION, regions(3))
    vg.kill_daemon(b, at=len(vg.queue))
    vg.run()
    b.restart_daemon()
    assert b.group is not None
    b.group.quorate = False
    vg.change(joined=[b])
    vg.run()
    assert held_by(a, 2) == {3}  # a CLEAR waits for quorum, and so does this release


def test_rejoin_modes_travel_as_op_sequence_numbers() -> None:
    assert {int(x) for x in Rejoin} == {0, 1, 2}
    assert g.Rejoin is Rejoin


def test_a_request_to_a_restarted_daemon_before_its_rejoin_waits_and_is_answered() -> None:
    # The kernel's timeout re-sends a FLUSH the dead daemon never answered; the new daemon
    # gets it while it still waits for the group's state (nobody would apply its message).
    vg, (a, b, _c) = three()
    write(vg, b, 5)
    vg.request(b, T.MARK_REGION, regions(6))
    vg.kill_daemon(b, at=len(vg.queue))
    vg.run()
    b.restart_daemon()
    vg.change(joined=[b])
    seq = vg.request(b, T.FLUSH)
    assert b.group is not None and b.group.phase is g.Phase.JOINING
    assert seq not in b.answers
    vg.run()
    assert b.answers[seq].error == 0 and b.ready
    for n in (a, b):
        assert held_by(n, 2) == {5, 6}
    assert not replica_differences([a, b, _c])
