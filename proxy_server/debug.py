"""The admin port's debug view: live connections and connected agents, as JSON-ready data.

SHELL (reads the switchboard, the router and the registry; changes nothing). The
reference has no such page; it answers the operator's first questions during an incident:
which agent carries which connection, to where, since when, how many bytes each way,
and which agents are connected, draining, and how loaded.
"""

from __future__ import annotations

import time
from typing import Any

from proxy_common.identifiers import AgentIdentifiers
from proxy_server.switchboard import Switchboard


def identifiers_view(ids: AgentIdentifiers) -> dict[str, Any]:
    return {
        "ipv4": list(ids.ipv4),
        "ipv6": list(ids.ipv6),
        "host": list(ids.host),
        "cidr": list(ids.cidr),
        "default_route": ids.default_route,
    }


def connections(board: Switchboard, now: float | None = None) -> list[dict[str, Any]]:
    """Every frontend (client tunnel) and every connection closing toward an agent."""
    now = time.monotonic() if now is None else now
    registry = board.router.registry
    rows: list[dict[str, Any]] = []
    for frontend_id, link in sorted(board.frontends.items()):
        view = board.router.frontend_view(frontend_id)
        if view is None:
            continue
        backend = registry.get(view.backend_id) if view.backend_id is not None else None
        established = (
            board.connection_started(view.backend_id, view.conn_id) if view.backend_id is not None else None
        )
        rows.append({
            "frontend_id": frontend_id,
            "client": link.label,
            "state": view.state,
            "address": link.address,
            "agent_id": backend.agent_id if backend else None,
            "backend_id": view.backend_id,
            "dial_id": view.dial_id,
            "conn_id": view.conn_id or None,
            "age_seconds": round(now - link.opened, 3),
            "established_seconds": round(now - established, 3) if established is not None else None,
            "bytes_to_agent": link.bytes_to_agent,
            "bytes_to_client": link.bytes_to_client,
            "own_stream": view.backend_id is not None and (view.backend_id, view.conn_id) in board.connection_links,
        })
    for backend_id, conn_id in board.router.closing_connections():
        backend = registry.get(backend_id)
        rows.append({
            "frontend_id": None,
            "state": "closing",
            "agent_id": backend.agent_id if backend else None,
            "backend_id": backend_id,
            "conn_id": conn_id,
        })
    return rows


def agents(board: Switchboard, now: float | None = None) -> list[dict[str, Any]]:
    """Every connected agent stream, with its identifiers, draining flag and load."""
    now = time.monotonic() if now is None else now
    rows: list[dict[str, Any]] = []
    for backend in board.router.registry.backends():
        link = board.backends.get(backend.backend_id)
        dials, conns = board.router.backend_load(backend.backend_id)
        rows.append({
            "agent_id": backend.agent_id,
            "backend_id": backend.backend_id,
            "stream": link.label if link else None,
            "identifiers": identifiers_view(backend.identifiers),
            "draining": backend.draining,
            "pending_dials": dials,
            "connections": conns,
            "connected_seconds": round(now - link.opened, 3) if link else None,
        })
    return rows


def sources(board: Switchboard) -> dict[str, Any]:
    """The debug pages served on the admin port (`/debug/<name>`)."""
    return {"connections": lambda: connections(board), "agents": lambda: agents(board)}
