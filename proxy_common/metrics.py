"""Prometheus plumbing shared by both binaries.

SHELL. Each process (and each server or agent built in a test) owns a private
CollectorRegistry, so several can live in one interpreter. The reference names three
counters `..._count`; prometheus_client would expose a Counter as `..._count_total`, so
those are `CountCollector`s: exposed untyped by the library and re-typed as counters when
rendered, which gives the reference's exact exposition. `BinaryMetrics` holds the
families both binaries have under their own prefix (packets and stream errors per
segment, overflow closes, buffered bytes, the process collectors).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterable, Sequence

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from proxy_common.messages import Message, packet_type_name

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
CONNECTION_BUCKETS = (1, 5, 15, 30, 60, 300, 900, 1800, 3600, 14400, 43200, 86400)
# Go prints whole bucket bounds without a fraction (le="10"); prometheus_client writes le="10.0".
_WHOLE_LE = re.compile(rb'le="(\d+)\.0"')

# The reference exposes no `_created` series; they would double the series count.
disable_created_metrics()


class CountCollector(Collector):
    """A labelled counter exposed under an exact name (no `_total` suffix)."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._values: dict[tuple[str, ...], float] = {}
        self._lock = threading.Lock()
        if not self.labelnames:
            self._values[()] = 0.0

    def inc(self, *labelvalues: str, amount: float = 1.0) -> None:
        with self._lock:
            self._values[labelvalues] = self._values.get(labelvalues, 0.0) + amount

    def value(self, *labelvalues: str) -> float:
        return self._values.get(labelvalues, 0.0)

    def collect(self) -> Iterable[Metric]:
        metric = Metric(self.name, self.documentation, "unknown")
        with self._lock:
            for labelvalues, value in sorted(self._values.items()):
                metric.add_sample(self.name, dict(zip(self.labelnames, labelvalues, strict=True)), value)
        yield metric


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


def render(registry: CollectorRegistry, count_names: Iterable[str] = ()) -> bytes:
    """Text exposition of a registry as the reference writes it: CountCollector families
    typed as counters, whole bucket bounds without a fraction."""
    text = generate_latest(registry)
    for name in count_names:
        text = text.replace(f"# TYPE {name} untyped\n".encode(), f"# TYPE {name} counter\n".encode())
    return _WHOLE_LE.sub(rb'le="\1"', text)


class BinaryMetrics:
    """What the agent's and the server's metrics have in common, under their own `prefix`.

    A subclass creates its families in the order the exposition should list them, calling
    the `_add_...` methods where the shared ones belong."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.registry = CollectorRegistry(auto_describe=True)
        self._count_collectors: list[CountCollector] = []
        self._packet_children: dict[tuple[str, type], Counter] = {}

    def _add_count(self, collector: CountCollector) -> CountCollector:
        """Register a `..._count` family (rendered with the counter type)."""
        self.registry.register(collector)
        self._count_collectors.append(collector)
        return collector

    def _add_stream_families(self, overflow_documentation: str) -> None:
        prefix, reg = self.prefix, self.registry
        self.stream_packets = Counter(
            prefix + "stream_packets_total",
            "Count of packets processed, by segment and packet type (example: from_client, DIAL_REQ)",
            ["segment", "packet_type"], registry=reg,
        )
        self.stream_errors = Counter(
            prefix + "stream_errors_total",
            "Count of gRPC stream errors, by segment, grpc Code, packet type. (example: from_agent, Code.Unavailable, DIAL_RSP)",
            ["segment", "code", "packet_type"], registry=reg,
        )
        self.overflow_closes = Counter(
            prefix + "overflow_closed_connections_total", overflow_documentation, registry=reg
        )

    def _add_process_families(self) -> None:
        """The runtime collectors, then `buffered_bytes`: the last families of both."""
        reg = self.registry
        ProcessCollector(registry=reg)
        PlatformCollector(registry=reg)
        GCCollector(registry=reg)
        self.buffered_bytes = Gauge(
            self.prefix + "buffered_bytes",
            "Payload bytes currently queued in this process's per-stream and per-connection buffers.",
            registry=reg,
        )

    def render(self) -> bytes:
        return render(self.registry, [collector.name for collector in self._count_collectors])

    def packet(self, segment: str, message: Message) -> None:
        key = (segment, type(message))
        child = self._packet_children.get(key)
        if child is None:
            child = self.stream_packets.labels(segment, packet_type_name(message))
            self._packet_children[key] = child
        child.inc()


def go_code_name(code: str) -> str:
    """A gRPC status code as Go's `codes.Code.String()` spells it (the `code` label of
    `..._stream_errors_total`): `UNAVAILABLE` -> `Unavailable`, `CANCELLED` -> `Canceled`."""
    if code == "CANCELLED":
        return "Canceled"
    if code == "OK":
        return "OK"
    return "".join(part.capitalize() for part in code.split("_"))
