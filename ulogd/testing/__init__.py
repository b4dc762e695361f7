"""Test and benchmark helpers that drive real outside parts (QEMU kernels, corosync clusters).

Shipped with the package so that tests, benchmarks and operators use the same code; nothing in
the daemon imports this package.
"""
