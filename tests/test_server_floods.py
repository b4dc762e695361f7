"""Floods of bad requests (issue 14, item 10): every one answered, a bounded number of lines,
a summary of the rest, nothing silent; and errors attributed to the right log.

The server's rate limits run on :attr:`Server.clock`; these tests give it a clock that moves
only when they say so.
"""

from __future__ import annotations

import logging
import struct

import pytest

from ulogd.engine.ratelimit import BURST, WINDOW
from ulogd.engine.server import Server
from ulogd.ops import control
from ulogd.protocol import spec as p
from ulogd.protocol import wire
from ulogd.protocol.spec import RequestType as T
from ulogd.testing.driver import InProcess, LogDriver

TEXT = "131072 core 1024"  # 128 regions


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(autouse=True)
def capture_every_line(caplog: pytest.LogCaptureFixture) -> None:
    # whatever level an earlier test left on the "ulogd" logger (ulogd replay sets one)
    caplog.set_level(logging.INFO, logger="ulogd")


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def server(clock: Clock) -> Server:
    return Server(clock=clock)


def lines(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def test_ten_thousand_requests_for_unknown_logs_cost_a_burst_and_one_summary(
    server: Server, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    for i in range(10_000):
        d = LogDriver(InProcess(server), uuid=f"LVM-gone-{i:05d}", luid=i)
        assert d.call(T.GET_SYNC_COUNT).error == p.ESRCH  # every one is answered
    assert len(lines(caplog, "for unknown log")) == BURST
    assert lines(caplog, "suppressed") == []  # the window is still open
    clock.now += WINDOW
    server.log_summaries()
    assert lines(caplog, "suppressed") == [
        f"suppressed {10_000 - BURST} similar line(s) in the last {WINDOW:g} s: "
        "request for an unknown log"
    ]


def test_a_bad_datagram_long_after_a_flood_is_logged(
    server: Server, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    bad = bytearray(wire.encode_request(T.GET_SYNC_COUNT, uuid="LVM-x", seq=5))
    struct.pack_into("=I", bad, 4, 0xFFFF)  # nlmsg_type is not NLMSG_DONE
    for _ in range(5000):
        assert server.receive(bytes(bad)) == []
    assert len(lines(caplog, "rejected datagram: nlmsg_type")) == BURST
    clock.now += 3600  # an hour later, one more
    assert server.receive(bytes(bad)) == []
    assert len(lines(caplog, "rejected datagram: nlmsg_type")) == BURST + 1
    # the summary of the flood came first, before the new window's line
    summary = lines(caplog, "suppressed")
    assert summary == [f"suppressed {5000 - BURST} similar line(s) in the last 60 s: "
                       "rejected datagram"]  # fmt: skip
    assert server.rejected.total() == 5001


def test_foreign_and_malformed_datagrams_are_limited_apart(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    good = wire.encode_request(T.GET_SYNC_COUNT, uuid="LVM-x", seq=5)
    for _ in range(100):
        server.receive(good, 4242)
    assert server.receive(good[:20]) == []  # a truncated one, after the foreign flood
    assert len(lines(caplog, "not the kernel")) == BURST
    assert len(lines(caplog, "truncated datagram")) == 1


def test_regions_out_of_range_are_answered_and_logged_within_limits(
    server: Server, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    d = LogDriver(InProcess(server), uuid="LVM-victim-1", luid=7)
    d.create(TEXT)
    assert d.mark([3, 128]).error == p.EINVAL
    assert d.mark([3]).error == 0  # nothing applied from the refused batch but this
    (line,) = lines(caplog, "out of range")
    assert line == (
        "[victim-1] MARK_REGION luid=0x7: region 128 is out of range (the log has 128 "
        "regions): -EINVAL"
    )
    for r in range(128, 128 + 500):
        assert d.set_region_sync(r, True).error == p.EINVAL
        assert d.call(T.IS_CLEAN, struct.pack("=Q", r)).error == p.EINVAL
    assert len(lines(caplog, "out of range")) == BURST
    clock.now += WINDOW
    server.log_summaries()
    assert lines(caplog, "suppressed") == [
        f"suppressed {1000 + 1 - BURST} similar line(s) in the last 60 s: region out of range"
    ]


def test_refused_constructors_are_limited(server: Server, caplog: pytest.LogCaptureFixture) -> None:
    for i in range(50):
        d = LogDriver(InProcess(server), uuid="LVM-hostile", luid=i)
        assert d.ctr("not a constructor").error != 0
    assert len(lines(caplog, "refused")) == BURST
    assert server.logs == {}


def test_last_error_is_the_logs_own_not_one_sharing_its_uuid_tail(server: Server) -> None:
    errors = control.LastErrors()
    logger = logging.getLogger("ulogd")
    logger.addHandler(errors)
    try:
        a = LogDriver(InProcess(server), uuid="LVM-aaaa-sametail", luid=1)
        b = LogDriver(InProcess(server), uuid="LVM-bbbb-sametail", luid=2)
        a.create(TEXT)
        b.create(TEXT)
        # a refused CTR of a third log whose uuid ends the same way
        c = LogDriver(InProcess(server), uuid="LVM-cccc-sametail", luid=3)
        assert c.ctr("128 core 3").error != 0
        assert errors.for_log(a.uuid, 1) is None and errors.for_log(b.uuid, 2) is None
        assert "refused" in (errors.for_log(c.uuid, 3) or {})["message"]
        # the same uuid, another luid (a reload being refused) is not the live log either
        a2 = LogDriver(InProcess(server), uuid=a.uuid, luid=9)
        assert a2.ctr("128 core 3").error != 0
        assert errors.for_log(a.uuid, 1) is None
        # an error of a log is its own
        assert a.mark([500]).error == p.EINVAL
        assert "out of range" in (errors.for_log(a.uuid, 1) or {})["message"]
        assert errors.for_log(b.uuid, 2) is None
    finally:
        logger.removeHandler(errors)
