"""gRPC metadata keys and their encodings, exactly as they travel on the wire.

PURE. Keys are lower-case (grpcio rejects upper-case keys). The reference spells them
agentID, agentIdentifiers, serverID, serverCount and Authorization in its source.
"""

from __future__ import annotations

from collections.abc import Iterable

AGENT_ID = "agentid"
AGENT_IDENTIFIERS = "agentidentifiers"
AUTHORIZATION = "authorization"
SERVER_ID = "serverid"
SERVER_COUNT = "servercount"
BEARER_PREFIX = "Bearer "

# Our own extension, ignored by the Go peers: the server advertises per-connection flow
# control and the agent answers with the same key when it uses it.
FLOW_CONTROL = "konnectivity-py-flow"
FLOW_CONTROL_VERSION = "1"
SESSION = "konnectivity-py-session"

Metadata = Iterable[tuple[str, str | bytes]]


def values(metadata: Metadata | None, key: str) -> list[str]:
    """Every value of `key` (case-insensitive), decoded as text."""
    found: list[str] = []
    for name, value in metadata or ():
        if name.lower() == key:
            found.append(value.decode("latin-1") if isinstance(value, bytes) else value)
    return found


def single(metadata: Metadata | None, key: str) -> str | None:
    """The only value of `key`, or None when it is absent or repeated."""
    found = values(metadata, key)
    return found[0] if len(found) == 1 else None
