"""The region log's rules, one behaviour per test, plus invariants under random requests."""

from __future__ import annotations

import pytest
from bitarray import bitarray
from hypothesis import given, settings
from hypothesis import strategies as st

from ulogd.protocol import ctr
from ulogd.protocol import spec as p
from ulogd.state.regionlog import RegionLog, Resume, Snapshot, SnapshotError, new_bitmaps

A, B = 1, 2


def make(text: bytes = b"1024 clustered-core 64", node: int = A) -> RegionLog:
    config = ctr.parse(text)
    clean, sync = new_bitmaps(config)
    return RegionLog(config, clean, sync, local_node=node, device_id="7:2")


def resync_all(rl: RegionLog, node: int = A) -> int:
    n = 0
    while True:
        i, r = rl.get_resync_work(node)
        if not i:
            return n
        assert rl.set_region_sync(node, r, True) == 0
        rl.clear(node, [r])
        n += 1


def test_new_log_is_out_of_sync_and_not_clean_unless_nosync() -> None:
    rl = make()
    assert rl.region_count == 16 and rl.sync_count == 0
    assert all(rl.is_clean(r) == (0, 0) for r in range(16))
    nosync = make(b"1024 core 64 nosync")
    assert nosync.sync_count == 16 and all(nosync.is_clean(r) == (0, 1) for r in range(16))


def test_full_resync_visits_every_region_once_then_sets_override() -> None:
    rl = make()
    assert rl.resume() is Resume.DONE
    assert resync_all(rl) == 16
    assert rl.sync_count == 16 and rl.in_sync_override
    assert rl.get_resync_work(A) == (0, 0)
    assert rl.hint() == 16


def test_resync_work_is_repeated_for_the_recoverer_and_refused_to_others() -> None:
    rl = make()
    assert rl.get_resync_work(A) == (1, 0)
    assert rl.get_resync_work(A) == (1, 0)  # kernel retry
    assert rl.get_resync_work(B) == (0, 0)  # one region at a time
    rl.set_region_sync(A, 0, True)
    assert rl.get_resync_work(B) == (1, 1)


def test_only_the_recovering_region_ends_a_recovery() -> None:
    rl = make()
    rl.get_resync_work(A)  # region 0
    rl.set_region_sync(B, 9, False)  # another node's write failure elsewhere
    assert rl.recovering == 0 and rl.get_resync_work(B) == (0, 0)


def test_mark_makes_dirty_and_clear_makes_clean_only_when_in_sync() -> None:
    rl = make(b"1024 core 64 nosync")
    assert rl.mark(A, [3]) == 0 and rl.is_clean(3) == (0, 0)
    assert rl.clear(A, [3]) == 0 and rl.is_clean(3) == (0, 1)
    rl.set_region_sync(A, 5, False)
    assert rl.is_clean(5) == (0, 0)
    rl.clear(A, [5])
    assert rl.is_clean(5) == (0, 0)  # an out-of-sync region is never made clean


def test_region_stays_dirty_while_another_node_holds_a_mark() -> None:
    rl = make(b"1024 core 64 nosync")
    rl.mark(A, [4])
    rl.mark(B, [4])
    rl.clear(A, [4])
    assert rl.is_clean(4) == (0, 0)
    rl.clear(B, [4])
    assert rl.is_clean(4) == (0, 1)


def test_integrated_flush_applies_its_marks() -> None:
    rl = make(b"1024 core 64 nosync")
    assert rl.flush(A, [1, 2]) == 0
    assert rl.is_clean(1) == (0, 0) and rl.is_clean(2) == (0, 0)


def test_every_region_number_is_bounds_checked() -> None:
    rl = make(b"1024 core 64 nosync")
    assert rl.mark(A, [1, 16]) == p.EINVAL
    assert rl.is_clean(1) == (0, 1) and not rl.holders  # nothing applied from a rejected batch
    assert rl.clear(A, [99]) == p.EINVAL
    assert rl.is_clean(16)[0] == p.EINVAL
    assert rl.in_sync(16)[0] == p.EINVAL
    assert rl.set_region_sync(A, 16, True) == p.EINVAL
    assert rl.is_remote_recovering(A, 16)[0] == p.EINVAL


def test_in_sync_override_answers_one_after_a_full_resync() -> None:
    rl = make()
    rl.resume()
    resync_all(rl)
    rl.set_region_sync(A, 7, False)
    assert rl.in_sync(7) == (0, 1)
    assert rl.sync_count == 15
    rl.postsuspend()
    rl.resume()
    assert rl.in_sync(7) == (0, 0)  # cleared at resume


def test_lost_sync_moves_the_search_back() -> None:
    rl = make()
    rl.resume()
    resync_all(rl)
    rl.postsuspend()
    rl.resume()
    rl.set_region_sync(A, 3, False)
    assert rl.get_resync_work(A) == (1, 3)


def test_remote_recovering_only_with_other_members() -> None:
    rl = make()
    assert rl.is_remote_recovering(A, 2) == (0, 0, 0)
    rl.members.add(B)
    err, rec, _hint = rl.is_remote_recovering(A, 2)
    assert (err, rec) == (0, 1)
    assert rl.get_resync_work(A) == (1, 2)  # written regions are recovered first
    rl.presuspend()
    assert rl.is_remote_recovering(A, 3) == (0, 0, 16)


def test_departed_node_regions_lose_sync_and_its_recovery_is_handed_out() -> None:
    rl = make(b"1024 core 64 nosync")
    rl.members |= {B}
    rl.mark(B, [1, 2])
    rl.mark(A, [2])
    rl.get_resync_work(B)
    lost = rl.node_departed(B)
    assert lost == [1, 2]
    assert rl.sync_count == 14 and rl.in_sync(1) == (0, 0)
    assert rl.get_resync_work(A)[0] == 1


def test_disk_load_follows_the_kernel_disk_log_rules() -> None:
    rl = make(b"1024 clustered-disk 7:2 64")
    assert rl.resume() is Resume.NEEDS_DISK
    image = bitarray("1011" + "0" * 4, endian="little")
    rl.load_disk(image, nr_regions=8, read_failed=False)
    assert rl.resumed and rl.disk_loaded
    assert [rl.sync[r] for r in range(16)] == [1, 0, 1, 1] + [0] * 12
    assert rl.sync_count == 3
    assert rl.take_disk_work() is None  # write everything back once


def test_nosync_keyword_reinitialises_a_disk_log() -> None:
    rl = make(b"1024 clustered-disk 7:2 64 nosync")
    rl.load_disk(bitarray("0" * 16, endian="little"), nr_regions=16, read_failed=False)
    assert rl.sync_count == 16


def test_unreadable_disk_means_everything_out_of_sync_and_failed() -> None:
    rl = make(b"1024 clustered-disk 7:2 64")
    rl.load_disk(None, 0, read_failed=True)
    assert rl.sync_count == 0 and rl.disk_failed and rl.status_info() == "3 clustered-disk 7:2 D"


def test_disk_work_names_the_changed_chunks_only() -> None:
    rl = make(b"16777216 clustered-disk 7:2 2 nosync")  # 8 M regions
    rl.load_disk(None, 0, read_failed=False)
    rl.take_disk_work()
    assert rl.take_disk_work() is False
    rl.mark(A, [5, 4096 * 3 + 1])
    assert rl.take_disk_work() == {0, 3}
    rl.mark(A, [5])  # already dirty: nothing changes on disk
    assert rl.take_disk_work() is False
    assert rl.disk_written(False) == p.EIO and rl.take_disk_work() is None


def test_a_write_that_records_marks_is_durable_one_of_clears_only_is_not() -> None:
    rl = make(b"16777216 clustered-disk 7:2 2 nosync")
    rl.load_disk(None, 0, read_failed=False)
    assert rl.take_disk_write() == (None, True)  # the whole unit: always durable
    rl.mark(A, [5])
    assert rl.take_disk_write() == ({0}, True)  # a region goes dirty: durable
    rl.clear(A, [5])
    assert rl.take_disk_write() == ({0}, False)  # only a clear: may stay in the cache
    rl.mark(A, [6, 4096 * 2])
    rl.clear(A, [6])
    assert rl.take_disk_write() == ({0, 2}, True)  # a clear and a mark together: durable
    rl.mark(A, [7])
    rl.clear(A, [7])  # marked and cleared again before the write: durable (conservative)
    assert rl.take_disk_write() == ({0}, True)


def test_a_region_losing_sync_makes_the_next_write_durable() -> None:
    rl = make(b"16777216 clustered-disk 7:2 2 nosync")
    rl.load_disk(None, 0, read_failed=False)
    rl.take_disk_work()
    assert rl.set_region_sync(A, 9, False) == 0  # the kernel's write to one leg failed
    assert rl.take_disk_write() == ({0}, True)


def test_after_a_failed_cached_write_everything_is_written_durably() -> None:
    rl = make(b"16777216 clustered-disk 7:2 2 nosync")
    rl.load_disk(None, 0, read_failed=False)
    rl.take_disk_work()
    rl.mark(A, [1])
    rl.take_disk_work()
    rl.clear(A, [1])
    assert rl.take_disk_write() == ({0}, False)
    assert rl.disk_written(False) == p.EIO
    assert rl.take_disk_write() == (None, True)


def test_status_strings() -> None:
    assert make().status_info() == "1 clustered-core"
    assert make().status_table() == "clustered-core 64  "
    assert (
        make(b"1024 clustered-core 64 nosync block_on_error").status_table()
        == "clustered-core 64 nosync block_on_error "
    )
    assert make(b"1024 clustered-disk 7:2 64").status_info() == "3 clustered-disk 7:2 A"
    assert make(b"1024 core 64").status_table() == "core 1 64 "
    assert make(b"1024 disk 7:2 64 sync").status_table() == "disk 3 7:2 64 sync "


def test_reload_adopts_the_previous_state() -> None:
    old = make()
    old.resume()
    resync_all(old)
    old.mark(A, [3])
    new = make()
    new.adopt(old)
    assert new.sync_count == 16 and new.is_clean(3) == (0, 0) and new.holders == {3: {A}}


ops = st.one_of(
    st.tuples(st.just("mark"), st.sampled_from([A, B]), st.lists(st.integers(0, 15), max_size=4)),
    st.tuples(st.just("clear"), st.sampled_from([A, B]), st.lists(st.integers(0, 15), max_size=4)),
    st.tuples(st.just("work"), st.sampled_from([A, B]), st.just([])),
    st.tuples(st.just("sync"), st.sampled_from([A, B]), st.lists(st.integers(0, 15), max_size=1)),
    st.tuples(st.just("unsync"), st.sampled_from([A, B]), st.lists(st.integers(0, 15), max_size=1)),
    st.tuples(st.just("depart"), st.just(B), st.just([])),
)


@settings(max_examples=300)
@given(st.lists(ops, max_size=60))
def test_invariants_hold_under_any_request_sequence(seq: list) -> None:
    rl = make()
    rl.members |= {B}
    rl.resume()
    for op, node, regions in seq:
        if op == "mark":
            rl.mark(node, regions)
        elif op == "clear":
            rl.clear(node, regions)
        elif op == "work":
            rl.get_resync_work(node)
        elif op in ("sync", "unsync") and regions:
            rl.set_region_sync(node, regions[0], op == "sync")
        elif op == "depart":
            rl.node_departed(node)
            rl.members.add(node)
        n = rl.region_count
        assert rl.sync_count == rl.sync.count(1, 0, n)
        assert not rl.sync[n:].any() and not rl.clean[n:].any()
        for r in range(n):
            if rl.holders.get(r):
                assert not rl.clean[r], "a held region is clean"
            if rl.clean[r]:
                assert rl.sync[r], "an out-of-sync region is clean"


# -- partition merges --------------------------------------------------------------------------
C = 3


def state(rl: RegionLog) -> tuple[object, ...]:
    n = rl.region_count
    return (
        rl.clean[:n].to01(), rl.sync[:n].to01(), rl.sync_count,
        {r: frozenset(h) for r, h in rl.holders.items()},
        rl.recovering, rl.recoverer, rl.sync_search, tuple(rl.priority), rl.disk_failed,
    )  # fmt: skip


def copy_of(rl: RegionLog) -> RegionLog:
    other = rl.blank_copy()
    other.clean[:] = rl.clean
    other.sync[:] = rl.sync
    other.sync_count = rl.sync_count
    other.holders = {r: set(h) for r, h in rl.holders.items()}
    other.sync_search, other.recovering, other.recoverer = (
        rl.sync_search, rl.recovering, rl.recoverer,
    )  # fmt: skip
    other.priority = list(rl.priority)
    return other


def test_merge_takes_each_nodes_marks_from_its_own_side_only() -> None:
    """Side {A} is an old replica (A's corosync died and came back): it still shows B's mark
    on 5, which B cleared on its own side {B, C}.  A's own mark on 7 is A's side's word."""
    old = make(b"1024 clustered-core 64 nosync")
    old.mark(B, [5])
    old.mark(A, [7])
    live = make(b"1024 clustered-core 64 nosync")
    live.mark(C, [9])
    lost = old.merge_from([(old, {A}), (live, {B, C})])
    assert lost == []
    assert old.holders == {7: {A}, 9: {C}}
    assert old.is_clean(5) == (0, 1) and old.is_clean(7) == (0, 0) and old.is_clean(9) == (0, 0)
    assert old.sync_count == 16


def test_merge_loses_sync_where_a_node_on_no_side_held_marks() -> None:
    """C is on neither side (it left while A was away): whatever it may have written is
    recovered, like at any departure."""
    old = make(b"1024 clustered-core 64 nosync")
    old.mark(C, [4])
    old.sync_search = 10
    live = make(b"1024 clustered-core 64 nosync")
    assert live.merge_from([(old, {A}), (live, {B})]) == [4]
    assert live.holders == {} and live.in_sync(4) == (0, 0) and live.is_clean(4) == (0, 0)
    assert live.sync_search == 0 and live.get_resync_work(B) == (1, 4)


def test_merge_keeps_a_region_dirty_that_a_side_does_not_call_clean() -> None:
    """Out of sync on one side, or dirty there without a holder (recovered, not cleared yet):
    not clean.  Held and in sync there: clean once nobody holds it any more."""
    a = make(b"1024 clustered-core 64 nosync")
    b = make(b"1024 clustered-core 64 nosync")
    a.set_region_sync(A, 1, False)
    a.set_region_sync(A, 2, False)
    a.set_region_sync(A, 2, True)  # recovered, nobody cleared it yet
    b.mark(B, [3])
    b.mark(A, [3])  # old: A cleared 3 on its own side
    assert b.merge_from([(a, {A}), (b, {B})]) == [1]
    assert [b.is_clean(r)[1] for r in (1, 2, 3)] == [0, 0, 0] and b.holders == {3: {B}}
    b.clear(B, [3])
    assert b.is_clean(3) == (0, 1)


def test_merge_recovery_assignment_survives_only_if_every_side_agrees() -> None:
    a = make()
    b = make()
    assert a.get_resync_work(A) == (1, 0) and b.get_resync_work(A) == (1, 0)
    a.merge_from([(a, {A}), (b, {B})])
    assert (a.recovering, a.recoverer) == (0, A)
    c = make()
    assert c.get_resync_work(B) == (1, 0)
    a.merge_from([(a, {A}), (c, {B})])
    assert (a.recovering, a.recoverer) == (-1, -1)


side_ops = st.lists(
    st.tuples(st.sampled_from(["mark", "clear", "lose", "sync"]), st.integers(1, 4),
              st.integers(0, 15)),
    max_size=20,
)  # fmt: skip


@settings(max_examples=200)
@given(st.lists(st.tuples(side_ops, st.sets(st.integers(1, 4), max_size=3)), min_size=1,
                max_size=4), st.randoms(use_true_random=False))  # fmt: skip
def test_merge_is_alike_in_any_order_and_keeps_the_invariants(sides: list, rnd: object) -> None:
    """Every member merges the same contributions in its own order: same result; clean
    implies in sync and not held; sync_count is the popcount; no side-member's mark is lost."""
    logs = []
    for ops_, nodes in sides:
        rl = make(b"1024 clustered-core 64 nosync")
        for op, node, r in ops_:
            if op == "mark":
                rl.mark(node, [r])
            elif op == "clear":
                rl.clear(node, [r])
            elif op == "lose":
                rl.set_region_sync(node, r, False)
            else:
                rl.set_region_sync(node, r, True)
        logs.append((rl, nodes))
    results = []
    for _ in range(3):
        order = list(logs)
        rnd.shuffle(order)  # type: ignore[attr-defined]
        target = copy_of(order[0][0])
        contributions = [(target, order[0][1])] + [(copy_of(rl), s) for rl, s in order[1:]]
        target.merge_from(contributions)
        results.append(state(target))
        n = target.region_count
        assert target.sync_count == target.sync.count(1, 0, n)
        assert not (target.clean[:n] & ~target.sync[:n]).any()
        assert not any(target.clean[r] for r in target.holders)
        for rl, nodes in logs:
            for r, h in rl.holders.items():
                assert h & nodes <= target.holders.get(r, set())
    assert results[0] == results[1] == results[2]


def _snapshot_of(rl: RegionLog, **changes: object) -> Snapshot:
    fields = {
        "clean": rl.clean.copy(), "sync": rl.sync.copy(), "holders": {}, "orphans": set(),
        "priority": [], "dirty_chunks": set(), "sync_search": 0, "recovering": -1,
        "recoverer": -1, "disk_failed": False, "full_write": False, "in_sync_override": False,
    }  # fmt: skip
    fields.update(changes)
    return Snapshot(**fields)  # type: ignore[arg-type]


def test_a_snapshot_with_a_held_region_clean_is_refused_and_changes_nothing() -> None:
    peer = make()
    peer.set_region_sync(A, 5, True)
    peer.clear(A, [5])  # region 5 in sync and clean in the peer
    rl = make()
    before = (rl.clean.copy(), rl.sync.copy(), rl.sync_count)
    with pytest.raises(SnapshotError, match="inconsistent"):
        rl.load(_snapshot_of(peer, holders={5: {B}}))
    assert (rl.clean, rl.sync, rl.sync_count) == before and not rl.holders


def test_a_loaded_snapshot_is_the_replica_and_its_scalars_are_to_be_saved() -> None:
    peer = make()
    peer.mark(B, [7])
    rl = make()
    rl.load(_snapshot_of(peer, holders={7: {B}}, sync_search=3))
    assert rl.marks_of(B) == [7] and rl.marks_of(A) == []
    assert rl.sync_count == peer.sync_count and rl.sync_search == 3
    assert rl.scalars_changed
    assert rl.take_scalars().sync_search == 3 and not rl.scalars_changed


def test_without_quorum_clears_are_held_and_a_later_mark_cancels_its_regions() -> None:
    batch = [("clear", (1, 2)), ("mark", (2,)), ("other", ()), ("clear", (3,))]
    sent, held = RegionLog.without_quorum(
        batch, kind=lambda o: o[0], regions=lambda o: o[1], narrowed=lambda o, r: (o[0], r)
    )
    assert sent == [("mark", (2,)), ("other", ())]
    assert held == [("clear", (1,)), ("clear", (3,))]
