"""Rate limits for log lines that a flood could multiply (pure: the caller passes the clock).

Theory of operation
-------------------
Some events can be caused from outside at any rate: datagrams that are not requests,
requests for logs that do not exist, regions beyond a log's end, constructors that do not
parse.  Each is worth one line, but ten thousand of them must not bury everything else.

A :class:`RateLimiter` keeps one *window* per kind of event.  A window opens at the first
event of its kind and lasts :attr:`RateLimiter.window` seconds; the first
:attr:`RateLimiter.burst` events in it are logged, the others are only counted.  Once the
window is over, the count comes back as a :class:`Summary` — "suppressed N similar lines in
the last 60 s" — from :meth:`RateLimiter.expired`, which the caller polls before it logs an
event and from a periodic timer, so that nothing is silent even if the flood stops for good.
The next event of that kind opens a new window, logged again from its first line.

Nothing here reads a clock or sleeps: every call takes ``now`` (seconds, monotonic), so the
rules are tested with plain numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

WINDOW = 60.0
BURST = 10


@dataclass(frozen=True, slots=True)
class Summary:
    """What a window that suppressed lines leaves behind."""

    kind: str
    suppressed: int
    window: float

    def line(self) -> str:
        return (
            f"suppressed {self.suppressed} similar line(s) in the last {self.window:g} s: "
            f"{self.kind}"
        )


@dataclass(slots=True)
class _Window:
    start: float
    logged: int = 0
    suppressed: int = 0


class RateLimiter:
    """At most ``burst`` lines per kind of event in each ``window`` seconds (see the module
    docstring)."""

    def __init__(self, *, window: float = WINDOW, burst: int = BURST) -> None:
        if window <= 0 or burst < 1:
            raise ValueError("the window must be positive and the burst at least 1")
        self.window = window
        self.burst = burst
        self._windows: dict[str, _Window] = {}
        self._closed: list[Summary] = []  # closed by admit(), not yet handed out
        #: events suppressed over the limiter's life, by kind (for status and tests)
        self.suppressed_total: dict[str, int] = {}

    def admit(self, kind: str, now: float) -> bool:
        """Count one event of ``kind`` at ``now``; True if its line is to be logged.  (Call
        :meth:`expired` first, so that a summary is logged before the next window's lines.)"""
        w = self._windows.get(kind)
        if w is None or now - w.start >= self.window:
            if w is not None and w.suppressed:
                self._closed.append(Summary(kind, w.suppressed, self.window))
            w = self._windows[kind] = _Window(now)
        if w.logged < self.burst:
            w.logged += 1
            return True
        w.suppressed += 1
        self.suppressed_total[kind] = self.suppressed_total.get(kind, 0) + 1
        return False

    def expired(self, now: float) -> list[Summary]:
        """Close the windows that are over at ``now``; a summary for each that suppressed
        lines, oldest first."""
        over = [k for k, w in self._windows.items() if now - w.start >= self.window]
        summaries, self._closed = self._closed, []
        for kind in over:
            w = self._windows.pop(kind)
            if w.suppressed:
                summaries.append(Summary(kind, w.suppressed, self.window))
        return summaries
