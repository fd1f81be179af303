"""Random interleavings of dials, data, closes and losses keep the router consistent."""

from __future__ import annotations

import random

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from proxy_common.identifiers import AgentIdentifiers
from proxy_common.messages import CloseDial, CloseRequest, CloseResponse, Data, DialRequest, DialResponse, Drain
from proxy_server.backends import BackendRegistry
from proxy_server.router import Router, SendToAgent, SendToFrontend

AGENTS = (1, 2)


class RouterMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.router = Router(BackendRegistry(("default",), rng=random.Random(0)))
        self.live_agents: set[int] = set()
        self.live_frontends: set[int] = set()
        self.next_frontend = 1000
        self.dials: dict[int, tuple[int, int]] = {}  # dial_id -> (frontend, agent it went to)
        self.next_conn = dict.fromkeys(AGENTS, 1)

    def _apply(self, actions: list) -> None:
        for action in actions:
            if isinstance(action, SendToFrontend):
                assert action.frontend_id in self.live_frontends, f"sent to a gone frontend: {action}"
            if isinstance(action, SendToAgent):
                assert action.backend_id in self.live_agents, f"sent to a gone agent: {action}"
                if isinstance(action.message, DialRequest):
                    frontend = next(f for f in self.live_frontends if self.router._frontends[f].dial_id == action.message.dial_id)
                    self.dials[action.message.dial_id] = (frontend, action.backend_id)

    @rule(agent=st.sampled_from(AGENTS))
    def agent_connects(self, agent: int) -> None:
        if agent not in self.live_agents:
            self.router.agent_connected(agent, f"agent-{agent}", AgentIdentifiers())
            self.live_agents.add(agent)

    @rule(agent=st.sampled_from(AGENTS))
    def agent_goes(self, agent: int) -> None:
        if agent in self.live_agents:
            self._apply(self.router.agent_lost(agent))
            self.live_agents.discard(agent)

    @rule(dial_id=st.integers(1, 30))
    def frontend_dials(self, dial_id: int) -> None:
        fid = self.next_frontend
        self.next_frontend += 1
        self.router.frontend_opened(fid)
        self.live_frontends.add(fid)
        self._apply(self.router.from_frontend(fid, DialRequest(dial_id, "h:1")))

    @precondition(lambda self: self.live_frontends)
    @rule(data=st.data())
    def frontend_goes(self, data: st.DataObject) -> None:
        fid = data.draw(st.sampled_from(sorted(self.live_frontends)))
        self.live_frontends.discard(fid)
        self._apply(self.router.frontend_lost(fid))

    @precondition(lambda self: self.dials)
    @rule(data=st.data(), ok=st.booleans())
    def agent_answers(self, data: st.DataObject, ok: bool) -> None:
        dial_id = data.draw(st.sampled_from(sorted(self.dials)))
        _, agent = self.dials.pop(dial_id)
        if agent not in self.live_agents:
            return
        conn_id = self.next_conn[agent]
        self.next_conn[agent] += 1
        answer = DialResponse(dial_id, conn_id=conn_id) if ok else DialResponse(dial_id, error="refused")
        self._apply(self.router.from_agent(agent, answer))

    @precondition(lambda self: self.live_agents)
    @rule(data=st.data(), kind=st.sampled_from(["data", "close", "dial_cls", "drain"]), conn_id=st.integers(0, 8))
    def agent_sends(self, data: st.DataObject, kind: str, conn_id: int) -> None:
        agent = data.draw(st.sampled_from(sorted(self.live_agents)))
        message = {"data": Data(conn_id, b"x"), "close": CloseResponse(conn_id), "dial_cls": CloseDial(conn_id), "drain": Drain()}[kind]
        self._apply(self.router.from_agent(agent, message))

    @precondition(lambda self: self.live_frontends)
    @rule(data=st.data(), kind=st.sampled_from(["data", "close", "dial_cls"]), conn_id=st.integers(0, 8))
    def frontend_sends(self, data: st.DataObject, kind: str, conn_id: int) -> None:
        fid = data.draw(st.sampled_from(sorted(self.live_frontends)))
        message = {"data": Data(conn_id, b"x"), "close": CloseRequest(conn_id), "dial_cls": CloseDial(conn_id)}[kind]
        self._apply(self.router.from_frontend(fid, message))

    @invariant()
    def tables_point_at_live_parties(self) -> None:
        for fid, bid, _ in self.router.connections():
            assert fid in self.live_frontends
            assert bid in self.live_agents
        for fid, bid in self.router._pending.values():
            assert fid in self.live_frontends and bid in self.live_agents

    def teardown(self) -> None:
        for fid in sorted(self.live_frontends):
            self.router.frontend_lost(fid)
        for agent in sorted(self.live_agents):
            self.router.agent_lost(agent)
        assert self.router.is_empty()


TestRouterMachine = RouterMachine.TestCase
TestRouterMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
