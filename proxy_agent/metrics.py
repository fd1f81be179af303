"""The agent's metrics, under the reference's names (`konnectivity_network_proxy_agent_*`).

SHELL.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from proxy_common.messages import Message, packet_type_name
from proxy_common.metrics import CountCollector, render

PREFIX = "konnectivity_network_proxy_agent_"
DIAL_BUCKETS = (0.005, 0.025, 0.1, 0.5, 2.5, 10, 30)


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
        self.known_server_count.set(1)
        self._packet_children: dict[tuple[str, type], Counter] = {}

    def render(self) -> bytes:
        return render(self.registry, (self.server_connection_failures.name,))

    def packet(self, segment: str, message: Message) -> None:
        key = (segment, type(message))
        child = self._packet_children.get(key)
        if child is None:
            child = self.stream_packets.labels(segment, packet_type_name(message))
            self._packet_children[key] = child
        child.inc()
