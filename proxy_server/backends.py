"""Which agent stream gets a dial: the registry of connected agents and the strategies.

PURE. One entry per agent Connect stream ("backend"), identified by a server-local
`backend_id`. Strategies follow the reference (`--proxy-strategies`):

* `default`: any agent, starting at a random one and scanning in order;
* `destHost`: the agent that advertised the dial's host as ipv4/ipv6/host identifier;
* `defaultRoute`: agents that advertised `default-route=true`, chosen like `default`.

They are asked in configured order; the first that finds a backend wins. Within a key the
earliest stream is preferred, and a draining stream is returned only when every candidate
drains. Readiness, as in the reference, looks only at the first strategy's registry.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from proxy_common.identifiers import AgentIdentifiers, host_of

STRATEGIES = ("default", "destHost", "defaultRoute")


@dataclass(slots=True)
class Backend:
    backend_id: int
    agent_id: str
    identifiers: AgentIdentifiers
    draining: bool = False


class BackendRegistry:
    def __init__(self, strategies: tuple[str, ...] = ("default",), rng: random.Random | None = None):
        unknown = [name for name in strategies if name not in STRATEGIES]
        if unknown or not strategies:
            raise ValueError(f"unknown proxy strategies {unknown}; known: {', '.join(STRATEGIES)}")
        self.strategies = strategies
        self._rng = rng or random.Random()
        self._backends: dict[int, Backend] = {}
        # strategy -> key -> backend ids in arrival order
        self._keys: dict[str, dict[str, list[int]]] = {name: {} for name in strategies}

    def __len__(self) -> int:
        return len(self._backends)

    def __contains__(self, backend_id: int) -> bool:
        return backend_id in self._backends

    def get(self, backend_id: int) -> Backend | None:
        return self._backends.get(backend_id)

    def backends(self) -> list[Backend]:
        return list(self._backends.values())

    def add(self, backend_id: int, agent_id: str, identifiers: AgentIdentifiers) -> None:
        backend = Backend(backend_id, agent_id, identifiers)
        self._backends[backend_id] = backend
        for name in self.strategies:
            for key in self._keys_for(name, backend):
                self._keys[name].setdefault(key, []).append(backend_id)

    def remove(self, backend_id: int) -> None:
        backend = self._backends.pop(backend_id, None)
        if backend is None:
            return
        for name in self.strategies:
            registry = self._keys[name]
            for key in self._keys_for(name, backend):
                ids = registry.get(key, [])
                if backend_id in ids:
                    ids.remove(backend_id)
                if not ids:
                    registry.pop(key, None)

    def mark_draining(self, backend_id: int) -> bool:
        """Flag a backend as draining (sticky). Returns False if it is unknown."""
        backend = self._backends.get(backend_id)
        if backend is None:
            return False
        backend.draining = True
        return True

    def pick(self, address: str) -> int | None:
        """The backend for a dial to `address`, or None when no strategy finds one."""
        for name in self.strategies:
            if name == "destHost":
                found = self._first_usable(self._keys[name].get(host_of(address), []))
            else:
                found = self._random_scan(self._keys[name])
            if found is not None:
                return found
        return None

    def is_ready(self) -> bool:
        return bool(self._keys[self.strategies[0]])

    def key_counts(self) -> dict[str, int]:
        """Number of keys per strategy (the reference's `ready_backends` gauge)."""
        return {name: len(keys) for name, keys in self._keys.items()}

    @staticmethod
    def _keys_for(strategy: str, backend: Backend) -> tuple[str, ...]:
        if strategy == "destHost":
            return tuple(dict.fromkeys(backend.identifiers.destination_keys()))
        if strategy == "defaultRoute" and not backend.identifiers.default_route:
            return ()
        return (backend.agent_id,)

    def _first_usable(self, ids: list[int]) -> int | None:
        for backend_id in ids:
            if not self._backends[backend_id].draining:
                return backend_id
        return ids[0] if ids else None

    def _random_scan(self, registry: dict[str, list[int]]) -> int | None:
        if not registry:
            return None
        keys = list(registry)
        start = self._rng.randrange(len(keys))
        fallback = None
        for offset in range(len(keys)):
            first = registry[keys[(start + offset) % len(keys)]][0]
            if not self._backends[first].draining:
                return first
            if fallback is None:
                fallback = first
        return fallback
