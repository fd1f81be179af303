"""The agent admin port's debug view: this agent, its server streams and its connections.

SHELL (reads the client set and its sessions; changes nothing). The reference has no
such page.
"""

from __future__ import annotations

import time
from typing import Any

from proxy_agent.connections import ConnState
from proxy_agent.sessions import ClientSet
from proxy_common import identifiers


def agent(clients: ClientSet) -> dict[str, Any]:
    config = clients.config
    try:
        ids = identifiers.parse(config.agent_identifiers)
        parsed: dict[str, Any] = {
            "ipv4": list(ids.ipv4), "ipv6": list(ids.ipv6), "host": list(ids.host),
            "cidr": list(ids.cidr), "default_route": ids.default_route,
        }
    except identifiers.IdentifierError:
        parsed = {}
    return {
        "agent_id": config.agent_id,
        "identifiers": parsed,
        "draining": clients.draining,
        "server_count": clients.target_count,
        "server_count_from_headers": clients.last_server_count,
        "server_count_from_leases": clients.lease_counter.count() if clients.lease_counter is not None else None,
        "server_count_source": config.server_count_source or "default",
        "connection_attempts": clients.attempts,
        "duplicates_in_a_row": clients.duplicate_streak,
        "connections": sum(len(s.endpoints) for s in clients.sessions.values()),
    }


def servers(clients: ClientSet) -> list[dict[str, Any]]:
    return [
        {"server_id": server_id, "draining": session.draining, "connections": len(session.endpoints)}
        for server_id, session in sorted(clients.sessions.items())
    ]


def connections(clients: ClientSet, now: float | None = None) -> list[dict[str, Any]]:
    now = time.monotonic() if now is None else now
    rows: list[dict[str, Any]] = []
    for server_id, session in sorted(clients.sessions.items()):
        for conn_id, endpoint in sorted(session.endpoints.items()):
            state = session.table.state(conn_id)
            if endpoint.inbox.closed:
                label = "closing"
            else:
                label = "dialing" if state is ConnState.DIALING else "open" if state in (ConnState.OPEN, ConnState.SWITCHING, ConnState.OWN) else "closing"
            rows.append({
                "server_id": server_id,
                "conn_id": conn_id,
                "address": endpoint.address,
                "state": label,
                "age_seconds": round(now - endpoint.opened, 3),
                "bytes_to_endpoint": endpoint.bytes_in,
                "bytes_from_endpoint": endpoint.bytes_out,
                "own_stream": endpoint.own_stream,
            })
    return rows


def sources(clients: ClientSet) -> dict[str, Any]:
    """The debug pages served on the admin port (`/debug/<name>`)."""
    return {
        "agent": lambda: agent(clients),
        "servers": lambda: servers(clients),
        "connections": lambda: connections(clients),
    }
