"""The agent's reconnect back-off: jitter is added after the cap, as Kubernetes' wait.Backoff does."""

from __future__ import annotations

import random

from proxy_agent.sessions import Backoff


def test_waits_grow_by_half_then_stay_at_the_cap_plus_up_to_ten_percent() -> None:
    backoff = Backoff(1.0, 4.0, random.Random(7))
    waits = [backoff.failure() for _ in range(8)]
    for failures, wait in enumerate(waits):
        floor = min(4.0, 1.5**failures)
        assert floor <= wait < floor * 1.1


def test_two_agents_at_the_cap_do_not_wait_in_step() -> None:
    """Capped waits of equal length kept agents behind a round-robin balancer in step."""
    first, second = Backoff(0.05, 0.5, random.Random(1)), Backoff(0.05, 0.5, random.Random(2))
    first.failures = second.failures = 20
    capped = [(first.failure(), second.failure()) for _ in range(5)]
    assert all(a != b for a, b in capped)
    assert len({a for a, _ in capped}) == 5
