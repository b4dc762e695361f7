"""The log-line rate limiter, on a clock that is only numbers passed in."""

from __future__ import annotations

import pytest

from ulogd.engine.ratelimit import RateLimiter, Summary


def admitted(limiter: RateLimiter, kind: str, times: list[float]) -> list[bool]:
    return [limiter.admit(kind, t) for t in times]


def test_a_burst_per_window_is_logged_then_lines_are_counted() -> None:
    limiter = RateLimiter(window=60, burst=3)
    assert admitted(limiter, "unknown log", [0, 1, 2, 3, 4, 59.9]) == [1, 1, 1, 0, 0, 0]
    assert limiter.expired(59.9) == []  # the window is not over yet
    assert limiter.expired(60.0) == [Summary("unknown log", 3, 60)]
    assert limiter.expired(61.0) == []  # handed out once
    assert limiter.suppressed_total == {"unknown log": 3}


def test_the_summary_line_says_how_many_in_which_window() -> None:
    assert Summary("rejected datagram", 9990, 60).line() == (
        "suppressed 9990 similar line(s) in the last 60 s: rejected datagram"
    )


def test_a_new_window_logs_again_from_its_first_line() -> None:
    limiter = RateLimiter(window=10, burst=1)
    assert admitted(limiter, "k", [0, 1, 2]) == [True, False, False]
    # one event long after the flood: a new window, logged, not lost in a life-long count
    assert limiter.admit("k", 500) is True
    # the old window's summary survives even though admit() closed it
    assert limiter.expired(500) == [Summary("k", 2, 10)]


def test_kinds_are_limited_apart() -> None:
    limiter = RateLimiter(window=60, burst=2)
    assert admitted(limiter, "a", [0, 0, 0]) == [True, True, False]
    assert admitted(limiter, "b", [1, 1, 1, 1]) == [True, True, False, False]
    assert limiter.expired(60) == [Summary("a", 1, 60)]
    assert limiter.expired(61) == [Summary("b", 2, 60)]


def test_a_window_without_suppression_leaves_no_summary() -> None:
    limiter = RateLimiter(window=60, burst=5)
    assert admitted(limiter, "quiet", [0, 10, 20]) == [True] * 3
    assert limiter.expired(100) == []
    assert limiter.admit("quiet", 100) is True


@pytest.mark.parametrize(("window", "burst"), [(0, 1), (-1, 1), (60, 0)])
def test_nonsense_settings_are_refused(window: float, burst: int) -> None:
    with pytest.raises(ValueError):
        RateLimiter(window=window, burst=burst)
