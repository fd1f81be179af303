"""The server's routing table, driven without sockets or an event loop."""

from __future__ import annotations

import random

from proxy_common.errors import DialFailure
from proxy_common.identifiers import AgentIdentifiers
from proxy_common.messages import CloseDial, CloseRequest, CloseResponse, Data, DialRequest, DialResponse, Drain
from proxy_server.backends import BackendRegistry
from proxy_server.router import (
    AGENT_LOST_ERROR,
    NO_AGENT_ERROR,
    ConnectionClosed,
    DialEstablished,
    DialFailed,
    DialForwarded,
    Discard,
    EndFrontend,
    Router,
    SendToAgent,
    SendToFrontend,
)

A, B = 101, 102  # backend ids
FE1, FE2 = 1, 2


def make_router(*backends: int) -> Router:
    router = Router(BackendRegistry(("default",), rng=random.Random(7)))
    for backend_id in backends:
        router.agent_connected(backend_id, f"agent-{backend_id}", AgentIdentifiers())
    return router


def established(router: Router, fe: int, dial_id: int, conn_id: int, backend: int = A) -> None:
    router.frontend_opened(fe)
    router.from_frontend(fe, DialRequest(dial_id, "10.0.0.5:10250"))
    router.from_agent(backend, DialResponse(dial_id, conn_id=conn_id))


def test_dial_without_agent_answers_the_reference_error_and_ends_the_frontend() -> None:
    router = make_router()
    router.frontend_opened(FE1)
    actions = router.from_frontend(FE1, DialRequest(7, "10.0.0.5:10250"))
    assert actions == [
        SendToFrontend(FE1, DialResponse(7, error=NO_AGENT_ERROR)),
        DialFailed(7, DialFailure.NO_AGENT),
        EndFrontend(FE1),
    ]
    router.frontend_lost(FE1)
    assert router.is_empty()


def test_dial_is_forwarded_unchanged_and_success_is_relayed() -> None:
    router = make_router(A)
    router.frontend_opened(FE1)
    request = DialRequest(7, "10.0.0.5:10250")
    assert router.from_frontend(FE1, request) == [SendToAgent(A, request), DialForwarded(7, A)]
    assert router.pending_count == 1
    response = DialResponse(7, conn_id=3)
    assert router.from_agent(A, response) == [SendToFrontend(FE1, response), DialEstablished(7, A, 3)]
    assert (router.pending_count, router.established_count) == (0, 1)


def test_data_flows_both_ways_between_the_pair() -> None:
    router = make_router(A)
    established(router, FE1, 7, 3)
    assert router.from_frontend(FE1, Data(3, b"up")) == [SendToAgent(A, Data(3, b"up"))]
    assert router.from_agent(A, Data(3, b"down")) == [SendToFrontend(FE1, Data(3, b"down"))]


def test_close_request_then_close_response_ends_everything() -> None:
    router = make_router(A)
    established(router, FE1, 7, 3)
    assert router.from_frontend(FE1, CloseRequest(3)) == [SendToAgent(A, CloseRequest(3))]
    assert router.from_frontend(FE1, Data(3, b"late")) == []  # stopped after CLOSE_REQ
    actions = router.from_agent(A, CloseResponse(3))
    assert actions == [SendToFrontend(FE1, CloseResponse(3)), ConnectionClosed(A, 3, "agent_closed"), EndFrontend(FE1)]
    router.frontend_lost(FE1)
    assert router.is_empty()


def test_data_and_close_before_any_dial_get_the_reference_answers() -> None:
    router = make_router(A)
    router.frontend_opened(FE1)
    assert router.from_frontend(FE1, CloseRequest(5)) == [
        SendToFrontend(FE1, CloseResponse(5, "backend uninitialized"))
    ]
    assert router.from_frontend(FE1, Data(5, b"x")) == [SendToFrontend(FE1, CloseResponse(5, "backend not initialized"))]


def test_data_with_conn_id_zero_is_ignored() -> None:
    router = make_router(A)
    established(router, FE1, 7, 3)
    assert router.from_frontend(FE1, Data(0, b"x")) == []


def test_mismatched_conn_ids_close_both() -> None:
    router = make_router(A)
    established(router, FE1, 7, 3)
    actions = router.from_frontend(FE1, Data(9, b"x"))
    assert SendToAgent(A, CloseRequest(3)) in actions
    assert SendToAgent(A, CloseRequest(9)) in actions
    assert SendToFrontend(FE1, CloseResponse(3, "mismatched connection IDs")) in actions
    assert SendToFrontend(FE1, CloseResponse(9, "mismatched connection IDs")) in actions


def test_frontend_dial_close_drops_pending_and_late_answer_is_closed_at_the_agent() -> None:
    router = make_router(A)
    router.frontend_opened(FE1)
    router.from_frontend(FE1, DialRequest(7, "h:1"))
    actions = router.from_frontend(FE1, CloseDial(7))
    assert actions == [SendToAgent(A, CloseDial(7)), DialFailed(7, DialFailure.FRONTEND_CLOSE), EndFrontend(FE1)]
    late = router.from_agent(A, DialResponse(7, conn_id=4))
    assert late == [DialFailed(7, DialFailure.UNRECOGNIZED_RESPONSE), SendToAgent(A, CloseRequest(4))]
    router.frontend_lost(FE1)
    assert not router.is_empty()  # waiting for the agent's CLOSE_RSP
    assert router.from_agent(A, CloseResponse(4)) == []
    assert router.is_empty()


def test_frontend_loss_abandons_its_dial_and_closes_its_connection() -> None:
    router = make_router(A)
    router.frontend_opened(FE1)
    router.from_frontend(FE1, DialRequest(7, "h:1"))
    assert router.frontend_lost(FE1) == [SendToAgent(A, CloseDial(7)), DialFailed(7, DialFailure.FRONTEND_CLOSE)]
    established(router, FE2, 8, 3)
    assert router.frontend_lost(FE2) == [SendToAgent(A, CloseRequest(3)), ConnectionClosed(A, 3, "frontend_lost")]
    # DATA still in flight for the closed connection is dropped quietly, not answered again.
    assert router.from_agent(A, Data(3, b"in flight")) == [Discard(Data(3, b"in flight"), "connection closing or id 0")]
    router.from_agent(A, CloseResponse(3))
    assert router.is_empty()


def test_agent_loss_fails_pending_dials_at_once_and_closes_connections() -> None:
    router = make_router(A, B)
    router.registry.mark_draining(B)  # make sure A gets both dials
    established(router, FE1, 7, 3)
    router.frontend_opened(FE2)
    router.from_frontend(FE2, DialRequest(8, "h:1"))
    actions = router.agent_lost(A)
    assert SendToFrontend(FE1, CloseResponse(3)) in actions
    assert SendToFrontend(FE2, DialResponse(8, error=AGENT_LOST_ERROR)) in actions
    assert DialFailed(8, DialFailure.AGENT_LOST) in actions
    assert EndFrontend(FE1) in actions and EndFrontend(FE2) in actions
    router.frontend_lost(FE1)
    router.frontend_lost(FE2)
    assert router.is_empty()
    assert A not in router.registry


def test_unknown_data_from_agent_gets_one_close_request() -> None:
    router = make_router(A)
    assert router.from_agent(A, Data(5, b"x")) == [SendToAgent(A, CloseRequest(5))]
    assert router.from_agent(A, Data(5, b"y")) == [Discard(Data(5, b"y"), "connection closing or id 0")]
    router.from_agent(A, CloseResponse(5, "unrecognized connectID"))
    assert router.is_empty()


def test_agent_dial_close_is_forwarded() -> None:
    router = make_router(A)
    router.frontend_opened(FE1)
    router.from_frontend(FE1, DialRequest(7, "h:1"))
    assert router.from_agent(A, CloseDial(7)) == [
        SendToFrontend(FE1, CloseDial(7)),
        DialFailed(7, DialFailure.BACKEND_CLOSE),
        EndFrontend(FE1),
    ]


def test_agent_error_response_is_relayed_and_counted() -> None:
    router = make_router(A)
    router.frontend_opened(FE1)
    router.from_frontend(FE1, DialRequest(7, "h:1"))
    refused = DialResponse(7, error="dial tcp 127.0.0.1:1: connect: connection refused")
    assert router.from_agent(A, refused) == [
        SendToFrontend(FE1, refused),
        DialFailed(7, DialFailure.ERROR_RESPONSE),
        EndFrontend(FE1),
    ]


def test_responses_from_another_agent_are_not_trusted() -> None:
    router = make_router(A, B)
    router.registry.mark_draining(B)
    router.frontend_opened(FE1)
    router.from_frontend(FE1, DialRequest(7, "h:1"))  # goes to A
    assert router.from_agent(B, DialResponse(7, conn_id=1))[0] == DialFailed(7, DialFailure.UNRECOGNIZED_RESPONSE)
    assert router.pending_count == 1


def test_same_conn_id_on_two_agent_streams_is_kept_apart() -> None:
    router = make_router(A, B)
    router.registry.mark_draining(B)
    established(router, FE1, 7, 1, backend=A)
    router.registry.mark_draining(A)
    router.registry.get(B).draining = False  # type: ignore[union-attr]
    established(router, FE2, 8, 1, backend=B)
    assert router.from_agent(A, Data(1, b"a")) == [SendToFrontend(FE1, Data(1, b"a"))]
    assert router.from_agent(B, Data(1, b"b")) == [SendToFrontend(FE2, Data(1, b"b"))]


def test_overflowed_frontend_closes_only_its_connection() -> None:
    router = make_router(A)
    established(router, FE1, 7, 3)
    established(router, FE2, 8, 4)
    actions = router.frontend_overflowed(FE1)
    assert SendToAgent(A, CloseRequest(3)) in actions
    assert EndFrontend(FE1) in actions
    assert router.from_agent(A, Data(4, b"ok")) == [SendToFrontend(FE2, Data(4, b"ok"))]


def test_dial_timeout_fails_the_pending_dial() -> None:
    router = make_router(A)
    router.frontend_opened(FE1)
    router.from_frontend(FE1, DialRequest(7, "h:1"))
    actions = router.dial_timed_out(7)
    assert SendToFrontend(FE1, DialResponse(7, error="timed out waiting for backend dial")) in actions
    assert DialFailed(7, DialFailure.BACKEND_DIAL_TIMEOUT) in actions
    assert router.dial_timed_out(7) == []


def test_drain_marks_the_agent_and_avoids_it_while_another_exists() -> None:
    router = make_router(A, B)
    assert router.from_agent(A, Drain()) == []
    for dial_id in range(20):
        router.frontend_opened(100 + dial_id)
        assert router.from_frontend(100 + dial_id, DialRequest(dial_id, "h:1"))[0].backend_id == B  # type: ignore[union-attr]


def test_second_dial_on_one_stream_is_refused() -> None:
    router = make_router(A)
    router.frontend_opened(FE1)
    router.from_frontend(FE1, DialRequest(7, "h:1"))
    assert router.from_frontend(FE1, DialRequest(8, "h:1")) == [
        SendToFrontend(FE1, DialResponse(8, error="only one dial per stream is supported"))
    ]
