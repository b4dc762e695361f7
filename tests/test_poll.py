"""The poll policy: how long the loop keeps polling after a reply, fed timestamps only."""

from __future__ import annotations

import pytest

from ulogd.edges import poll
from ulogd.edges.poll import PollPolicy, PollSetting

US = 1000
MS = 1000 * US


def adaptive() -> PollPolicy:
    return PollPolicy(PollSetting("adaptive"))


@pytest.mark.parametrize(
    ("text", "setting"),
    [
        ("off", PollSetting("off")),
        ("adaptive", PollSetting("adaptive")),
        ("Adaptive", PollSetting("adaptive")),
        ("250", PollSetting("fixed", 250)),
        ("250us", PollSetting("fixed", 250)),
        ("250 µs", PollSetting("fixed", 250)),
        (40, PollSetting("fixed", 40)),
        ("0", PollSetting("off")),
    ],
)
def test_settings_parse(text: str | int, setting: PollSetting) -> None:
    assert PollSetting.parse(text) == setting
    assert PollSetting.parse(str(setting)) == setting  # what the config stores reads back


@pytest.mark.parametrize("text", ["fast", "-5", "2ms", "", "100001"])
def test_bad_settings_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        PollSetting.parse(text)


def test_off_never_polls() -> None:
    p = PollPolicy(PollSetting("off"))
    assert not p.enabled
    assert [p.window() for _ in range(10)] == [0] * 10


def test_a_fixed_budget_always_polls_that_long() -> None:
    p = PollPolicy(PollSetting("fixed", 300))
    for _ in range(10):
        assert p.window(queued=50) == 300 * US
        p.expired(300 * US)  # never backs off
    assert p.windows == 10 and p.expiries == 10


def test_adaptive_starts_with_the_start_window() -> None:
    p = adaptive()
    assert p.enabled and p.window() == poll.START_NS


def test_the_window_grows_to_cover_the_gaps_that_found_a_request() -> None:
    p = adaptive()
    p.window()
    p.arrived(150 * US)
    assert p.budget == 300 * US
    p.window()
    p.arrived(40 * US)  # a shorter gap does not shrink it
    assert p.window() == 300 * US


def test_the_window_is_bounded() -> None:
    p = adaptive()
    p.window()
    p.arrived(10 * MS)
    assert p.window() == poll.MAX_NS
    for _ in range(30):
        p.expired(p.budget)
        p.arrived(1)  # keeps it out of the cooldown
    assert p.budget == poll.MIN_NS


def reply(p: PollPolicy, think: int, wake: int = 40 * US) -> bool:
    """What the loop does after one reply when the next request comes ``think`` ns later
    (``think + wake`` when the loop blocked and had to be woken); whether it polled."""
    budget = p.window()
    if budget and think <= budget:
        p.arrived(think)
    elif budget:
        p.expired(budget)
        p.blocked(think + wake)
    else:
        p.blocked(think + wake)
    return budget > 0


def test_bursts_ending_in_an_empty_window_keep_polling() -> None:
    """A write's requests hit, the last window of each burst expires: polling goes on."""
    p = adaptive()
    polled = 0
    for _ in range(100):
        for _ in range(5):
            polled += reply(p, 30 * US)
        polled += reply(p, 10 * MS)  # the next write comes much later
    assert polled >= 0.9 * 600 and p.pays is True
    assert p.cooldown == 0 and p.hits > 400


def test_polling_that_does_not_shorten_the_gaps_stops() -> None:
    """The peer shares our core: spinning delays it as much as a wake-up would cost."""
    p = adaptive()
    polled = [reply(p, 60 * US, wake=0) for _ in range(2000)]
    assert p.pays is not True  # False, or None while it measures again after a cooldown
    assert sum(polled[-1000:]) < 0.1 * 1000  # mostly cooled down by then


def test_a_too_short_first_window_learns_from_the_gaps_it_missed() -> None:
    p = adaptive()
    polled = [reply(p, 700 * US) for _ in range(50)]
    assert p.budget >= 1400 * US and sum(polled[-10:]) >= 8  # (one may be a probe)
    assert p.hits >= 40


def test_windows_that_keep_expiring_stop_polling_for_a_while() -> None:
    p = adaptive()
    for _ in range(poll.MISSES):
        assert p.window() > 0
        p.expired(p.budget)
    blocked = [p.window() for _ in range(poll.COOLDOWN_MIN)]
    assert blocked == [0] * poll.COOLDOWN_MIN
    assert p.window() == poll.START_NS  # the probe after the cooldown


def test_the_cooldown_doubles_while_windows_keep_expiring_and_resets_once_polling_pays() -> None:
    p = adaptive()

    def expire_until_cooldown() -> int:
        while not p.cooldown:
            if p.window():
                p.expired(p.budget)
                p.blocked(poll.MAX_NS + 1)  # idle after it: nothing learnt
        return p.cooldown

    assert expire_until_cooldown() == poll.COOLDOWN_MIN
    while p.window() == 0:
        pass
    p.expired(p.budget)
    assert expire_until_cooldown() == 2 * poll.COOLDOWN_MIN
    p.cooldown = 0
    for _ in range(200):  # polling pays: gaps of 30 us polled, 70 us blocked
        reply(p, 30 * US)
    assert p.pays is True
    assert expire_until_cooldown() == poll.COOLDOWN_MIN


def test_the_cooldown_is_bounded() -> None:
    p = adaptive()
    for _ in range(20):
        for _ in range(poll.MISSES):
            while p.window() == 0:
                pass
            p.expired(p.budget)
    assert p.cooldown == poll.COOLDOWN_MAX


def test_requests_already_queued_mean_no_window() -> None:
    p = adaptive()
    assert p.window(queued=poll.QUEUED) == 0
    assert p.window(queued=poll.QUEUED - 1) == poll.START_NS


def test_cpu_contention_stops_polling_until_it_eases() -> None:
    p = adaptive()
    t = 5 * 1000 * MS
    assert p.wants_sample(t)
    p.sample(t, 1_000 * MS)  # the first sample only sets the origin
    assert not p.contended and not p.wants_sample(t + 1)
    t += poll.SAMPLE_NS
    assert p.wants_sample(t)
    p.sample(t, 1_000 * MS + 30 * MS)  # 30 ms runnable but not running in 100 ms
    assert p.contended and p.window() == 0
    t += poll.SAMPLE_NS
    p.sample(t, 1_000 * MS + 31 * MS)  # 1 ms in the next 100 ms
    assert not p.contended and p.window() == poll.START_NS


def test_no_run_delay_available_means_no_contention_signal() -> None:
    p = adaptive()
    p.sample(0, None)
    p.sample(poll.SAMPLE_NS, None)
    assert not p.contended and p.window() > 0


def test_only_the_adaptive_policy_samples() -> None:
    assert not PollPolicy(PollSetting("off")).wants_sample(0)
    assert not PollPolicy(PollSetting("fixed", 10)).wants_sample(0)


def test_describe_says_the_state() -> None:
    p = adaptive()
    p.window()
    p.arrived(10 * US)
    assert p.describe().startswith("poll adaptive (on, window 200 us, 1 hits")
    assert PollPolicy(PollSetting("fixed", 40)).describe() == "poll 40us"


def test_a_gap_it_blocked_through_grows_the_window_to_catch_the_next() -> None:
    """A window too short for this host (an emulated CPU) learns from the gaps it missed."""
    p = adaptive()
    assert p.window() == poll.START_NS
    p.expired(poll.START_NS)
    p.blocked(700 * US)  # the request came 700 us after the reply
    assert p.window() == 1400 * US


def test_idle_gaps_teach_nothing() -> None:
    p = adaptive()
    p.blocked(poll.MAX_NS + 1)
    p.blocked(5 * 1000 * MS)
    assert p.budget == poll.START_NS


def test_a_gap_longer_than_the_window_that_failed_ends_the_cooldown() -> None:
    p = adaptive()
    for _ in range(poll.MISSES - 1):
        p.window()
        p.expired(p.budget)
        p.blocked(poll.MAX_NS + 1)
    p.window()
    p.expired(p.budget)
    assert p.cooldown == poll.COOLDOWN_MIN
    p.blocked(400 * US)  # the request came just after: the window was too short
    assert p.cooldown == 0 and p.window() == 800 * US


def test_a_short_gap_after_blocking_teaches_nothing_about_the_window() -> None:
    p = adaptive()
    p.window()
    p.expired(p.budget)
    p.blocked(50 * US)  # a window of this size would have caught it: not too short
    assert p.budget == poll.START_NS // 2


def test_off_and_fixed_learn_nothing_from_gaps() -> None:
    for setting in (PollSetting("off"), PollSetting("fixed", 30)):
        p = PollPolicy(setting)
        p.blocked(500 * US)
        assert p.window() == (0 if setting.mode == "off" else 30 * US)


def test_polling_that_slows_the_writers_stops_even_when_their_gaps_exceed_any_window() -> None:
    """Under emulation the kernel's next request may come 3 ms after a reply, later than any
    window; a spinning loop that takes the CPU from the writers makes those gaps longer
    still (4 ms) than when it blocks and pays its wake-up (3 ms): polling must stop."""
    p = adaptive()
    polled = []
    for _ in range(3000):
        budget = p.window()
        polled.append(budget > 0)
        if budget:
            p.expired(budget)
            p.blocked(4 * MS)
        else:
            p.blocked(3 * MS)
    assert p.pays is not True
    assert sum(polled[-1500:]) < 0.05 * 1500
