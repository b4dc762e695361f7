"""The hardening tiers reuse the real-corosync fixtures of ``tests/cluster_real`` (a fresh
three-node cluster per test, daemon and corosync logs attached to a failed test's report)."""

from tests.cluster_real.conftest import (  # noqa: F401
    corosync_runtime,
    pytest_runtest_makereport,
    ulogd_three,
)
