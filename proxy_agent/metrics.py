"""The agent's metrics, under the reference's names (`konnectivity_network_proxy_agent_*`).

SHELL. Names, types, labels and buckets follow the reference; the families it lacks
(bytes per direction, endpoint connection lifetime, close reasons) follow Prometheus
naming under the same prefix.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from proxy_common.messages import Message, packet_type_name
from proxy_common.metrics import CountCollector, render

PREFIX = "konnectivity_network_proxy_agent_"
DIAL_BUCKETS = (0.005, 0.025, 0.1, 0.5, 2.5, 10, 30)
CONNECTION_BUCKETS = (1, 5, 15, 30, 60, 300, 900, 1800, 3600, 14400, 43200, 86400)
DIRECTIONS = ("server_to_endpoint", "endpoint_to_server")
# Go prints whole bucket bounds without a fraction (le="10"); prometheus_client writes le="10.0".
_WHOLE_LE = re.compile(rb'le="(\d+)\.0"')

# The reference exposes no `_created` series.
disable_created_metrics()


class ByteCounter(Collector):
    """Payload bytes per direction: closed connections' totals plus the live ones' counters,
    read at scrape time so the hot path only adds to a plain integer per connection."""

    def __init__(self, name: str, documentation: str, directions: tuple[str, ...]) -> None:
        self.name, self.documentation = name, documentation
        self.closed = dict.fromkeys(directions, 0)
        self.live: Callable[[], Iterable[tuple[str, int]]] = tuple

    def add_closed(self, direction: str, count: int) -> None:
        self.closed[direction] += count

    def totals(self) -> dict[str, int]:
        totals = dict(self.closed)
        for direction, count in self.live():
            totals[direction] += count
        return totals

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=["direction"])
        for direction, count in self.totals().items():
            family.add_metric([direction], count)
        yield family


class AgentMetrics:
    def __init__(self) -> None:
        self.registry = reg = CollectorRegistry(auto_describe=True)
        self.dial_duration = Histogram(
            PREFIX + "dial_duration_seconds", "Latency of dial to the remote endpoint in seconds",
            buckets=DIAL_BUCKETS, registry=reg,
        )
        self.endpoint_dial_failures = Counter(
            PREFIX + "endpoint_dial_failure_total", "Number of failed dials to the remote endpoint, by reason.",
            ["reason"], registry=reg,
        )
        self.server_connection_failures = CountCollector(
            PREFIX + "server_connection_failure_count",
            "Count of failures to send to or receive from the proxy server, labeled by direction. DEPRECATED, please use stream_errors_total",
            ["direction"],
        )
        reg.register(self.server_connection_failures)
        self.open_server_connections = Gauge(
            PREFIX + "open_server_connections", "Current number of open server connections.", registry=reg
        )
        self.known_server_count = Gauge(
            PREFIX + "known_server_count", "Current number of servers agent is trying to connect to.", registry=reg
        )
        self.open_endpoint_connections = Gauge(
            PREFIX + "open_endpoint_connections", "Current number of open endpoint connections.", registry=reg
        )
        self.stream_packets = Counter(
            PREFIX + "stream_packets_total",
            "Count of packets processed, by segment and packet type (example: from_client, DIAL_REQ)",
            ["segment", "packet_type"], registry=reg,
        )
        self.stream_errors = Counter(
            PREFIX + "stream_errors_total",
            "Count of gRPC stream errors, by segment, grpc Code, packet type. (example: from_agent, Code.Unavailable, DIAL_RSP)",
            ["segment", "code", "packet_type"], registry=reg,
        )
        self.overflow_closes = Counter(
            PREFIX + "overflow_closed_connections_total",
            "Endpoint connections closed because the endpoint stopped reading past the bounded wait.",
            registry=reg,
        )
        self._lease_families(reg)
        # Our own, where the reference is silent.
        self.data_bytes = ByteCounter(
            PREFIX + "data_bytes_total", "Payload bytes carried by endpoint connections, by direction.", DIRECTIONS
        )
        reg.register(self.data_bytes)
        self.endpoint_connection_duration = Histogram(
            PREFIX + "endpoint_connection_duration_seconds",
            "Duration in seconds an endpoint connection was open (post-dial) before being closed.",
            buckets=CONNECTION_BUCKETS, registry=reg,
        )
        self.closed_endpoint_connections = Counter(
            PREFIX + "closed_endpoint_connections_total",
            "Endpoint connections closed, by reason (endpoint_closed, close_request, overflow, tunnel_lost, error).",
            ["reason"], registry=reg,
        )
        self.refused_dials = Counter(
            PREFIX + "refused_dials_total", "Dial requests refused without dialing because the agent is draining.",
            registry=reg,
        )
        ProcessCollector(registry=reg)
        PlatformCollector(registry=reg)
        GCCollector(registry=reg)
        self.known_server_count.set(1)
        self._packet_children: dict[tuple[str, type], Counter] = {}
        self.buffered_bytes = Gauge(
            PREFIX + "buffered_bytes",
            "Payload bytes currently queued in this process's per-stream and per-connection buffers.",
            registry=reg,
        )

    def _lease_families(self, reg: CollectorRegistry) -> None:
        """Lease counting's families (labelled: they appear with their first sample)."""
        self.lease_lists = Counter(
            PREFIX + "lease_lists_total", "Count of server lease list calls made by the agent, by HTTP response code and reason.",
            ["http_response_code", "reason"], registry=reg,
        )
        self.lease_watches = Counter(
            PREFIX + "lease_watches_total", "Count of server lease watch calls made by the agent, by HTTP response code and reason.",
            ["http_response_code", "reason"], registry=reg,
        )
        self.lease_list_latency = Histogram(
            PREFIX + "lease_list_latency_seconds", "Latency of server lease list calls made by the agent, in seconds.",
            ["http_response_code"], buckets=DIAL_BUCKETS, registry=reg,
        )

    def render(self) -> bytes:
        text = render(self.registry, (self.server_connection_failures.name,))
        return _WHOLE_LE.sub(rb'le="\1"', text)

    def endpoint_closed(self, seconds: float, reason: str, bytes_to_endpoint: int, bytes_from_endpoint: int) -> None:
        """An endpoint connection ended: lifetime, reason, and its bytes join the closed totals."""
        self.endpoint_connection_duration.observe(seconds)
        self.closed_endpoint_connections.labels(reason).inc()
        self.data_bytes.add_closed("server_to_endpoint", bytes_to_endpoint)
        self.data_bytes.add_closed("endpoint_to_server", bytes_from_endpoint)

    def stream_failed(self, segment: str, code: str, packet_type: str = "Unknown") -> None:
        """A send (`from_agent`) or receive (`to_agent`) on a server stream failed with a gRPC
        status other than an orderly end: `stream_errors_total` and the deprecated
        `server_connection_failure_count` (direction `to_server` / `from_server`), as the
        reference counts both. `code` is Go's spelling (`Unavailable`)."""
        self.stream_errors.labels(segment, code, packet_type).inc()
        self.server_connection_failures.inc("to_server" if segment == "from_agent" else "from_server")

    def packet(self, segment: str, message: Message) -> None:
        key = (segment, type(message))
        child = self._packet_children.get(key)
        if child is None:
            child = self.stream_packets.labels(segment, packet_type_name(message))
            self._packet_children[key] = child
        child.inc()
