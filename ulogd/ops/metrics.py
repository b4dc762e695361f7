"""Metrics in the Prometheus text format, collected from the live daemon at scrape time.

Theory of operation
-------------------
The request path pays for one thing only: the reply-latency histogram of
:mod:`ulogd.edges.counters`, bumped on the loop thread.  Everything else is *derived* when a
scrape asks: :class:`DaemonCollector` (a ``prometheus_client`` custom collector) reads

* ``Server.results`` (requests by type and result), ``Server.rejected`` and the lines its
  rate limits suppressed;
* every log's region counts (in sync, marked, device health);
* the disk workers' counters (reads, flush writes, bytes written, errors — bumped on the
  worker threads, plain integers read without a lock);
* the daemon's own counters (:class:`ulogd.edges.counters.Metrics`) for the cluster layer
  (``cluster_delivery()``, ``membership_change()``) and the histogram.

Collection runs on the loop thread — through the control socket's ``metrics`` command or the
optional HTTP listener (:class:`HttpListener`), which is served from the daemon's own selector
loop and never from another thread, so no lock is needed against the server's state.  The
listener is off unless the configuration names an address, and it refuses to bind anything but
a loopback address (see :func:`ulogd.ops.config.parse_listen`).
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ulogd import __version__
from ulogd.ops.service import StreamService

if TYPE_CHECKING:
    from ulogd.edges.daemon import Daemon

log = logging.getLogger(__name__)

#: the classic text format that ``generate_latest`` writes (every Prometheus reads it)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class DaemonCollector:
    """A ``prometheus_client`` collector reading a :class:`~ulogd.edges.daemon.Daemon`."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def describe(self) -> list[Any]:
        return []  # no registration-time collection: state changes every request

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
            InfoMetricFamily,
        )

        daemon = self.daemon
        server = daemon.server
        metrics = daemon.metrics

        yield InfoMetricFamily("ulogd_build", "ulogd version", value={"version": __version__})
        requests = CounterMetricFamily(
            "ulogd_requests",
            "Requests answered, by request type and result (0 or the negative errno name)",
            labels=["type", "result"],
        )
        for (rtype, result), count in sorted(server.results.items()):
            requests.add_metric([rtype, result], count)
        yield requests
        rejected = CounterMetricFamily(
            "ulogd_rejected_datagrams",
            "Datagrams refused before dispatch, by reason",
            labels=["reason"],
        )
        for reason, count in sorted(server.rejected.items()):
            rejected.add_metric([reason], count)
        yield rejected
        suppressed = CounterMetricFamily(
            "ulogd_log_lines_suppressed",
            "Log lines left out by the rate limits, by kind of event",
            labels=["kind"],
        )
        for kind, count in sorted(server.limiter.suppressed_total.items()):
            suppressed.add_metric([kind], count)
        yield suppressed
        yield CounterMetricFamily(
            "ulogd_datagrams_received", "Datagrams read from the transport", value=daemon.served
        )

        histogram = metrics.latency
        buckets = histogram.buckets()
        yield HistogramMetricFamily(
            "ulogd_reply_latency_seconds",
            "From a request's arrival to its reply being sent (including disk I/O)",
            buckets=buckets,
            sum_value=histogram.sum_ns / 1e9,
        )

        labels = ["uuid", "luid", "type"]
        regions = GaugeMetricFamily("ulogd_log_regions", "Regions of the log", labels=labels)
        in_sync = GaugeMetricFamily(
            "ulogd_log_regions_in_sync", "Regions whose mirror legs agree", labels=labels
        )
        marked = GaugeMetricFamily(
            "ulogd_log_regions_marked", "Regions some node is writing", labels=labels
        )
        failed = GaugeMetricFamily(
            "ulogd_log_device_failed", "1 when the log device failed (health D)", labels=labels
        )
        resumed = GaugeMetricFamily("ulogd_log_resumed", "1 when resumed (active)", labels=labels)
        views = server.view(time.time())
        for v in views:
            values = [v.uuid, f"{v.luid:#x}", v.type_word]
            regions.add_metric(values, v.regions)
            in_sync.add_metric(values, v.in_sync)
            marked.add_metric(values, v.marked)
            failed.add_metric(values, int(v.disk_failed))
            resumed.add_metric(values, int(v.resumed))
        orphaned = GaugeMetricFamily(
            "ulogd_log_orphaned_regions",
            "Regions held for a node whose daemon is gone while the node stays in the ring",
            labels=[*labels, "node"],
        )
        for v in views:
            for o in v.orphans:
                orphaned.add_metric([v.uuid, f"{v.luid:#x}", v.type_word, str(o.node)], o.regions)
        yield orphaned
        yield GaugeMetricFamily("ulogd_logs", "Logs served", value=len(views))
        yield from (regions, in_sync, marked, failed, resumed)

        workers = daemon.disk_workers()
        yield CounterMetricFamily(
            "ulogd_disk_flushes",
            "Writes of log-device chunks (one per FLUSH/POSTSUSPEND that changed the log)",
            value=sum(w.writes for w in workers),
        )
        yield CounterMetricFamily(
            "ulogd_disk_written_bytes",
            "Bytes written to log devices",
            value=sum(w.bytes_written for w in workers),
        )
        yield CounterMetricFamily(
            "ulogd_disk_reads", "Reads of on-disk logs", value=sum(w.reads for w in workers)
        )
        yield CounterMetricFamily(
            "ulogd_disk_errors",
            "Log-device reads and writes that failed",
            value=sum(w.errors for w in workers),
        )
        yield CounterMetricFamily(
            "ulogd_cluster_deliveries",
            "Cluster messages delivered to this node",
            value=metrics.cluster_deliveries,
        )
        yield CounterMetricFamily(
            "ulogd_cluster_membership_changes",
            "Cluster membership changes seen",
            value=metrics.membership_changes,
        )
        cycles = CounterMetricFamily(
            "ulogd_recovery_cycles",
            "Suspend/resume cycles of a local mirror to copy a departed member's regions, "
            "by result (ok, failed, no_mirror)",
            labels=["result"],
        )
        for result, count in metrics.recovery_cycles.items():
            cycles.add_metric([result], count)
        yield cycles
        yield CounterMetricFamily(
            "ulogd_dmsetup_failures",
            "dmsetup runs that failed (table lookup or suspend/resume of a recovery cycle)",
            value=metrics.dmsetup_failures,
        )


def render(daemon: Daemon) -> bytes:
    """The Prometheus text exposition of ``daemon`` (call on the loop thread)."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(DaemonCollector(daemon))  # type: ignore[arg-type]
    return generate_latest(registry)


class HttpListener:
    """``GET /metrics`` over HTTP/1.0, served from the daemon's selector loop."""

    def __init__(self, daemon: Daemon, host: str, port: int) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(16)
        except OSError as exc:
            sock.close()
            raise OSError(exc.errno, f"metrics listener {host}:{port}: {exc.strerror}") from None
        self.address = sock.getsockname()[:2]
        self.daemon = daemon
        self.service = StreamService(daemon, sock, self._answer, terminator=b"\r\n\r\n")
        log.info("metrics on http://%s:%d/metrics", *self.address)

    def _answer(self, request: bytes, peer: Any) -> bytes:
        first = request.split(b"\r\n", 1)[0].split()
        if len(first) < 2 or first[0] not in (b"GET", b"HEAD"):
            return _http(405, b"only GET /metrics\n", "text/plain")
        if first[1].split(b"?", 1)[0] != b"/metrics":
            return _http(404, b"try /metrics\n", "text/plain")
        body = render(self.daemon)
        return _http(200, b"" if first[0] == b"HEAD" else body, CONTENT_TYPE, len(body))

    def close(self) -> None:
        self.service.close()


def _http(status: int, body: bytes, content_type: str, length: int | None = None) -> bytes:
    reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed"}[status]
    head = (
        f"HTTP/1.0 {status} {reason}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body) if length is None else length}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body
