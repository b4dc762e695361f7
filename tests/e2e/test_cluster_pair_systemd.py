"""The two-guest kill of a node with torn writes (see test_cluster_pair.py), with systemd as
PID 1 in both guests: corosync and ulogd run under their units, ulogd installed as its
package installs it with the cluster drop-in, so the survivor's recovery cycle (dmsetup
suspend/resume of its mirrors) runs inside the shipped unit, under its device policy and
capability set.  The same host-side assertions as the busybox-init pair, plus the unit's own
checks the survivor records ("the recovery cycle ran inside ulogd's unit", corosync pulled in
by the drop-in).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .test_cluster_pair import (
    PairRun,
    _pair_fixture,
    test_every_torn_region_was_among_those_recovered,
    test_legs_identical_on_the_host_afterwards,
    test_survivor_checks_pass,
    test_survivor_io_resumes_and_keeps_its_rate,
    test_the_kill_left_torn_writes,
)

pytestmark = pytest.mark.e2e

__all__ = [
    "test_every_torn_region_was_among_those_recovered",
    "test_legs_identical_on_the_host_afterwards",
    "test_survivor_checks_pass",
    "test_survivor_io_resumes_and_keeps_its_rate",
    "test_the_kill_left_torn_writes",
]


@pytest.fixture(scope="module")
def pair() -> Iterator[PairRun]:
    yield from _pair_fixture("systemd")


def test_the_recovery_cycle_ran_inside_the_unit(pair: PairRun) -> None:
    checks = {c["name"]: c for c in pair.survivor_result.get("checks", [])}
    inside = checks.get("the recovery cycle ran inside ulogd's unit")
    assert inside is not None and inside["ok"], (inside, pair.describe())
    assert checks["corosync started with ulogd (the cluster drop-in)"]["ok"]
