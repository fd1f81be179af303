"""The server's metrics, under the reference's names (`konnectivity_network_proxy_server_*`).

SHELL. Names, types, labels and buckets follow the reference so that existing dashboards
and alerts keep working; families the reference lacks follow Prometheus naming.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from proxy_common.errors import DialFailure
from proxy_common.messages import Message, packet_type_name
from proxy_common.metrics import CountCollector, render

PREFIX = "konnectivity_network_proxy_server_"
DIAL_BUCKETS = (1e-6, 1e-5, 1e-4, 0.005, 0.025, 0.1, 0.5, 2.5, 12.5)
CONNECTION_BUCKETS = (1, 5, 15, 30, 60, 300, 900, 1800, 3600, 14400, 43200, 86400)


class ServerMetrics:
    def __init__(self, strategies: tuple[str, ...] = ("default",)) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        self.dial_duration = Histogram(
            PREFIX + "dial_duration_seconds",
            "Latency of dial to the remote endpoint in seconds",
            buckets=DIAL_BUCKETS, registry=reg,
        )
        self.frontend_write_duration = Histogram(
            PREFIX + "frontend_write_duration_seconds",
            "Latency of write to the frontend in seconds",
            buckets=DIAL_BUCKETS, registry=reg,
        )
        self.connection_duration = Histogram(
            PREFIX + "connection_duration_seconds",
            "Duration in seconds a proxied end-to-end connection was established (post-dial) before being closed.",
            buckets=CONNECTION_BUCKETS, registry=reg,
        )
        self.grpc_connections = Gauge(
            PREFIX + "grpc_connections",
            "Number of current grpc connections, partitioned by service method.",
            ["service_method"], registry=reg,
        )
        self.http_connections = Gauge(
            PREFIX + "http_connections", "Number of current HTTP CONNECT connections", registry=reg
        )
        self.ready_backend_connections = Gauge(
            PREFIX + "ready_backend_connections",
            "Number of konnectivity agent connected to the proxy server. DEPRECATED, please use ready_backends",
            registry=reg,
        )
        self.ready_backends = Gauge(
            PREFIX + "ready_backends",
            "Number of konnectivity agent connected to the proxy server",
            ["proxy_strategy"], registry=reg,
        )
        self.pending_dials = Gauge(
            PREFIX + "pending_backend_dials", "Current number of pending backend dial requests", registry=reg
        )
        self.established = Gauge(
            PREFIX + "established_connections",
            "Current number of established end-to-end connections (post-dial).",
            registry=reg,
        )
        self.full_receive_channels = Gauge(
            PREFIX + "full_receive_channels",
            "Number of current connections blocked by a full receive channel, partitioned by service method.",
            ["service_method"], registry=reg,
        )
        self.dial_failures = CountCollector(
            PREFIX + "dial_failure_count",
            "Number of dial failures observed. Multiple failures can occur for a single dial request.",
            ["reason"],
        )
        self.culled_leases = CountCollector(
            PREFIX + "culled_leases_count",
            "Count of expired leases that the lease garbage collection controller has culled.",
        )
        reg.register(self.dial_failures)
        reg.register(self.culled_leases)
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
            "Connections closed because their reader stayed behind past the bounded wait.",
            registry=reg,
        )
        self.ready_backend_connections.set(0)
        for name in strategies:
            self.ready_backends.labels(name).set(0)
        self._packet_children: dict[tuple[str, type], Counter] = {}

    def render(self) -> bytes:
        return render(self.registry, (self.dial_failures.name, self.culled_leases.name))

    def packet(self, segment: str, message: Message) -> None:
        key = (segment, type(message))
        child = self._packet_children.get(key)
        if child is None:
            child = self.stream_packets.labels(segment, packet_type_name(message))
            self._packet_children[key] = child
        child.inc()

    def stream_error(self, segment: str, code: str, packet_type: str = "Unknown") -> None:
        self.stream_errors.labels(segment, code, packet_type).inc()

    def dial_succeeded(self, seconds: float) -> None:
        self.dial_duration.observe(seconds)

    def dial_failed(self, reason: DialFailure) -> None:
        self.dial_failures.inc(str(reason))

    def connection_closed(self, seconds: float) -> None:
        self.connection_duration.observe(seconds)

    def overflow_closed(self) -> None:
        self.overflow_closes.inc()

    def tables(self, pending: int, established: int) -> None:
        self.pending_dials.set(pending)
        self.established.set(established)

    def backends(self, key_counts: dict[str, int]) -> None:
        for name, count in key_counts.items():
            self.ready_backends.labels(name).set(count)
            self.ready_backend_connections.set(count)
