"""The per-type table: one row per request type, the same meaning on every path."""

from __future__ import annotations

import pytest

from ulogd.cluster.group import Group
from ulogd.engine.server import GROUP_TYPES
from ulogd.protocol import ctr, wire
from ulogd.protocol import spec as p
from ulogd.protocol.spec import RequestType as T
from ulogd.state.regionlog import RegionLog, new_bitmaps
from ulogd.state.requests import OPERATIONS, ORDERED


def test_every_request_type_has_exactly_one_row() -> None:
    assert set(OPERATIONS) == set(p.SPECS)
    assert all(int(row.type) == t for t, row in OPERATIONS.items())


def test_the_server_orders_through_the_group_what_the_table_says() -> None:
    assert GROUP_TYPES == ORDERED == {
        T.MARK_REGION, T.CLEAR_REGION, T.FLUSH, T.GET_RESYNC_WORK, T.SET_REGION_SYNC,
        T.IS_REMOTE_RECOVERING,
    }  # fmt: skip


def test_only_life_cycle_requests_lack_a_region_log_operation() -> None:
    engine_served = {t for t, row in OPERATIONS.items() if row.apply is None}
    assert engine_served == {T.CTR, T.DTR, T.PRESUSPEND, T.POSTSUSPEND, T.RESUME}
    assert not engine_served & ORDERED


def _log() -> RegionLog:
    config = ctr.parse(b"8192 clustered-core 1024")
    clean, sync = new_bitmaps(config)
    return RegionLog(config, clean, sync)


@pytest.mark.parametrize("rtype", sorted(set(p.SPECS) - ORDERED))
def test_the_group_refuses_a_request_the_table_does_not_order(rtype: int) -> None:
    group = Group(_log(), (1, 100))
    request = wire.Request(1, "LVM-x", 3, 7, rtype, b"", b"")
    with pytest.raises(ValueError, match="not routed through the group"):
        group.submit(request)


def test_a_region_beyond_the_end_is_refused_before_it_is_ordered() -> None:
    rl = _log()
    group = Group(rl, (1, 100))
    data = p.REGION_SYNC.pack(rl.region_count, 1)
    request = wire.Request(1, "LVM-x", 3, 7, T.SET_REGION_SYNC, data, b"")
    answers = group.submit(request)
    assert [(type(a).__name__, getattr(a, "error", None)) for a in answers] == [
        ("Answer", p.EINVAL)
    ]
    assert not group.waiting and not group.outbox
