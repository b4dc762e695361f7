"""Fixtures for the CPG tier: thin wrappers around :mod:`tests.harness.corosync`.

``corosync_single``: one corosync on loopback in the test's own network namespace (open
``cpg.Handle`` s in-process).  ``corosync_three``: three nodes in private network namespaces
(drive clients with ``tests.harness.corosync.member``).  Both are fresh per test and always torn
down, also when the test fails.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.harness import corosync


@pytest.fixture(scope="session")
def corosync_installed() -> float:
    """Make sure corosync and its -dev packages are installed; seconds the install took."""
    return corosync.ensure_installed(dev=True)


@pytest.fixture
def corosync_single(corosync_installed: float) -> Iterator[corosync.SingleNode]:
    cluster = corosync.SingleNode()
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def corosync_three(corosync_installed: float) -> Iterator[corosync.MultiNode]:
    cluster = corosync.MultiNode(3)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
