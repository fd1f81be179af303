"""Backend selection: strategies, draining, readiness."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from proxy_common.identifiers import AgentIdentifiers, parse
from proxy_server.backends import BackendRegistry


def registry(*strategies: str) -> BackendRegistry:
    return BackendRegistry(strategies or ("default",), rng=random.Random(1))


def test_default_spreads_over_agents_and_prefers_an_agents_first_stream() -> None:
    reg = registry()
    reg.add(1, "a", AgentIdentifiers())
    reg.add(2, "b", AgentIdentifiers())
    reg.add(3, "a", AgentIdentifiers())  # second stream of agent a
    picks = Counter(reg.pick("10.0.0.1:80") for _ in range(400))
    assert set(picks) == {1, 2}
    assert min(picks.values()) > 120


def test_draining_agent_used_only_when_every_candidate_drains() -> None:
    reg = registry()
    reg.add(1, "a", AgentIdentifiers())
    reg.add(2, "b", AgentIdentifiers())
    reg.mark_draining(1)
    assert {reg.pick("h:1") for _ in range(50)} == {2}
    reg.mark_draining(2)
    assert reg.pick("h:1") in {1, 2}
    assert reg.is_ready()  # draining agents still count for readiness


def test_dest_host_matches_host_ipv4_ipv6_and_falls_through() -> None:
    reg = registry("destHost", "default")
    reg.add(1, "a", parse("ipv4=10.0.0.5&host=node1.example.com"))
    reg.add(2, "b", parse("ipv6=fd00::5"))
    assert reg.pick("10.0.0.5:10250") == 1
    assert reg.pick("node1.example.com:10250") == 1
    assert reg.pick("[fd00::5]:10250") == 2
    assert reg.pick("10.9.9.9:80") in {1, 2}


def test_readiness_follows_the_first_strategy_only() -> None:
    reg = registry("destHost", "default")
    reg.add(1, "a", AgentIdentifiers())
    assert not reg.is_ready()
    assert reg.pick("x:1") == 1
    reg.add(2, "b", parse("ipv4=1.2.3.4"))
    assert reg.is_ready()
    reg.remove(2)
    assert not reg.is_ready()


def test_default_route_only_considers_default_route_agents() -> None:
    reg = registry("defaultRoute")
    reg.add(1, "a", parse("default-route=false"))
    assert reg.pick("x:1") is None
    reg.add(2, "b", parse("default-route=true"))
    assert reg.pick("x:1") == 2


def test_removal_cleans_every_strategy() -> None:
    reg = registry("destHost", "defaultRoute", "default")
    reg.add(1, "a", parse("ipv4=1.2.3.4&default-route=true"))
    reg.remove(1)
    assert reg.key_counts() == {"destHost": 0, "defaultRoute": 0, "default": 0}
    assert reg.pick("1.2.3.4:1") is None


def test_unknown_strategy_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown proxy strategies"):
        BackendRegistry(("nearest",))
