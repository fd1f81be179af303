"""Prometheus plumbing shared by both binaries.

SHELL. Each process (and each server or agent built in a test) owns a private
CollectorRegistry, so several can live in one interpreter. The reference names three
counters `..._count`; prometheus_client would expose a Counter as `..._count_total`, so
those are `CountCollector`s: exposed untyped by the library and re-typed as counters when
rendered, which gives the reference's exact exposition.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


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


def render(registry: CollectorRegistry, count_names: Iterable[str] = ()) -> bytes:
    """Text exposition of a registry, with CountCollector families typed as counters."""
    text = generate_latest(registry)
    for name in count_names:
        text = text.replace(f"# TYPE {name} untyped\n".encode(), f"# TYPE {name} counter\n".encode())
    return text


def go_code_name(code: str) -> str:
    """A gRPC status code as Go's `codes.Code.String()` spells it (the `code` label of
    `..._stream_errors_total`): `UNAVAILABLE` -> `Unavailable`, `CANCELLED` -> `Canceled`."""
    if code == "CANCELLED":
        return "Canceled"
    if code == "OK":
        return "OK"
    return "".join(part.capitalize() for part in code.split("_"))
