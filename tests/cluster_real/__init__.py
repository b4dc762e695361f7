"""Real-corosync tier for the cluster layer: a ulogd per node, driven over the test transport."""
