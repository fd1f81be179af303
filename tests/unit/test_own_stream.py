"""Own streams on demand in the pure cores: the switch marker on the wire, the agent's
connection table and the server's router, driven without sockets or an event loop."""

from __future__ import annotations

import random

import pytest

from proxy_agent import cli as agent_cli
from proxy_agent.connections import (
    CloseEndpoint,
    ConnectionTable,
    ConnState,
    Discard,
    Send,
    SendOwn,
    StartDial,
    SwitchDown,
    WriteEndpoint,
)
from proxy_common import wire
from proxy_common.identifiers import AgentIdentifiers
from proxy_common.messages import (
    OWN_STREAM_MARK,
    CloseRequest,
    CloseResponse,
    Data,
    DialRequest,
    DialResponse,
    OwnStream,
)
from proxy_common.pb import client_pb2 as pb
from proxy_server import router as r
from proxy_server.backends import BackendRegistry

A = 101
FE = 1


# ------------------------------------------------------------------------------- wire
def test_marker_travels_as_an_empty_data_packet_with_the_reserved_text() -> None:
    raw = wire.encode(OwnStream(7))
    packet = pb.Packet.FromString(raw)
    assert (packet.type, packet.data.connectID, packet.data.data, packet.data.error) == (pb.DATA, 7, b"", OWN_STREAM_MARK)
    assert wire.decode(raw) == OwnStream(7)


def test_data_with_another_error_or_with_payload_stays_data() -> None:
    for message in (Data(7, b"", "some error"), Data(7, b"x", OWN_STREAM_MARK), Data(7, b"payload")):
        assert wire.decode(wire.encode(message)) == message


# ------------------------------------------------------------------------- agent table
def open_conn(table: ConnectionTable, dial_id: int = 7) -> int:
    (start,) = table.receive(DialRequest(dial_id, "127.0.0.1:80"))
    assert isinstance(start, StartDial)
    table.dial_succeeded(start.conn_id)
    return start.conn_id


def test_switch_sends_the_marker_then_closes_on_the_own_stream() -> None:
    table = ConnectionTable()
    conn = open_conn(table)
    assert not table.on_own_stream(conn)
    assert table.own_stream_started(conn) == [Send(OwnStream(conn))]
    assert table.state(conn) is ConnState.SWITCHING and table.on_own_stream(conn)
    assert table.own_stream_started(conn) == []  # only once
    # What the shared stream still brings before the server's marker goes to the endpoint.
    assert table.receive(Data(conn, b"late")) == [WriteEndpoint(conn, b"late")]
    assert table.receive(OwnStream(conn)) == [SwitchDown(conn)]
    assert table.state(conn) is ConnState.OWN
    assert table.receive(Data(conn, b"own")) == [WriteEndpoint(conn, b"own")]
    assert table.open_conn_ids() == [conn]
    assert table.endpoint_closed(conn) == [SendOwn(CloseResponse(conn))]
    assert len(table) == 0


def test_close_request_during_the_switch_closes_the_endpoint() -> None:
    table = ConnectionTable()
    conn = open_conn(table)
    table.own_stream_started(conn)
    assert table.receive(CloseRequest(conn)) == [CloseEndpoint(conn)]
    assert table.endpoint_closed(conn) == [SendOwn(CloseResponse(conn))]


def test_marker_for_a_connection_not_switching_is_ignored() -> None:
    table = ConnectionTable()
    conn = open_conn(table)
    (action,) = table.receive(OwnStream(conn))
    assert isinstance(action, Discard)
    assert table.state(conn) is ConnState.OPEN
    (action,) = table.receive(OwnStream(99))
    assert isinstance(action, Discard)


def test_dialing_or_closed_connections_do_not_switch_and_tunnel_loss_closes_switching_ones() -> None:
    table = ConnectionTable()
    (start,) = table.receive(DialRequest(1, "h:1"))
    assert isinstance(start, StartDial)
    assert table.own_stream_started(start.conn_id) == []  # still dialing
    conn = open_conn(table, dial_id=2)
    table.own_stream_started(conn)
    lost = table.tunnel_lost()
    assert CloseEndpoint(conn) in lost and len(lost) == 2  # the dial is cancelled, the switching one closed
    assert len(table) == 0
    assert table.own_stream_started(conn) == []


# ------------------------------------------------------------------------------ router
def make_router() -> r.Router:
    router = r.Router(BackendRegistry(("default",), rng=random.Random(7)))
    router.agent_connected(A, "agent", AgentIdentifiers())
    return router


def establish(router: r.Router, conn_id: int = 5) -> None:
    router.frontend_opened(FE)
    router.from_frontend(FE, DialRequest(9, "10.0.0.5:10250"))
    router.from_agent(A, DialResponse(9, conn_id=conn_id))


def test_agent_marker_opens_the_link_then_answers_on_the_shared_stream() -> None:
    router = make_router()
    establish(router)
    assert router.from_agent(A, OwnStream(5)) == [r.OpenOwnLink(A, 5), r.SendToAgent(A, OwnStream(5))]
    # The connection itself is unchanged: data and close flow as before.
    assert router.from_agent(A, Data(5, b"x")) == [r.SendToFrontend(FE, Data(5, b"x"))]
    assert router.from_agent(A, CloseResponse(5))[0] == r.SendToFrontend(FE, CloseResponse(5))
    router.frontend_lost(FE)
    assert router.is_empty()


def test_marker_for_a_closing_connection_still_switches_so_its_close_response_arrives() -> None:
    router = make_router()
    establish(router)
    router.frontend_lost(FE)  # CLOSE_REQ went on the shared stream; waiting for CLOSE_RSP
    assert router.from_agent(A, OwnStream(5)) == [r.OpenOwnLink(A, 5), r.SendToAgent(A, OwnStream(5))]
    assert router.from_agent(A, CloseResponse(5)) == []
    assert router.is_empty()


def test_marker_for_an_unknown_connection_asks_the_agent_to_close_it() -> None:
    router = make_router()
    actions = router.from_agent(A, OwnStream(8))
    assert actions[1:] == [r.SendToAgent(A, CloseRequest(8))]
    assert isinstance(actions[0], r.Discard)
    assert router.is_empty()


def test_own_stream_that_never_comes_closes_the_connection_both_ways() -> None:
    router = make_router()
    establish(router)
    router.from_agent(A, OwnStream(5))
    assert router.own_stream_missing(A, 5) == [
        r.SendToFrontend(FE, CloseResponse(5)),
        r.ConnectionClosed(A, 5, "stream_lost"),
        r.EndFrontend(FE),
        r.SendToAgent(A, CloseRequest(5)),
    ]
    assert router.own_stream_missing(A, 5) == []
    assert router.backend_load(A) == (0, 0)
    router.frontend_lost(FE)
    assert router.is_empty()


# ------------------------------------------------------------------------------- flag
def test_flow_upgrade_bytes_flag_parses_and_is_bounded(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    ca = tmp_path / "ca"
    ca.write_text("x")
    assert agent_cli.parse([f"--ca-cert={ca}"])[0].flow_upgrade_bytes == 64 << 10
    assert agent_cli.parse([f"--ca-cert={ca}", "--flow-upgrade-bytes=0"])[0].flow_upgrade_bytes == 0
    for bad in ("-1", str(8 << 20)):
        with pytest.raises(SystemExit):
            agent_cli.parse([f"--ca-cert={ca}", f"--flow-upgrade-bytes={bad}"])
        assert "--flow-upgrade-bytes must be between 0 and --endpoint-buffer-bytes" in capsys.readouterr().err
