"""Fixtures for the real-corosync cluster tier (``--corosync``).

``ulogd_three``: a fresh three-node corosync cluster in network namespaces with an (unstarted)
ulogd per node (:class:`tests.harness.cluster.UlogdCluster`; call ``.start()``);
``ulogd_single``: one corosync on loopback in the test's own namespace and one ulogd slot.
Everything is torn down after each test, also when it fails; a failed test's report gets every
daemon's log (and the tail of each corosync log) as an extra section.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest

from tests.harness import corosync
from tests.harness.cluster import UlogdCluster

_LOG_KEY = pytest.StashKey[UlogdCluster]()


@pytest.fixture(scope="session")
def corosync_runtime() -> float:
    return corosync.ensure_installed(dev=False)


@contextlib.contextmanager
def _cluster(request: pytest.FixtureRequest, c: corosync.Cluster) -> Iterator[UlogdCluster]:
    c.start()
    try:
        with UlogdCluster(c) as u:
            request.node.stash[_LOG_KEY] = u
            yield u
    finally:
        c.stop()


@pytest.fixture
def ulogd_three(request: pytest.FixtureRequest, corosync_runtime: float) -> Iterator[UlogdCluster]:
    with _cluster(request, corosync.MultiNode(3)) as u:
        yield u


@pytest.fixture
def ulogd_single(request: pytest.FixtureRequest, corosync_runtime: float) -> Iterator[UlogdCluster]:
    with _cluster(request, corosync.SingleNode()) as u:
        yield u


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Iterator[None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    u = item.stash.get(_LOG_KEY, None)
    if u is None or report.when != "call" or not report.failed:
        return
    report.sections.append(("ulogd daemon logs", u.logs(lines=150)))
    tails = []
    for node in u.corosync.nodes:
        with contextlib.suppress(Exception):
            tail = u.corosync.log_tail(node.index, 20)
            tails.append(f"----- corosync {node.index} -----\n{tail}")
    report.sections.append(("corosync logs", "\n".join(tails)))
