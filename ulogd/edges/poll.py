"""Polling the transport after a reply: the setting and the adaptive policy (pure).

Theory of operation
-------------------
The kernel asks for one write in a burst of requests (IN_SYNC, MARK, FLUSH, ..., each sent
only when the previous reply arrived).  A server that blocks in ``epoll_wait`` after every
reply pays a sleep and a wake-up per request; one that keeps polling the socket for a short
while answers the next request of the burst without them.  Polling costs CPU, and when the
CPU is contended (the writers themselves need it) or requests already queue up, it costs
more than it saves.  So the event loop asks a :class:`PollPolicy`, after every turn that sent
a reply, how long to keep polling (a *window*, in nanoseconds; 0: block at once), and tells
it how the window ended: a request arrived after ``waited`` ns (:meth:`PollPolicy.arrived`)
or the window passed empty (:meth:`PollPolicy.expired`).

The policy is fed timestamps and numbers only, never reads a clock or a file, so it is
tested without sleeping.  Modes (:class:`PollSetting`, the ``poll`` setting):

* ``off`` — never poll (the window is always 0);
* a fixed budget (``"250"`` µs) — always poll that long;
* ``adaptive`` (the default) — self-tuning:

  - the window starts at :data:`START_NS` and grows to twice the longest wait that still
    found a request (bounded by :data:`MAX_NS`); every empty window halves it (down to
    :data:`MIN_NS`), so it settles around the gaps inside the bursts;
  - the loop also reports the gaps it blocked through (:meth:`PollPolicy.blocked`: after a
    reply, with no window or one that expired, the next event came ``gap`` ns later); when
    a window expired and the request came soon after (within :data:`MAX_NS`) the window was
    too short, not useless: it grows to twice the gap and that miss ends a cooldown, so a
    window that started too short for this host (a slow emulated CPU) learns its size;
  - after :data:`MISSES` empty windows in a row the next ``cooldown`` replies block (64 at
    first, doubling up to 4096 while it keeps happening, back to 64 once polling pays);
  - it checks that polling pays: it keeps the medians of the last gaps from a reply to the
    next event (up to :data:`IDLE_NS`, even those no window covers) with a window and
    without one (one reply in :data:`PROBE_EVERY` blocks to measure the latter; so do the
    cooldowns); when the polled gaps are not at least 10 % shorter (:data:`PAYS`) — the
    peer is slowed by the spinning itself, e.g. both share a core, or an emulated CPU — it
    cools down the same way;
  - a wake-up that found :data:`QUEUED` or more requests waiting means requests pile up
    (many writes or logs in flight): no window that time, the next request is not a wake-up
    away;
  - CPU contention: the loop feeds the thread's run-queue delay (``/proc/thread-self/
    schedstat``, the time it was runnable but not running) every :data:`SAMPLE_NS`; while
    it grows faster than :data:`CONTENDED` of wall time, nothing polls (a spinning process
    would take the CPU from the very writers it waits for).

An idle daemon never polls: a window opens only after a reply and ends at most
:data:`MAX_NS` later.
"""

from __future__ import annotations

import collections
import dataclasses
import re

#: window bounds and start value of the adaptive policy (ns)
MIN_NS = 20_000
START_NS = 200_000
MAX_NS = 2_000_000
#: empty windows in a row after which polling is suspended
MISSES = 4
#: replies that block after polling stopped paying (doubles up to COOLDOWN_MAX)
COOLDOWN_MIN = 64
COOLDOWN_MAX = 4096
#: datagrams found waiting in one wake-up from which requests are deemed to pile up
QUEUED = 4
#: a gap longer than this after a reply is idleness, not the next request of a write: it
#: teaches nothing.  Shorter ones all count, even those no window covers: a spinning loop
#: that takes the CPU from the writers shows as longer gaps there (an emulated CPU).
IDLE_NS = 50_000_000
#: gaps of each kind kept for the medians
GAPS_KEPT = 33
#: every so many windows one reply blocks instead (to keep measuring what blocking costs)
PROBE_EVERY = 16
#: gaps of each kind needed before comparing them, and how much shorter the polled ones must
#: be for polling to pay
SAMPLES = 8
PAYS = 0.9
#: how often the run-queue delay is sampled (ns) and the share of wall time above which the
#: CPU counts as contended
SAMPLE_NS = 100_000_000
CONTENDED = 0.10
#: the largest fixed budget accepted (µs)
FIXED_MAX_US = 100_000


@dataclasses.dataclass(frozen=True, slots=True)
class PollSetting:
    """``off``, ``adaptive`` or a fixed budget in µs (``mode == "fixed"``)."""

    mode: str = "adaptive"
    budget_us: int = 0

    @classmethod
    def parse(cls, value: str | int) -> PollSetting:
        """``"off"``, ``"adaptive"``, ``"250"``/``"250us"``/``250`` (µs); ValueError if not."""
        if isinstance(value, bool):
            raise ValueError("must be 'off', 'adaptive' or a budget in microseconds")
        if isinstance(value, int):
            text = str(value)
        elif isinstance(value, str):
            text = value.strip().lower()
        else:
            raise TypeError("must be 'off', 'adaptive' or a budget in microseconds")
        if text in ("off", "adaptive"):
            return cls(text)
        match = re.fullmatch(r"(\d+)\s*(us|µs)?", text)
        if not match:
            raise ValueError(f"{value!r} is not 'off', 'adaptive' or a budget in microseconds")
        budget = int(match.group(1))
        if budget == 0:
            return cls("off")
        if budget > FIXED_MAX_US:
            raise ValueError(f"a fixed budget of {budget} us is above {FIXED_MAX_US} us")
        return cls("fixed", budget)

    def __str__(self) -> str:
        return f"{self.budget_us}us" if self.mode == "fixed" else self.mode


class PollPolicy:
    """How long to poll after a reply (see the module's docstring)."""

    def __init__(self, setting: PollSetting | None = None) -> None:
        self.setting = setting or PollSetting()
        self.mode = self.setting.mode
        self._fixed = self.setting.budget_us * 1000
        self.budget = START_NS  # the adaptive window's current length
        self.misses = 0  # empty windows in a row
        self.cooldown = 0  # replies left that block without a window
        self._next_cooldown = COOLDOWN_MIN
        self.contended = False
        self._sample_at = 0  # when the next run-queue sample is due (ns; 0: now)
        self._last_sample: tuple[int, int] | None = None  # (now, run delay)
        self._expired = False  # the last window passed empty (the next gap is still its own)
        self._until_probe = PROBE_EVERY
        #: the last reply -> next event gaps (<= IDLE_NS) with a window and without one, and
        #: their medians (recomputed every SAMPLES new gaps): polling pays when it shortens
        #: them.  Medians, not means: a write's burst of short gaps and the long gap before
        #: the next write must not blur into one average.
        self._gaps: dict[bool, collections.deque[int]] = {
            True: collections.deque(maxlen=GAPS_KEPT),
            False: collections.deque(maxlen=GAPS_KEPT),
        }
        self._fresh = 0
        self.gap_polled = 0
        self.gap_blocked = 0
        self._pays: bool | None = None
        # counters (status, benchmarks)
        self.windows = 0
        self.hits = 0
        self.expiries = 0
        self.polled_ns = 0

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    @property
    def pays(self) -> bool | None:
        """Whether polling shortens the gaps (None: not enough of both kinds seen yet)."""
        return self._pays

    @property
    def n_polled(self) -> int:
        return len(self._gaps[True])

    @property
    def n_blocked(self) -> int:
        return len(self._gaps[False])

    # ------------------------------------------------------------------ the loop asks
    def window(self, queued: int = 1) -> int:
        """The window after a reply (ns; 0: block).  ``queued``: datagrams the last
        wake-up found waiting."""
        self._expired = False
        if self.mode == "fixed":
            self.windows += 1
            return self._fixed
        if self.mode == "off" or self.contended or queued >= QUEUED:
            return 0
        if self.cooldown:
            self.cooldown -= 1
            return 0
        pays = self.pays
        if pays is False:
            self._cool_down()
            self._gaps[True].clear()  # measured again after the cooldown
            self._pays = None
            return 0
        if pays:
            self._next_cooldown = COOLDOWN_MIN
        self._until_probe -= 1
        if not self._until_probe:  # keep measuring what blocking costs
            self._until_probe = PROBE_EVERY
            return 0
        self.windows += 1
        return self.budget

    def wants_sample(self, now: int) -> bool:
        """Whether the loop should read the run-queue delay and call :meth:`sample`."""
        return self.mode == "adaptive" and now >= self._sample_at

    # ------------------------------------------------------------------ the loop tells
    def arrived(self, waited: int) -> None:
        """A request (or other event) came ``waited`` ns into the window."""
        self.hits += 1
        self.polled_ns += waited
        if self.mode != "adaptive":
            return
        self.misses = 0
        self.budget = min(MAX_NS, max(self.budget, 2 * waited))
        self._note(waited, polled=True)

    def expired(self, waited: int) -> None:
        """The window passed empty after ``waited`` ns."""
        self.expiries += 1
        self.polled_ns += waited
        if self.mode != "adaptive":
            return
        self._expired = True
        self.budget = max(MIN_NS, self.budget // 2)
        self.misses += 1
        if self.misses >= MISSES:
            self.misses = 0
            self._cool_down()
            self.budget = START_NS

    def blocked(self, gap: int) -> None:
        """The loop blocked after a reply (no window, or it expired) and the next event came
        ``gap`` ns after the reply."""
        if self.mode != "adaptive" or gap > IDLE_NS:
            return  # an idle gap: nothing to learn
        if self._expired:
            self._expired = False
            self._note(gap, polled=True)
            wanted = 2 * gap
            if self.budget < wanted <= MAX_NS:  # the window was too short, not useless
                self.budget = wanted
                self.misses = 0
                if self.cooldown and self.pays is not False:
                    self.cooldown = 0
        else:
            self._note(gap, polled=False)

    def _note(self, gap: int, polled: bool) -> None:
        self._gaps[polled].append(gap)
        self._fresh += 1
        if self._fresh < SAMPLES:
            return
        self._fresh = 0
        polled_gaps, blocked_gaps = self._gaps[True], self._gaps[False]
        if len(polled_gaps) < SAMPLES or len(blocked_gaps) < SAMPLES:
            self._pays = None
            return
        self.gap_polled = sorted(polled_gaps)[len(polled_gaps) // 2]
        self.gap_blocked = sorted(blocked_gaps)[len(blocked_gaps) // 2]
        self._pays = self.gap_polled <= PAYS * self.gap_blocked

    def _cool_down(self) -> None:
        self.cooldown = self._next_cooldown
        self._next_cooldown = min(COOLDOWN_MAX, 2 * self._next_cooldown)

    def sample(self, now: int, run_delay: int | None) -> None:
        """The loop thread's cumulated run-queue delay (ns) at ``now``; None: unknown."""
        self._sample_at = now + SAMPLE_NS
        if run_delay is None:
            self.contended = False
            self._last_sample = None
            return
        last, self._last_sample = self._last_sample, (now, run_delay)
        if last is None or now <= last[0]:
            return
        self.contended = (run_delay - last[1]) > CONTENDED * (now - last[0])

    def describe(self) -> str:
        """One line for logs and status."""
        if self.mode != "adaptive":
            return f"poll {self.setting}"
        state = "on"
        if self.contended:
            state = "contended"
        elif self.cooldown:
            state = f"cooldown {self.cooldown}"
        return (
            f"poll adaptive ({state}, window {self.budget // 1000} us, {self.hits} hits / "
            f"{self.expiries} empty of {self.windows} windows)"
        )
