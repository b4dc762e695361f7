"""What the daemon counts itself on its loop thread: reply latencies and cluster events.

Theory of operation
-------------------
The request path pays for one thing only: the reply-latency histogram, a list of integer
bucket counts bumped on the loop thread (:meth:`LatencyHistogram.observe`: one ``bisect`` and
two additions, no lock — the loop is the only writer).  :class:`Metrics` adds the counters of
the cluster layer and of recovery cycles; :mod:`ulogd.ops.metrics` renders them with
everything it derives from the server at scrape time.
"""

from __future__ import annotations

import bisect

#: histogram bucket upper bounds, in nanoseconds (10 µs … 1 s)
LATENCY_BOUNDS_NS: tuple[int, ...] = (
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    1_000_000_000,
)


class LatencyHistogram:
    """Cumulative-on-read histogram of reply latencies in nanoseconds (loop thread only)."""

    __slots__ = ("counts", "sum_ns")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BOUNDS_NS) + 1)  # last: +Inf
        self.sum_ns = 0

    def observe(self, ns: int) -> None:
        self.counts[bisect.bisect_left(LATENCY_BOUNDS_NS, ns)] += 1
        self.sum_ns += ns

    @property
    def count(self) -> int:
        return sum(self.counts)

    def buckets(self) -> list[tuple[str, int]]:
        """(le in seconds, cumulative count) pairs as Prometheus expects them."""
        out: list[tuple[str, int]] = []
        total = 0
        for bound, count in zip((*LATENCY_BOUNDS_NS, None), self.counts, strict=True):
            total += count
            out.append(("+Inf" if bound is None else repr(bound / 1e9), total))
        return out


class Metrics:
    """What the daemon counts itself (the rest is read from the server at scrape time)."""

    def __init__(self) -> None:
        self.latency = LatencyHistogram()
        self.cluster_deliveries = 0
        self.membership_changes = 0
        #: recovery cycles (suspend/resume of a local mirror) by outcome
        self.recovery_cycles = {"ok": 0, "failed": 0, "no_mirror": 0}
        #: dmsetup runs that failed (table lookup or suspend/resume)
        self.dmsetup_failures = 0

    # Hooks for the cluster layer.
    def cluster_delivery(self, count: int = 1) -> None:
        self.cluster_deliveries += count

    def membership_change(self) -> None:
        self.membership_changes += 1

    def cycle_failed(self, *, dmsetup: bool) -> None:
        """A recovery cycle that did not run: dmsetup failed, or no local mirror uses the log."""
        if dmsetup:
            self.dmsetup_failures += 1
            self.recovery_cycles["failed"] += 1
        else:
            self.recovery_cycles["no_mirror"] += 1
