"""The project's exception hierarchy.

PURE. Exceptions are for a whole stream, listener or process; a peer's mistake about one
connection is answered on the wire instead (see the connection tables). Third-party
exceptions are translated into these once, at the adapter that meets them.
"""

from __future__ import annotations

import enum


class ProxyError(Exception):
    """Base of every error raised on purpose by this project."""


class ConfigError(ProxyError):
    """Flags or files are unusable; the CLI reports every problem and exits 2."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


class AuthError(ProxyError):
    """A peer failed authentication. The server ends its stream before any dial reaches it."""


class DialError(ProxyError):
    """A dial produced no connection; `str(exc)` is the text sent in DIAL_RSP.error."""

    def __init__(self, message: str, *, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


class TunnelError(ProxyError):
    """The tunnel stream can no longer be used."""


class TunnelClosed(TunnelError):
    """The stream ended in an orderly way (EOF or cancellation by either side)."""


class TunnelBroken(TunnelError):
    """The stream failed underneath us (transport error, reset, status other than OK)."""

    def __init__(self, code: str, details: str) -> None:
        super().__init__(f"{code}: {details}" if details else code)
        self.code = code
        self.details = details


class MalformedPacket(ProxyError):
    """A packet that cannot be interpreted at all; the stream it arrived on is ended."""


class DialFailure(enum.StrEnum):
    """Why a dial failed. Values are the reference's `dial_failure_count{reason}` labels,
    plus our own `agent_lost` and `overflow`."""

    NO_AGENT = "no_agent"
    ERROR_RESPONSE = "error_response"
    UNRECOGNIZED_RESPONSE = "unrecognized_response"
    SEND_RSP = "send_rsp"
    BACKEND_CLOSE = "backend_close"
    BACKEND_DIAL_TIMEOUT = "backend_dial_timeout"
    FRONTEND_CLOSE = "frontend_close"
    AGENT_LOST = "agent_lost"
