"""The poll policy: how long the loop keeps polling after a reply, fed timestamps only."""

from __future__ import annotations

import pytest

from ulogd import poll
from ulogd.poll import PollPolicy, PollSetting

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


def test_bursts_ending_in_an_empty_window_keep_polling() -> None:
    """A write's requests hit, the last window of each burst expires: polling goes on."""
    p = adaptive()
    for _ in range(100):
        for _ in range(5):
            assert p.window() > 0
            p.arrived(30 * US)
        assert p.window() > 0
        p.expired(p.budget)
    assert p.cooldown == 0 and p.hits == 500 and p.expiries == 100


def test_windows_that_keep_expiring_stop_polling_for_a_while() -> None:
    p = adaptive()
    for _ in range(poll.MISSES):
        assert p.window() > 0
        p.expired(p.budget)
    blocked = [p.window() for _ in range(poll.COOLDOWN_MIN)]
    assert blocked == [0] * poll.COOLDOWN_MIN
    assert p.window() == poll.START_NS  # the probe after the cooldown


def test_the_cooldown_doubles_while_polling_keeps_failing_and_resets_after_a_hit() -> None:
    p = adaptive()

    def miss_then_count_blocked() -> int:
        """MISSES empty windows (the first already open), then the replies that block."""
        for i in range(poll.MISSES):
            if i:
                assert p.window() > 0
            p.expired(p.budget)
        blocked = 0
        while p.window() == 0:  # the call that returns > 0 opens the probe's window
            blocked += 1
        return blocked

    p.window()
    assert miss_then_count_blocked() == poll.COOLDOWN_MIN
    assert miss_then_count_blocked() == 2 * poll.COOLDOWN_MIN
    p.arrived(50 * US)  # the probe pays
    p.window()
    assert miss_then_count_blocked() == poll.COOLDOWN_MIN


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
