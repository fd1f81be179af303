"""The server's metrics, under the reference's names (`konnectivity_network_proxy_server_*`).

SHELL. Names, types, labels and buckets follow the reference so that existing dashboards
and alerts keep working; families the reference lacks follow Prometheus naming.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from proxy_common.errors import DialFailure
from proxy_common.messages import Message, packet_type_name
from proxy_common.metrics import CONNECTION_BUCKETS, BinaryMetrics, ByteCounter, CountCollector

PREFIX = "konnectivity_network_proxy_server_"
DIAL_BUCKETS = (1e-6, 1e-5, 1e-4, 0.005, 0.025, 0.1, 0.5, 2.5, 12.5)
DIRECTIONS = ("client_to_agent", "agent_to_client")


class ServerMetrics(BinaryMetrics):
    def __init__(self, strategies: tuple[str, ...] = ("default",)) -> None:
        super().__init__(PREFIX)
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
        self.dial_failures = self._add_count(CountCollector(
            PREFIX + "dial_failure_count",
            "Number of dial failures observed. Multiple failures can occur for a single dial request.",
            ["reason"],
        ))
        self.culled_leases = self._add_count(CountCollector(
            PREFIX + "culled_leases_count",
            "Count of expired leases that the lease garbage collection controller has culled.",
        ))
        self._add_stream_families("Connections closed because their reader stayed behind past the bounded wait.")
        self._lease_families(reg)
        # Our own, where the reference is silent.
        self.data_bytes = ByteCounter(
            PREFIX + "data_bytes_total",
            "Payload bytes carried by tunneled connections, by direction.",
            DIRECTIONS,
        )
        reg.register(self.data_bytes)
        self.closed_connections = Counter(
            PREFIX + "closed_connections_total",
            "Established connections removed, by reason (agent_closed, frontend_lost, agent_lost, overflow, mismatched).",
            ["reason"], registry=reg,
        )
        self.own_stream_upgrades = Counter(
            PREFIX + "own_stream_upgrades_total",
            "Connections moved from an agent's shared stream onto their own stream (per-connection flow control).",
            registry=reg,
        )
        self._add_process_families()
        self.ready_backend_connections.set(0)
        for name in strategies:
            self.ready_backends.labels(name).set(0)

    def _lease_families(self, reg: CollectorRegistry) -> None:
        """The lease garbage collector's families (labelled: they appear with their first sample)."""
        self.lease_delete_latency = Histogram(
            PREFIX + "lease_delete_latency_seconds",
            "Latency of lease deletion calls by the garbage collection controller, by HTTP status code.",
            ["http_status_code"], registry=reg,
        )
        self.lease_deletes = Counter(
            PREFIX + "lease_delete_total",
            "Count of lease deletion calls by the garbage collection controller, by HTTP status code and reason.",
            ["http_status_code", "reason"], registry=reg,
        )
        self.lease_list_latency = Histogram(
            PREFIX + "lease_list_latency_seconds",
            "Latency of lease list calls by the garbage collection controller, by HTTP status code.",
            ["http_status_code"], registry=reg,
        )
        self.lease_lists = Counter(
            PREFIX + "lease_list_total",
            "Count of lease list calls by the garbage collection controller, by HTTP status code and reason.",
            ["http_status_code", "reason"], registry=reg,
        )

    def stream_error(self, segment: str, code: str, packet_type: str = "Unknown") -> None:
        self.stream_errors.labels(segment, code, packet_type).inc()

    def send_failed(self, segment: str, message: Message) -> None:
        """A write to a stream whose peer has gone (grpc.aio fails it without a status; the
        reference's Send reports the peer's cancellation): counted as `Canceled`."""
        self.stream_error(segment, "Canceled", packet_type_name(message))

    def undecodable_packet(self, segment: str) -> None:
        """A packet that does not decode: the reference's Recv fails with codes.Internal
        ("failed to unmarshal"), counted with packet type Unknown. grpc.aio servicers see no
        other stream errors: a peer that cancels or vanishes looks like an orderly end."""
        self.stream_error(segment, "Internal")

    def dial_succeeded(self, seconds: float) -> None:
        self.dial_duration.observe(seconds)

    def dial_failed(self, reason: DialFailure) -> None:
        self.dial_failures.inc(str(reason))

    def connection_closed(self, seconds: float, reason: str = "") -> None:
        self.connection_duration.observe(seconds)
        if reason:
            self.closed_connections.labels(reason).inc()

    def frontend_closed(self, bytes_to_agent: int, bytes_to_client: int) -> None:
        """A frontend is gone: its byte counts join the closed totals."""
        self.data_bytes.add_closed("client_to_agent", bytes_to_agent)
        self.data_bytes.add_closed("agent_to_client", bytes_to_client)

    def overflow_closed(self) -> None:
        self.overflow_closes.inc()

    def tables(self, pending: int, established: int) -> None:
        self.pending_dials.set(pending)
        self.established.set(established)

    def backends(self, key_counts: dict[str, int]) -> None:
        for name, count in key_counts.items():
            self.ready_backends.labels(name).set(count)
            self.ready_backend_connections.set(count)
