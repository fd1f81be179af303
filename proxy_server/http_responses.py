"""What the HTTP-CONNECT frontend writes to its client, byte for byte as the reference does.

PURE: no sockets, no asyncio, no clocks, no logging. The shell (`http_connect.py`) parses
requests with h11 and asks this module what to answer; every answer here is raw bytes,
because the reference writes most of them by hand on a hijacked connection (unframed
bodies, no Date, no Content-Length) and kube-apiserver's CONNECT client is strict:

* success is exactly `HTTP/1.1 200 Connection Established\\r\\n\\r\\n`, nothing after it;
* a dial error is `<code> <reason>` chosen from the agent's error text by case-insensitive
  substring tests (first match wins), `Connection: close`, and the text as the body;
* the router's own failures keep the reference's special forms: no agent is a 500 without
  charset, an agent lost before answering is `Backend context error: context canceled`,
  the backend dial timeout is a 504;
* a request that is not CONNECT gets Go's `http.Error` 405 and the connection stays open;
* a request that cannot be parsed gets Go net/http's 400 (431 when the head is too large)
  with `Connection: close`; like net/http, an HTTP/1.1 CONNECT without Host is accepted.

The sources are konnectivity-protocol.md section 3 and tests/interop/client-http-connect.txt.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy_common.messages import CloseDial, CloseResponse, Data, DialResponse, Message
from proxy_server.router import AGENT_LOST_ERROR, DIAL_TIMEOUT_ERROR, NO_AGENT_ERROR

# Go's http.Server default MaxHeaderBytes (1 MiB) plus the 4096 bytes of slack it allows.
MAX_HEADER_BYTES = (1 << 20) + 4096
# Largest DATA made from one read of the client socket. The reference reads 32 KiB at a
# time; in Python the cost is per packet, and 256 KiB packets carry uploads about three
# times faster (53 -> 150 MiB/s in tests/integration/test_http_connect.py) while staying
# far below the 4 MiB gRPC message limit of Go agents, which relay any DATA size as is.
TUNNEL_READ_BYTES = 256 << 10
# Go discards at most this much of an unread request body before it gives up keep-alive.
MAX_DISCARDED_BODY_BYTES = 256 << 10

REASONS = {
    200: "OK",
    400: "Bad Request",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}

CONNECTION_ESTABLISHED = b"HTTP/1.1 200 Connection Established\r\n\r\n"
_PLAIN_UTF8 = b"Content-Type: text/plain; charset=utf-8\r\n"

# Dial-error text -> status, in the reference's order (konnectivity-protocol.md 3.3).
_STATUS_BY_SUBSTRING: tuple[tuple[tuple[str, ...], int], ...] = (
    (("i/o timeout", "deadline exceeded", "timeout"), 504),
    (("too many open files",), 503),
    (
        (
            "connection refused",
            "connection reset by peer",
            "broken pipe",
            "network is unreachable",
            "no route to host",
            "host is unreachable",
            "network is down",
            "no such host",
            "name resolution",
            "tls",
            "ssl",
            "certificate",
        ),
        502,
    ),
)
_DEFAULT_DIAL_ERROR_STATUS = 502

_METHOD_NOT_ALLOWED_BODY = b"this proxy only supports CONNECT passthrough\n"
# h11's words for an HTTP/1.1 request without Host (see connect_without_host).
MISSING_HOST_ERROR = "Missing mandatory Host: header"


def status_line(code: int) -> bytes:
    return f"HTTP/1.1 {code} {REASONS[code]}\r\n".encode()


def status_for_dial_error(error: str) -> int:
    """The status the reference answers for an agent's dial error text."""
    lowered = error.lower()
    for needles, code in _STATUS_BY_SUBSTRING:
        if any(needle in lowered for needle in needles):
            return code
    return _DEFAULT_DIAL_ERROR_STATUS


def dial_failed(error: str) -> bytes:
    """The whole answer to a CONNECT whose dial failed; the connection is closed after it."""
    if error == NO_AGENT_ERROR:
        return (
            status_line(500) + b"Content-Type: text/plain\r\n\r\n" + f"currently no tunnels available: {error}".encode()
        )
    if error == AGENT_LOST_ERROR:
        return status_line(502) + _PLAIN_UTF8 + b"\r\nBackend context error: context canceled\r\n"
    if error == DIAL_TIMEOUT_ERROR:
        return status_line(504) + _PLAIN_UTF8 + f"\r\nBackend dial timeout: {error}\r\n".encode()
    code = status_for_dial_error(error)
    return status_line(code) + b"Connection: close\r\n" + _PLAIN_UTF8 + b"\r\n" + error.encode()


def method_not_allowed(date: str, *, connection_close: bool = False) -> bytes:
    """Go's `http.Error(w, ..., 405)` as net/http frames it; `date` is an RFC 1123 GMT date."""
    return (
        status_line(405)
        + _PLAIN_UTF8
        + b"X-Content-Type-Options: nosniff\r\n"
        + (b"Connection: close\r\n" if connection_close else b"")
        + f"Date: {date}\r\nContent-Length: {len(_METHOD_NOT_ALLOWED_BODY)}\r\n\r\n".encode()
        + _METHOD_NOT_ALLOWED_BODY
    )


def unreadable_request(code: int = 400, parse_error: str = "") -> bytes:
    """Go net/http's answer to a request it cannot read (400, or 431 for an oversized head).

    For the errors Go names to the client (here: a non-CONNECT HTTP/1.1 request without
    Host) the reason is appended to the status line and the body, as net/http does."""
    public = f"{code} {REASONS[code]}".encode()
    if code == 400 and parse_error == MISSING_HOST_ERROR:
        public += b": missing required Host header"
    return b"HTTP/1.1 " + public + b"\r\n" + _PLAIN_UTF8 + b"Connection: close\r\n\r\n" + public


def keeps_alive(http_version: bytes, connection_header: list[bytes]) -> bool:
    """Whether the client expects the connection to stay open after the answer."""
    tokens = {token.strip().lower() for value in connection_header for token in value.split(b",")}
    if http_version == b"1.0":
        return b"keep-alive" in tokens
    return b"close" not in tokens


def dial_target(method: bytes, target: bytes) -> str | None:
    """The dial address for a CONNECT request (its authority-form target), else None.

    The reference dials exactly what the client named, without validation: a target
    without a port reaches the agent, which answers with Go's `missing port` error.
    """
    if method != b"CONNECT":
        return None
    return target.decode("ascii", "replace")


def connect_without_host(head: bytes, parse_error: str) -> bytes | None:
    """The raw request `head` with `Host: <target>` added, when it is a CONNECT that a
    parser refused only for lacking Host; else None.

    Go's net/http requires Host on HTTP/1.1 requests except CONNECT, and the reference
    ignores Host anyway, so such a CONNECT is served; h11 has no switch for that exception.
    """
    if parse_error != MISSING_HOST_ERROR or not head.startswith(b"CONNECT "):
        return None
    line_end = head.find(b"\n")
    parts = head[:line_end].split()
    if line_end < 0 or len(parts) != 3:
        return None
    return head[: line_end + 1] + b"Host: " + parts[1] + b"\r\n" + head[line_end + 1 :]


@dataclass(frozen=True, slots=True)
class Reply:
    """What to do with one message the router sent to an HTTP-CONNECT frontend."""

    data: bytes | memoryview = b""  # written to the client socket, in order
    opened_conn_id: int = 0  # non-zero: the tunnel is open, client bytes may flow
    then_close: bool = False  # the tunnel is over once `data` is written


def reply_to(message: Message) -> Reply:
    """Turn a message for this frontend into bytes for the client and what follows."""
    match message:
        case Data(data=data):
            return Reply(data)
        case DialResponse(conn_id=conn_id, error="") if conn_id:
            return Reply(CONNECTION_ESTABLISHED, opened_conn_id=conn_id)
        case DialResponse(error=error):
            return Reply(dial_failed(error), then_close=True)
        case CloseResponse() | CloseDial():
            return Reply(then_close=True)
        case _:
            return Reply()
