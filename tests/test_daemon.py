"""The daemon's event loop in this process: its timers and the server housekeeping they run."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from ulogd.edges import daemon as daemon_module
from ulogd.edges.daemon import Daemon
from ulogd.edges.transport.unixsock import UnixServerTransport
from ulogd.engine.server import Server
from ulogd.protocol.spec import RequestType as T
from ulogd.testing.driver import InProcess, LogDriver


@pytest.fixture(autouse=True)
def capture_every_line(caplog: pytest.LogCaptureFixture) -> None:
    # whatever level an earlier test left on the "ulogd" logger (ulogd replay sets one)
    caplog.set_level(logging.INFO, logger="ulogd")


@pytest.fixture
def transport(tmp_path: Path):
    t = UnixServerTransport(str(tmp_path / "ulogd.sock"))
    yield t


def test_timers_run_in_due_order_on_the_loop(transport: UnixServerTransport) -> None:
    d = Daemon(Server(), transport)
    order: list[str] = []
    d.call_later(0.03, lambda: order.append("third"))
    d.call_later(0.0, lambda: order.append("first"))
    d.call_later(0.01, lambda: order.append("second"))
    ticks: list[int] = []

    def tick() -> None:
        ticks.append(len(order))
        if len(ticks) == 3:
            order.append("stop")
            d._stop = True

    d.call_every(0.02, tick)
    d.run()
    assert order[:3] == ["first", "second", "third"]
    assert len(ticks) == 3 and order[-1] == "stop"


def test_a_failing_timer_costs_one_line_not_the_loop(
    transport: UnixServerTransport, caplog: pytest.LogCaptureFixture
) -> None:
    d = Daemon(Server(), transport)
    d.call_later(0.0, lambda: 1 / 0)
    d.call_later(0.01, lambda: setattr(d, "_stop", True))
    d.run()
    assert "internal error in a timer" in caplog.text


def test_housekeeping_logs_the_summary_of_a_flood_without_another_request(
    transport: UnixServerTransport,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    server = Server(clock=lambda: now[0])
    for i in range(50):
        LogDriver(InProcess(server), uuid=f"LVM-none-{i}", luid=i).call(T.GET_SYNC_COUNT)
    assert "suppressed" not in caplog.text
    now[0] = 3600.0  # the flood is long over; nothing else arrives
    monkeypatch.setattr(daemon_module, "HOUSEKEEPING_INTERVAL", 0.01)
    d = Daemon(server, transport)
    d.call_later(0.05, lambda: setattr(d, "_stop", True))
    d.run()
    assert caplog.text.count("suppressed 40 similar line(s) in the last 60 s") == 1
