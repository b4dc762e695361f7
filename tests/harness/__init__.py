"""The test harness: QEMU guests, corosync clusters, guest scripts (never packaged)."""
