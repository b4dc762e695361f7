"""Hardening tiers: regressions found by fuzzing, soak, cluster chaos (issue 9)."""
