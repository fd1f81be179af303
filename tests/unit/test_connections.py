"""The agent's connection table, driven without sockets or an event loop."""

from __future__ import annotations

from proxy_agent.connections import (
    CancelDial,
    CloseEndpoint,
    ConnectionTable,
    ConnState,
    Discard,
    Send,
    StartDial,
    WriteEndpoint,
)
from proxy_common.messages import CloseDial, CloseRequest, CloseResponse, Data, DialRequest, DialResponse, Drain


def open_conn(table: ConnectionTable, dial_id: int = 7) -> int:
    (start,) = table.receive(DialRequest(dial_id, "127.0.0.1:80"))
    assert isinstance(start, StartDial)
    table.dial_succeeded(start.conn_id)
    return start.conn_id


def test_conn_ids_start_at_one_and_failed_dials_use_them_up() -> None:
    table = ConnectionTable()
    first = table.receive(DialRequest(1, "h:1"))
    second = table.receive(DialRequest(2, "h:2"))
    assert first == [StartDial(1, 1, "h:1", "tcp")]
    assert second == [StartDial(2, 2, "h:2", "tcp")]
    assert table.dial_failed(1, "dial tcp h:1: connect: connection refused") == [
        Send(DialResponse(1, error="dial tcp h:1: connect: connection refused"))
    ]
    assert table.dial_succeeded(2) == [Send(DialResponse(2, conn_id=2))]
    assert table.receive(DialRequest(3, "h:3")) == [StartDial(3, 3, "h:3", "tcp")]


def test_data_for_unknown_connection_is_answered_not_raised() -> None:
    table = ConnectionTable()
    assert table.receive(Data(42, b"x")) == [Send(CloseResponse(42, "unrecognized connectID"))]
    assert table.receive(CloseRequest(42)) == [Send(CloseResponse(42, "Unknown connectID"))]
    assert len(table) == 0


def test_data_with_conn_id_zero_and_server_only_packets_are_ignored() -> None:
    table = ConnectionTable()
    assert isinstance(table.receive(Data(0, b"x"))[0], Discard)
    for message in (DialResponse(1, conn_id=1), CloseResponse(1), Drain()):
        assert isinstance(table.receive(message)[0], Discard)
    assert isinstance(table.receive(CloseDial(99))[0], Discard)


def test_open_connection_writes_and_closes_once() -> None:
    table = ConnectionTable()
    conn_id = open_conn(table)
    assert table.receive(Data(conn_id, b"abc")) == [WriteEndpoint(conn_id, b"abc")]
    assert table.receive(CloseRequest(conn_id)) == [CloseEndpoint(conn_id)]
    assert table.endpoint_closed(conn_id) == [Send(CloseResponse(conn_id))]
    assert table.endpoint_closed(conn_id) == []
    assert len(table) == 0


def test_dial_close_cancels_a_dial_in_progress() -> None:
    table = ConnectionTable()
    (start,) = table.receive(DialRequest(7, "h:1"))
    assert table.receive(CloseDial(7)) == [CancelDial(start.conn_id)]  # type: ignore[union-attr]
    assert table.dial_succeeded(start.conn_id) == [CloseEndpoint(start.conn_id)]  # type: ignore[union-attr]
    assert len(table) == 0


def test_tunnel_loss_empties_the_table() -> None:
    table = ConnectionTable()
    conn_id = open_conn(table)
    (dialing,) = table.receive(DialRequest(8, "h:1"))
    actions = table.tunnel_lost()
    assert CloseEndpoint(conn_id) in actions and CancelDial(dialing.conn_id) in actions  # type: ignore[union-attr]
    assert len(table) == 0


def test_overflow_closes_only_that_connection() -> None:
    table = ConnectionTable()
    one, two = open_conn(table, 1), open_conn(table, 2)
    assert table.inbox_overflowed(one) == [CloseEndpoint(one)]
    assert table.state(two) is ConnState.OPEN
