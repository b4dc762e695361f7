"""Shared pytest configuration: the opt-in test tiers.

Tiers that need real outside parts are selected with explicit options, so a plain
``pytest`` stays fast while ``tools/test`` (the README's test command, run by CI) turns them on:

* ``--corosync``: tests marked ``corosync`` start real corosync 3 daemons (installed from
  Debian's archive by the fixtures when missing).
* ``--e2e``: tests marked ``e2e`` boot a real Debian Linux kernel in QEMU.
* ``--slow``: long-running tiers (soak, large fuzz runs).

Tests of a tier that was not asked for are *deselected*, never reported as passing or skipped.
"""

from __future__ import annotations

import pytest

TIERS = {
    "corosync": "run tests that start real corosync daemons",
    "e2e": "run the real-kernel end-to-end tests in QEMU",
    "slow": "run the slow tiers (soak, long fuzz runs)",
}


def pytest_addoption(parser: pytest.Parser) -> None:
    for name, help_text in TIERS.items():
        parser.addoption(f"--{name}", action="store_true", default=False, help=help_text)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    selected: list[pytest.Item] = []
    deselected: list[pytest.Item] = []
    for item in items:
        wanted = all(
            config.getoption(f"--{name}") for name in TIERS if item.get_closest_marker(name)
        )
        (selected if wanted else deselected).append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = selected
