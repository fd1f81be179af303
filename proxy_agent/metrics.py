"""The agent's metrics, under the reference's names (`konnectivity_network_proxy_agent_*`).

SHELL. Names, types, labels and buckets follow the reference; the families it lacks
(bytes per direction, endpoint connection lifetime, close reasons) follow Prometheus
naming under the same prefix.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from proxy_common.metrics import CONNECTION_BUCKETS, BinaryMetrics, ByteCounter, CountCollector

PREFIX = "konnectivity_network_proxy_agent_"
DIAL_BUCKETS = (0.005, 0.025, 0.1, 0.5, 2.5, 10, 30)
DIRECTIONS = ("server_to_endpoint", "endpoint_to_server")


class AgentMetrics(BinaryMetrics):
    def __init__(self) -> None:
        super().__init__(PREFIX)
        reg = self.registry
        self.dial_duration = Histogram(
            PREFIX + "dial_duration_seconds", "Latency of dial to the remote endpoint in seconds",
            buckets=DIAL_BUCKETS, registry=reg,
        )
        self.endpoint_dial_failures = Counter(
            PREFIX + "endpoint_dial_failure_total", "Number of failed dials to the remote endpoint, by reason.",
            ["reason"], registry=reg,
        )
        self.server_connection_failures = self._add_count(CountCollector(
            PREFIX + "server_connection_failure_count",
            "Count of failures to send to or receive from the proxy server, labeled by direction. DEPRECATED, please use stream_errors_total",
            ["direction"],
        ))
        self.open_server_connections = Gauge(
            PREFIX + "open_server_connections", "Current number of open server connections.", registry=reg
        )
        self.known_server_count = Gauge(
            PREFIX + "known_server_count", "Current number of servers agent is trying to connect to.", registry=reg
        )
        self.open_endpoint_connections = Gauge(
            PREFIX + "open_endpoint_connections", "Current number of open endpoint connections.", registry=reg
        )
        self._add_stream_families(
            "Endpoint connections closed because the endpoint stopped reading past the bounded wait."
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
        self.own_stream_upgrades = Counter(
            PREFIX + "own_stream_upgrades_total",
            "Connections moved from the shared stream onto their own stream (per-connection flow control).",
            registry=reg,
        )
        self._add_process_families()
        self.known_server_count.set(1)

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
