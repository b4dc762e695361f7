"""One real corosync on loopback, one ulogd in cluster mode: a group of one needs no multicast.

The daemon runs in the test's own network namespace (``ulogd_single``).  A one-member group
applies requests directly (a one-node ring costs a CPU per message), so after the join the
corosync's own multicast counter (``stats.srp.mcast_tx`` from ``corosync-cmapctl``) must not
grow with the requests, and MARK+FLUSH must cost about what it costs with ``--cluster off``.
"""

from __future__ import annotations

import statistics
import subprocess
import time

import pytest

from tests.harness.cluster import UlogdCluster, wait_until
from ulogd.protocol.spec import RequestType as T
from ulogd.testing.driver import LogDriver

pytestmark = pytest.mark.corosync

UUID = "LVM-cluster-single-0001"
CTR = "131072 clustered-core 1024"  # 128 regions, all to be recovered


def mcast_tx() -> int:
    out = subprocess.run(
        ["corosync-cmapctl", "-m", "stats", "stats.srp.mcast_tx"],
        capture_output=True, text=True, timeout=5, check=True,
    ).stdout  # fmt: skip
    return int(out.rsplit("=", 1)[1])


def mark_flush_ms(d: LogDriver, count: int) -> list[float]:
    samples = []
    for i in range(count):
        r = i % 64
        start = time.perf_counter()
        assert d.mark([r]).error == 0
        assert d.flush().error == 0
        samples.append((time.perf_counter() - start) * 1000)
        assert d.clear([r]).error == 0
    return samples


def test_one_member_group_life_cycle_without_multicast(ulogd_single: UlogdCluster) -> None:
    u = ulogd_single
    u.start()
    d = u[1].driver(UUID)
    d.create(CTR)
    st = u[1].log_status(UUID)
    assert st is not None and st["members"] == [1], st
    assert st["cluster"]["phase"] == "valid" and st["cluster"]["quorate"] is True, st
    assert "first member of its group" in u[1].log_text()
    before = mcast_tx()
    # Recovery, writes and queries, all answered by the group of one.
    assert d.resync_all() == 128
    assert d.sync_count() == 128
    assert d.mark([5, 6]).error == 0 and d.flush([7]).error == 0
    assert (d.is_clean(5), d.is_clean(7), d.is_clean(8)) == (0, 0, 1)
    assert d.clear([5, 6, 7]).error == 0 and d.flush().error == 0
    assert all(d.is_clean(r) for r in (5, 6, 7))
    samples = mark_flush_ms(d, 200)
    grew = mcast_tx() - before
    assert grew <= 5, f"{grew} multicasts for ~{128 * 4 + 600} requests: not applied locally"
    # Suspend (leaves the group), resume (joins again, first member), remove.
    assert d.call(T.PRESUSPEND).error == 0
    assert d.call(T.POSTSUSPEND).error == 0
    wait_until(lambda: u[1].log_status(UUID)["cluster"] is None, 5.0, "the group left")
    assert d.call(T.RESUME).error == 0
    assert d.sync_count() == 128 and d.is_clean(5) == 1
    assert d.mark([9]).error == 0 and d.flush().error == 0 and d.is_clean(9) == 0
    assert d.call(T.PRESUSPEND).error == 0 and d.call(T.POSTSUSPEND).error == 0
    assert d.call(T.DTR).error == 0
    assert u[1].log_status(UUID) is None
    print(f"cluster mode, group of one: MARK+FLUSH p50 {statistics.median(samples):.3f} ms")
