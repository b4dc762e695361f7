"""Pure test aids for ulogd and for projects that drive it (no outside parts, no I/O).

* :mod:`ulogd.testing.driver` — :class:`~ulogd.testing.driver.LogDriver` speaks for one
  mirror log the way the kernel does; :class:`~ulogd.testing.driver.InProcess` feeds a
  :class:`~ulogd.engine.server.Server` directly, performing its disk actions at once.
* :mod:`ulogd.testing.vsgroup` — :class:`~ulogd.testing.vsgroup.VirtualGroup`, a seeded,
  deterministic process group with virtual synchrony, for property tests of the cluster layer.

Nothing in the daemon imports this package (an import-linter contract checks it).  The harness
that drives real outside parts — QEMU kernels, corosync clusters, the guest scripts — lives in
``tests/harness/`` and is never packaged.
"""
