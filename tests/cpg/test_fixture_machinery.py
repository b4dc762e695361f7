"""The cluster machinery itself: isolation, teardown after a failure, stale-namespace reaping."""

from __future__ import annotations

import glob
import os
import subprocess

import pytest

from tests.harness import corosync

pytestmark = pytest.mark.corosync


def netns_names() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def test_teardown_after_a_failing_body_leaves_nothing(corosync_installed: float) -> None:
    cluster = corosync.MultiNode(2)
    with pytest.raises(RuntimeError, match="test body failed"), cluster:
        pids = [n.pid for n in cluster.nodes]
        assert all(pids)
        client = cluster.spawn_python(1, ["-c", "import time; time.sleep(60)"])
        assert glob.glob(f"/dev/shm/qb-corosync-{pids[0]}-*")
        raise RuntimeError("test body failed")
    assert client.poll() is not None
    assert not [ns for ns in netns_names() if ns.startswith(cluster.prefix)]
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}")
        assert not glob.glob(f"/dev/shm/qb-corosync-{pid}-*") + glob.glob(f"/dev/shm/qb-{pid}-*")
    assert not cluster.base.exists()


def test_nodes_are_isolated_in_their_namespaces(corosync_three: corosync.MultiNode) -> None:
    addr = corosync_three.exec(2, ["ip", "-o", "-4", "addr", "show", "dev", "eth0"]).stdout
    assert "10.231.0.2/24" in addr
    root = subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True, text=True).stdout
    assert "10.231." not in root  # the private range exists only inside our namespaces
    cfg = corosync_three.exec(3, ["corosync-cfgtool", "-s"]).stdout
    assert "Local node ID 3" in cfg
    assert corosync_three.members(1) == 3


def test_single_node_clusters_take_turns(corosync_single: corosync.SingleNode) -> None:
    second = corosync.SingleNode(lock_timeout=0.5)
    with pytest.raises(corosync.CorosyncError, match="busy"):
        second.start()
    assert corosync_single.node(1).running and corosync_single.members(1) == 1
    assert not second.base.exists()


def test_single_node_refuses_a_foreign_corosync(corosync_single: corosync.SingleNode) -> None:
    lock, corosync_single._lock = corosync_single._lock, None  # as if started by someone else
    try:
        lock.close()
        with pytest.raises(corosync.CorosyncError, match="already answers"):
            corosync.SingleNode(lock_timeout=1).start()
    finally:
        corosync_single._acquire_lock()
    assert corosync_single.members(1) == 1


def test_reap_stale_removes_namespaces_of_dead_runs(corosync_installed: float) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"ulgc{dead.pid}x0badc0-n1"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    try:
        assert stale in corosync.reap_stale()
        assert stale not in netns_names()
    finally:
        subprocess.run(["ip", "netns", "delete", stale], capture_output=True)
