"""Partition merges (corosync NODEUP) over the virtual-synchrony model: which side's replica
decides what, pinned without corosync.

The rule (:meth:`ulogd.state.regionlog.RegionLog.merge_from`): a node's mark references come only
from the side it held state on; a node on no side has left, its regions lose sync; a region
is clean only if nobody holds it and every side says it is clean or would be once its holders
there clear it.  ``tests/hardening/test_cluster_chaos.py`` checks the same on real corosync.
"""

from __future__ import annotations

import struct

from ulogd.testing.vsgroup import SimNode, T, VirtualGroup, replica_differences

U64 = struct.Struct("=Q")
CORE = "1024 clustered-core 64 nosync"  # 16 regions, all clean and in sync


def regions(*rs: int) -> bytes:
    return b"".join(U64.pack(r) for r in rs)


def three() -> tuple[VirtualGroup, SimNode, SimNode, SimNode]:
    vg = VirtualGroup(seed=1)
    nodes = []
    for i in (1, 2, 3):
        n = SimNode(i, CORE)
        vg.join(n)
        vg.run()
        assert n.ready
        nodes.append(n)
    return vg, *nodes  # type: ignore[return-value]


def write(vg: VirtualGroup, node: SimNode, *rs: int) -> None:
    vg.request(node, T.MARK_REGION, regions(*rs))
    seq = vg.request(node, T.FLUSH)
    vg.run()
    assert node.answers[seq].error == 0


def done(vg: VirtualGroup, node: SimNode, *rs: int) -> None:
    vg.request(node, T.CLEAR_REGION, regions(*rs))
    seq = vg.request(node, T.FLUSH)
    vg.run()
    assert node.answers[seq].error == 0


def view(node: SimNode, r: int) -> tuple[int, int, frozenset[int]]:
    rl = node.log
    assert rl is not None
    return rl.clean[r], rl.sync[r], frozenset(rl.holders.get(r, ()))


def revive_and_merge(vg: VirtualGroup, node: SimNode) -> None:
    """The node's corosync comes back alone (it is the first member of its own group, on its
    old replica), then the rings merge."""
    alone = VirtualGroup.revive(node, vg)
    alone.run()
    assert node.ready and node.master is True
    vg.merge(alone)
    vg.run()


def test_revived_node_does_not_resurrect_marks_cleared_meanwhile() -> None:
    """The chaos test's finding: node 1's old replica still shows node 2's mark on region 5,
    which node 2 cleared while node 1 was away; the merge must not bring it back."""
    vg, n1, n2, n3 = three()
    write(vg, n2, 5)
    assert view(n1, 5) == (0, 1, frozenset({2}))
    vg.lose_corosync(n1, at=len(vg.queue))
    vg.run()
    done(vg, n2, 5)
    assert view(n3, 5) == (1, 1, frozenset())
    revive_and_merge(vg, n1)
    for n in (n1, n2, n3):
        assert view(n, 5) == (1, 1, frozenset()), n.nodeid
        assert n.log is not None and not n.log.holders
    assert not replica_differences([n1, n2, n3])
    assert sorted(m for m, _ in n1.group.members) == [1, 2, 3]  # type: ignore[union-attr]


def test_revived_node_keeps_the_marks_its_kernel_still_holds() -> None:
    """What the revived node writes stays marked, though the others dropped its marks (and
    lost sync of its regions) when it vanished; what the others wrote meanwhile stays marked
    too."""
    vg, n1, n2, n3 = three()
    write(vg, n1, 7)
    write(vg, n2, 9)
    vg.lose_corosync(n1, at=len(vg.queue))
    vg.run()
    assert view(n2, 7) == (0, 0, frozenset())  # lost with node 1: to be recovered
    write(vg, n3, 11)
    done(vg, n2, 9)
    revive_and_merge(vg, n1)
    assert not replica_differences([n1, n2, n3])
    for n in (n1, n2, n3):
        assert view(n, 7) == (0, 0, frozenset({1})), n.nodeid
        assert view(n, 9) == (1, 1, frozenset()), n.nodeid
        assert view(n, 11) == (0, 1, frozenset({3})), n.nodeid
    # regions that lost sync in the merge are recovered by the node that had them in sync
    assert [7] in n1.recover


def test_stale_marks_of_a_node_on_no_side_lose_sync() -> None:
    """Node 1's old replica shows node 3's mark; node 3 crashed while node 1 was away and is
    on neither side of the merge: whatever it may have written is recovered."""
    vg, n1, n2, n3 = three()
    write(vg, n3, 4)
    vg.lose_corosync(n1, at=len(vg.queue))
    vg.run()
    vg.crash(n3, at=len(vg.queue))
    vg.run()
    # node 2 recovers region 4 (its kernel asks for resync work)
    vg.request(n2, T.GET_RESYNC_WORK)
    vg.run()
    vg.request(n2, T.SET_REGION_SYNC, struct.pack("=Qq", 4, 1))
    vg.run()
    assert view(n2, 4) == (0, 1, frozenset())
    revive_and_merge(vg, n1)
    assert not replica_differences([n1, n2])
    for n in (n1, n2):
        assert view(n, 4) == (0, 0, frozenset()), n.nodeid
