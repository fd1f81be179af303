"""Agent identifiers: the URL-query list an agent advertises (`--agent-identifiers`).

PURE. Format as the reference defines it: `k=v&k=v`, values percent-encoded, keys may
repeat. Keys: ipv4, ipv6, host, cidr, default-route. The agent refuses unknown keys at
start-up; the server ignores them (forward compatibility).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import parse_qsl

KNOWN_KEYS = ("ipv4", "ipv6", "host", "cidr", "default-route")
_TRUE = {"1", "t", "T", "TRUE", "true", "True"}
_FALSE = {"0", "f", "F", "FALSE", "false", "False"}


class IdentifierError(ValueError):
    """The identifier string does not parse."""


@dataclass(frozen=True, slots=True)
class AgentIdentifiers:
    ipv4: tuple[str, ...] = ()
    ipv6: tuple[str, ...] = ()
    host: tuple[str, ...] = ()
    cidr: tuple[str, ...] = ()
    default_route: bool = False
    unknown: tuple[str, ...] = field(default=())

    def destination_keys(self) -> tuple[str, ...]:
        """The hosts the destHost strategy matches against, in advertised order."""
        return self.ipv4 + self.ipv6 + self.host


def parse(text: str, *, strict: bool = False) -> AgentIdentifiers:
    """Parse an identifier string. `strict` (the agent's check) refuses unknown keys."""
    if ";" in text:
        raise IdentifierError("invalid semicolon separator in query")
    try:
        pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=bool(text))
    except ValueError as exc:
        raise IdentifierError(str(exc)) from exc
    found: dict[str, list[str]] = {key: [] for key in KNOWN_KEYS}
    unknown: list[str] = []
    for key, value in pairs:
        if key in found:
            found[key].append(value)
        elif strict:
            raise IdentifierError(f"unknown address type: {key}")
        else:
            unknown.append(key)
    default_route = False
    if found["default-route"]:
        first = found["default-route"][0]
        if first not in _TRUE | _FALSE:
            raise IdentifierError(f"invalid default-route value {first!r}")
        default_route = first in _TRUE
    return AgentIdentifiers(
        ipv4=tuple(found["ipv4"]),
        ipv6=tuple(found["ipv6"]),
        host=tuple(found["host"]),
        cidr=tuple(found["cidr"]),
        default_route=default_route,
        unknown=tuple(unknown),
    )


def host_of(address: str) -> str:
    """The host part of a dial address: `h:p` -> h, `[v6]:p` -> v6, bare IPv6 kept."""
    if address.startswith("["):
        end = address.find("]")
        return address[1:end] if end > 0 else address
    if address.count(":") == 1:
        return address.rsplit(":", 1)[0]
    return address
