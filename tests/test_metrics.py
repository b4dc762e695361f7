"""Metrics: the exposition parses with prometheus_client's own parser and its numbers match the
requests a real daemon served (over HTTP and over the control socket)."""

from __future__ import annotations

import http.client
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.test_control import DaemonProcess
from ulogd.edges import counters
from ulogd.edges.transport.unixsock import UnixClient
from ulogd.ops import metrics
from ulogd.protocol.spec import RequestType as T
from ulogd.testing.driver import LogDriver

UUID = "LVM-metricsMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMM0001"
SYNCED = 25


def parse(text: str) -> dict[str, list]:
    """name → samples, checking the text is valid exposition format on the way."""
    families = {f.name: f.samples for f in text_string_to_metric_families(text)}
    assert families, text
    return families


def value(samples: list, name: str, **labels: str) -> float:
    found = [s.value for s in samples if s.name == name and all(
        s.labels.get(k) == v for k, v in labels.items())]  # fmt: skip
    assert len(found) == 1, (name, labels, samples)
    return found[0]


def scrape(address: str, path: str = "/metrics") -> tuple[int, str, str]:
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("GET", path)
    response = conn.getresponse()
    body = response.read().decode()
    conn.close()
    return response.status, response.getheader("Content-Type") or "", body


@pytest.fixture
def served(tmp_path: Path):
    with (
        DaemonProcess(tmp_path, "--metrics-listen", "127.0.0.1:0") as d,
        UnixClient(d.transport) as link,
    ):
        log = LogDriver(link, uuid=UUID, luid=0x10)
        log.create("131072 clustered-core 1024")
        for region in range(SYNCED):
            assert log.set_region_sync(region, True).error == 0
        assert log.mark([200]).error == -22  # out of range: -EINVAL
        assert log.mark([100, 101]).error == 0
        yield d


def test_http_metrics_match_what_was_served(served: DaemonProcess) -> None:
    address = served.request("status")["daemon"]["metrics_listen"]
    assert address.startswith("127.0.0.1:") and not address.endswith(":0")
    status, content_type, body = scrape(address)
    assert status == 200
    assert content_type.startswith("text/plain; version=0.0.4")
    m = parse(body)
    requests = m["ulogd_requests"]
    assert value(requests, "ulogd_requests_total", type="SET_REGION_SYNC", result="0") == SYNCED
    assert value(requests, "ulogd_requests_total", type="MARK_REGION", result="-EINVAL") == 1
    assert value(requests, "ulogd_requests_total", type="MARK_REGION", result="0") == 1
    for rtype in ("CTR", "GET_REGION_SIZE", "RESUME"):
        assert value(requests, "ulogd_requests_total", type=rtype, result="0") == 1
    total = sum(s.value for s in requests if s.name == "ulogd_requests_total")
    assert total == SYNCED + 5
    assert value(m["ulogd_datagrams_received"], "ulogd_datagrams_received_total") == total
    latency = m["ulogd_reply_latency_seconds"]
    # Every reply was observed once; buckets are cumulative and end at the count.
    assert value(latency, "ulogd_reply_latency_seconds_count") == total
    buckets = [s for s in latency if s.name == "ulogd_reply_latency_seconds_bucket"]
    assert buckets[-1].labels["le"] == "+Inf" and buckets[-1].value == total
    assert [b.value for b in buckets] == sorted(b.value for b in buckets)
    assert value(latency, "ulogd_reply_latency_seconds_sum") > 0
    labels = {"uuid": UUID, "luid": "0x10", "type": "clustered-core"}
    assert value(m["ulogd_log_regions"], "ulogd_log_regions", **labels) == 128
    assert value(m["ulogd_log_regions_in_sync"], "ulogd_log_regions_in_sync", **labels) == SYNCED
    assert value(m["ulogd_log_regions_marked"], "ulogd_log_regions_marked", **labels) == 2
    assert value(m["ulogd_log_resumed"], "ulogd_log_resumed", **labels) == 1
    assert value(m["ulogd_logs"], "ulogd_logs") == 1
    assert value(m["ulogd_disk_flushes"], "ulogd_disk_flushes_total") == 0
    assert value(m["ulogd_cluster_deliveries"], "ulogd_cluster_deliveries_total") == 0
    assert value(m["ulogd_build_info"], "ulogd_build_info", version=metrics.__version__) == 1


def test_control_socket_metrics_agree(served: DaemonProcess) -> None:
    answer = served.request("metrics")
    assert answer["ok"] is True
    m = parse(answer["text"])
    assert value(m["ulogd_requests"], "ulogd_requests_total", type="SET_REGION_SYNC",
                 result="0") == SYNCED  # fmt: skip


def test_suppressed_log_lines_are_counted(served: DaemonProcess) -> None:
    with UnixClient(served.transport) as link:
        for i in range(25):  # requests for logs that do not exist: all answered
            assert LogDriver(link, uuid=f"LVM-none-{i}", luid=i).call(T.IN_SYNC, bytes(8)).error
    m = parse(served.request("metrics")["text"])
    suppressed = m["ulogd_log_lines_suppressed"]
    assert value(suppressed, "ulogd_log_lines_suppressed_total",
                 kind="request for an unknown log") == 25 - 10  # fmt: skip


def test_http_other_paths(served: DaemonProcess) -> None:
    address = served.request("status")["daemon"]["metrics_listen"]
    assert scrape(address, "/")[0] == 404
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("POST", "/metrics", body=b"x")
    assert conn.getresponse().status == 405
    conn.close()
    assert served.request("ping")["ok"]  # the loop is unharmed


def test_no_listener_by_default(tmp_path: Path) -> None:
    with DaemonProcess(tmp_path) as d:
        assert d.request("status")["daemon"]["metrics_listen"] is None
        assert d.request("metrics")["ok"]


def _loop_device(backing: Path) -> str | None:
    result = subprocess.run(
        ["losetup", "--find", "--show", str(backing)], capture_output=True, text=True
    )
    return result.stdout.strip() if result.returncode == 0 else None


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a loop device")
def test_disk_flushes_and_bytes(tmp_path: Path) -> None:
    backing = tmp_path / "log.img"
    backing.write_bytes(b"\0" * (1 << 20))
    loop = _loop_device(backing)
    if loop is None:
        pytest.skip("no loop device available")
    try:
        with DaemonProcess(tmp_path) as d, UnixClient(d.transport) as link:
            log = LogDriver(link, uuid=UUID, luid=0x20)
            log.create(f"131072 clustered-disk {loop} 1024 nosync")  # all clean: marks dirty it
            before = parse(d.request("metrics")["text"])
            writes0 = value(before["ulogd_disk_flushes"], "ulogd_disk_flushes_total")
            bytes0 = value(before["ulogd_disk_written_bytes"], "ulogd_disk_written_bytes_total")
            assert value(before["ulogd_disk_reads"], "ulogd_disk_reads_total") == 1
            for region in (1, 2, 3):
                assert log.mark([region]).error == 0
                assert log.flush().error == 0  # a clean bit changed: one write each
            assert log.flush().error == 0  # nothing changed: no write
            after = parse(d.request("metrics")["text"])
            assert value(after["ulogd_disk_flushes"], "ulogd_disk_flushes_total") == writes0 + 3
            written = value(after["ulogd_disk_written_bytes"], "ulogd_disk_written_bytes_total")
            assert written >= bytes0 + 3 * 512 and (written - bytes0) % 512 == 0
            assert value(after["ulogd_disk_errors"], "ulogd_disk_errors_total") == 0
            log.ok(T.PRESUSPEND)
            log.ok(T.POSTSUSPEND)
            log.ok(T.DTR)
    finally:
        subprocess.run(["losetup", "-d", loop], check=False)


# ---------------------------------------------------------------------- pieces
def test_histogram_bucket_edges() -> None:
    h = counters.LatencyHistogram()
    for ns in (1, 10_000, 10_001, 999_999_999, 1_000_000_000, 5_000_000_000):
        h.observe(ns)
    buckets = dict(h.buckets())
    assert buckets["1e-05"] == 2  # le is inclusive
    assert buckets["2.5e-05"] == 3
    assert buckets["1.0"] == 5
    assert buckets["+Inf"] == 6 == h.count
    assert h.sum_ns == 1 + 10_000 + 10_001 + 999_999_999 + 1_000_000_000 + 5_000_000_000


def test_cluster_hooks_count() -> None:
    m = counters.Metrics()
    m.cluster_delivery()
    m.cluster_delivery(4)
    m.membership_change()
    assert (m.cluster_deliveries, m.membership_changes) == (5, 1)


def test_status_json_is_not_metrics(served: DaemonProcess) -> None:
    # The status snapshot and the metrics agree on the in-sync count.
    snap = served.request("status")
    m = parse(served.request("metrics")["text"])
    entry = snap["logs"][0]
    assert entry["in_sync"] == value(
        m["ulogd_log_regions_in_sync"], "ulogd_log_regions_in_sync", uuid=UUID
    )
    json.dumps(snap)  # JSON-serialisable as is


ALERTS = Path(__file__).resolve().parent.parent / "docs" / "prometheus-alerts.yml"


def test_example_alerts_name_only_series_the_daemon_exports(served: DaemonProcess) -> None:
    """Every ulogd_* series and label the example rules use is in a real daemon's exposition
    (a renamed metric would leave an alert that never fires)."""
    families = parse(served.request("metrics")["text"])
    samples = [s for family in families.values() for s in family]
    # A family without samples yet (no rejected datagram, no orphan) still counts.
    exported = {s.name for s in samples} | {
        name + suffix for name in families for suffix in ("", "_total")
    }
    labels = {k for s in samples for k in s.labels} | {"instance", "job", "le", "reason", "node"}
    text = ALERTS.read_text()
    used = set(re.findall(r"\bulogd_[a-z_]+", text))
    assert used and used <= exported, used - exported
    for group in re.findall(r"\b(?:by|on) \(([^)]*)\)", text):
        names = {n.strip() for n in group.split(",")}
        assert names <= labels, names - labels
    assert text.count("- alert:") == len(set(re.findall(r"- alert: (\w+)", text)))


@pytest.mark.slow
def test_example_alerts_pass_promtool() -> None:
    from tests.test_packaging import ensure

    promtool = ensure("promtool", "prometheus")
    result = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True,
                            text=True)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 9 rules found" in result.stdout, result.stdout
