"""HTTP-CONNECT answers, byte for byte against the Go server's recording; no loop, no sockets."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from proxy_common.messages import CloseDial, CloseRequest, CloseResponse, Data, DialResponse, Drain
from proxy_server import http_responses as answers
from proxy_server.router import AGENT_LOST_ERROR, DIAL_TIMEOUT_ERROR, DUPLICATE_DIAL_ERROR, NO_AGENT_ERROR
from tests.http_connect_client import recorded

ROOT = Path(__file__).resolve().parents[2]
IO_MODULES = {
    "asyncio",
    "socket",
    "ssl",
    "time",
    "logging",
    "grpc",
    "threading",
    "prometheus_client",
    "h11",
    "kubernetes",
    "email",
    "selectors",
}


def test_module_is_pure() -> None:
    tree = ast.parse((ROOT / "proxy_server" / "http_responses.py").read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            roots.add(node.module.split(".")[0])
    assert not roots & IO_MODULES


# ------------------------------------------------------------ recorded answers
def test_success_is_the_recorded_status_line_and_nothing_else() -> None:
    assert recorded("Success") == answers.CONNECTION_ESTABLISHED


def test_no_agent_is_the_recorded_500() -> None:
    assert answers.dial_failed(NO_AGENT_ERROR) == recorded("No agent connected")


def test_refused_dial_is_the_recorded_502() -> None:
    assert answers.dial_failed("dial tcp 127.0.0.1:18399: connect: connection refused") == recorded(
        "Dial to a closed port"
    )


def test_missing_port_is_the_recorded_502() -> None:
    assert answers.dial_failed("dial tcp: address 127.0.0.1: missing port in address") == recorded(
        "Target without a port"
    )


def test_method_not_allowed_is_the_recorded_405() -> None:
    assert answers.method_not_allowed("Sun, 22 Nov 2026 04:17:45 GMT") == recorded("Not a CONNECT request")


def test_method_not_allowed_with_close_puts_connection_before_date() -> None:
    raw = answers.method_not_allowed("Sun, 22 Nov 2026 04:17:45 GMT", connection_close=True)
    assert b"nosniff\r\nConnection: close\r\nDate: " in raw
    head, body = raw.split(b"\r\n\r\n", 1)
    assert int(re.search(rb"Content-Length: (\d+)", head).group(1)) == len(body)  # type: ignore[union-attr]


# ---------------------------------------------------- the reference's own forms
def test_agent_lost_before_answering_is_backend_context_canceled() -> None:
    assert answers.dial_failed(AGENT_LOST_ERROR) == (
        b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
        b"Backend context error: context canceled\r\n"
    )


def test_backend_dial_timeout_is_504() -> None:
    assert answers.dial_failed(DIAL_TIMEOUT_ERROR) == (
        b"HTTP/1.1 504 Gateway Timeout\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
        b"Backend dial timeout: timed out waiting for backend dial\r\n"
    )


def test_other_router_errors_use_the_generic_form() -> None:
    raw = answers.dial_failed(DUPLICATE_DIAL_ERROR)
    assert raw == (
        b"HTTP/1.1 502 Bad Gateway\r\nConnection: close\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
        + DUPLICATE_DIAL_ERROR.encode()
    )


def test_unreadable_request_is_go_net_http_400() -> None:
    assert answers.unreadable_request() == (
        b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n\r\n"
        b"400 Bad Request"
    )


def test_oversized_head_is_go_net_http_431() -> None:
    assert answers.unreadable_request(431) == (
        b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Connection: close\r\n\r\n431 Request Header Fields Too Large"
    )


def test_get_without_host_is_go_net_http_400_with_its_reason() -> None:
    assert answers.unreadable_request(400, answers.MISSING_HOST_ERROR) == (
        b"HTTP/1.1 400 Bad Request: missing required Host header\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Connection: close\r\n\r\n400 Bad Request: missing required Host header"
    )
    assert answers.unreadable_request(400, "some other parse error") == answers.unreadable_request(400)


def test_connect_without_host_gets_the_target_as_host() -> None:
    head = b"CONNECT 10.0.0.5:10250 HTTP/1.1\r\nUser-Agent: x\r\n\r\nearly bytes"
    assert answers.connect_without_host(head, answers.MISSING_HOST_ERROR) == (
        b"CONNECT 10.0.0.5:10250 HTTP/1.1\r\nHost: 10.0.0.5:10250\r\nUser-Agent: x\r\n\r\nearly bytes"
    )
    bare_lf = b"CONNECT [::1]:80 HTTP/1.1\n\n"
    assert answers.connect_without_host(bare_lf, answers.MISSING_HOST_ERROR) == (
        b"CONNECT [::1]:80 HTTP/1.1\nHost: [::1]:80\r\n\n"
    )


@pytest.mark.parametrize(
    ("head", "error"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", answers.MISSING_HOST_ERROR),  # Go requires Host except on CONNECT
        (b"CONNECT a:1 HTTP/1.1\r\n\r\n", "illegal request line"),  # another parse error
        (b"CONNECT a:1 b HTTP/1.1\r\n\r\n", answers.MISSING_HOST_ERROR),  # not a request line
        (b"CONNECT a:1 HTTP/1.1", answers.MISSING_HOST_ERROR),  # no line end
    ],
)
def test_only_a_connect_missing_host_is_patched(head: bytes, error: str) -> None:
    assert answers.connect_without_host(head, error) is None


# ------------------------------------------------------------- status mapping
# (agent error text, status the reference answers); the 3.3 table of konnectivity-protocol.md.
DIAL_ERROR_STATUS = [
    ("dial tcp 10.0.0.1:80: i/o timeout", 504),
    ("context deadline exceeded", 504),
    ("dial tcp 10.0.0.1:80: connect: connection timed out", 502),  # "timed out" is not "timeout"
    ("TIMEOUT in capitals", 504),
    ("dial tcp 127.0.0.1:80: socket: too many open files", 503),
    ("dial tcp 127.0.0.1:1: connect: connection refused", 502),
    ("read: connection reset by peer", 502),
    ("write: broken pipe", 502),
    ("dial tcp 10.0.0.1:80: connect: network is unreachable", 502),
    ("dial tcp 10.0.0.1:80: connect: no route to host", 502),
    ("dial tcp: lookup nonexist.invalid: no such host", 502),
    ("tls: handshake failure", 502),
    ("x509: certificate signed by unknown authority", 502),
    ("something nobody expected", 502),
    ("", 502),
    # First match wins: a timeout that also mentions a refused connection is a timeout.
    ("connection refused after timeout", 504),
    ("too many open files while resolving: no such host", 503),
]


def test_status_for_dial_error() -> None:
    for error, status in DIAL_ERROR_STATUS:
        assert answers.status_for_dial_error(error) == status, error
        head = f"HTTP/1.1 {status} {answers.REASONS[status]}\r\n".encode()
        assert answers.dial_failed(error).startswith(head), error


def test_dial_error_body_is_the_agent_text_verbatim() -> None:
    text = "dial tcp [fd00::5]:443: connect: no route to host"
    assert answers.dial_failed(text).endswith(b"\r\n\r\n" + text.encode())


# ------------------------------------------------------------ request helpers
def test_keeps_alive() -> None:
    cases = [
        (b"1.1", [], True),
        (b"1.1", [b"close"], False),
        (b"1.1", [b"Keep-Alive, Close"], False),
        (b"1.1", [b"keep-alive"], True),
        (b"1.0", [], False),
        (b"1.0", [b"keep-alive"], True),
        (b"1.0", [b"upgrade", b" Keep-Alive "], True),
    ]
    for version, connection, keep in cases:
        assert answers.keeps_alive(version, connection) is keep, (version, connection)


def test_dial_target_is_the_connect_authority_unvalidated() -> None:
    assert answers.dial_target(b"CONNECT", b"127.0.0.1:18400") == "127.0.0.1:18400"
    assert answers.dial_target(b"CONNECT", b"127.0.0.1") == "127.0.0.1"
    assert answers.dial_target(b"CONNECT", b"[fd00::5]:443") == "[fd00::5]:443"
    assert answers.dial_target(b"GET", b"/x") is None
    assert answers.dial_target(b"connect", b"127.0.0.1:1") is None  # methods are case-sensitive


# ------------------------------------------------------------------- reply_to
def test_successful_dial_opens_the_tunnel() -> None:
    reply = answers.reply_to(DialResponse(dial_id=7, conn_id=3))
    assert reply == answers.Reply(answers.CONNECTION_ESTABLISHED, opened_conn_id=3)


def test_failed_dial_answers_and_closes() -> None:
    reply = answers.reply_to(DialResponse(dial_id=7, error=NO_AGENT_ERROR))
    assert reply == answers.Reply(recorded("No agent connected"), then_close=True)


def test_dial_response_without_conn_id_is_a_failure() -> None:
    reply = answers.reply_to(DialResponse(dial_id=7))
    assert reply.then_close and not reply.opened_conn_id
    assert reply.data.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")


def test_data_is_written_raw() -> None:
    assert answers.reply_to(Data(3, b"\x00raw\xff")) == answers.Reply(b"\x00raw\xff")


@pytest.mark.parametrize("message", [CloseResponse(3), CloseResponse(3, "Unknown connectID"), CloseDial(7)])
def test_close_ends_the_tunnel_without_bytes(message: CloseResponse | CloseDial) -> None:
    assert answers.reply_to(message) == answers.Reply(then_close=True)


@pytest.mark.parametrize("message", [CloseRequest(3), Drain()])
def test_messages_a_frontend_never_gets_are_ignored(message: CloseRequest | Drain) -> None:
    assert answers.reply_to(message) == answers.Reply()
