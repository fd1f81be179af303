"""Agent token authentication end to end: our server, the real `kubernetes` client, a
TokenReview stand-in over HTTPS (tests/fakekube.py), real agents and raw Connect streams.

Every refusal is checked three ways: the status and message the agent receives (the
reference's, tests/interop/server-agent-auth.json), the server's registry (the stream never
became a backend) and a dial from a client (answered "No agent available", no endpoint
connection). The cache is proven by the stand-in's request count.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio
import pytest

from proxy_common.certs import DemoPki
from proxy_common.client import open_tunnel
from proxy_common.errors import ConfigError
from proxy_common.streams import CONNECT_METHOD
from proxy_server.auth import MAX_TOKEN_BYTES
from tests.fakekube import API_AUDIENCE, FakeKube
from tests.harness import Stack, assert_no_agent_gets_a_dial, echo_handler, endpoint, wait_for

pytestmark = pytest.mark.integration

AUDIENCE = "system:konnectivity-server"
NAMESPACE, ACCOUNT = "kube-system", "konnectivity-agent"
GOOD = "eyJhbGciOiJSUzI1NiJ9.good-agent-token-7f3a.c2ln"
OTHER_GOOD = "eyJhbGciOiJSUzI1NiJ9.rotated-agent-token-91bd.c2ln"
PREFIX = "Failed to validate authentication token, err:"
CACHE = "konnectivity_network_proxy_server_token_review_cache_total"
AUTHS = "konnectivity_network_proxy_server_agent_authentications_total"


@pytest.fixture
def fake(pki: DemoPki) -> Iterator[FakeKube]:
    with FakeKube(pki) as kube:
        kube.add_service_account_token(GOOD, NAMESPACE, ACCOUNT, audiences=(AUDIENCE,))
        kube.add_service_account_token(OTHER_GOOD, NAMESPACE, ACCOUNT, audiences=(AUDIENCE,))
        kube.add_service_account_token("expired-token", NAMESPACE, ACCOUNT, audiences=(AUDIENCE,), expired=True)
        kube.add_service_account_token("apiserver-audience-token", NAMESPACE, ACCOUNT, audiences=(API_AUDIENCE,))
        kube.add_service_account_token("default-ns-token", "default", ACCOUNT, audiences=(AUDIENCE,))
        kube.add_service_account_token("other-sa-token", NAMESPACE, "someone-else", audiences=(AUDIENCE,))
        kube.add_user_token("admin-token", "admin", audiences=(AUDIENCE,))
        yield kube


def auth_overrides(kubeconfig: Path, **extra: object) -> dict[str, object]:
    return dict(agent_namespace=NAMESPACE, agent_service_account=ACCOUNT, authentication_audience=AUDIENCE,
                kubeconfig=str(kubeconfig), **extra)


@contextlib.asynccontextmanager
async def auth_stack(pki: DemoPki, tmp: Path, kubeconfig: Path, **extra: object) -> AsyncIterator[Stack]:
    running = await Stack(pki, tmp, **auth_overrides(kubeconfig, **extra)).start()
    try:
        yield running
        await running.wait_idle()
    finally:
        await running.stop()


@pytest.fixture
async def stack(pki: DemoPki, short_tmp: Path, fake: FakeKube) -> AsyncIterator[Stack]:
    async with auth_stack(pki, short_tmp, fake.write_kubeconfig(short_tmp / "kubeconfig")) as running:
        yield running


@dataclass
class Answer:
    code: grpc.StatusCode
    details: str
    headers: dict[str, str]


async def connect(stack: Stack, md: list[tuple[str, str]]) -> Answer:
    """One raw Connect stream: its status if refused, its headers if accepted (then closed)."""
    credentials = grpc.ssl_channel_credentials(stack.pki.ca_cert.read_bytes())
    async with grpc.aio.secure_channel(f"127.0.0.1:{stack.server.agent_port}", credentials) as channel:
        call = channel.stream_stream(CONNECT_METHOD)(metadata=[("agentid", "raw-agent"), *md])
        async with asyncio.timeout(15):
            headers = dict(await call.initial_metadata())
            if "serverid" in headers:
                call.cancel()
                return Answer(grpc.StatusCode.OK, "", headers)
            return Answer(await call.code(), await call.details() or "", headers)


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", "Bearer " + token)]


def metric(stack: Stack, name: str, **labels: str) -> float:
    return stack.server.metrics.registry.get_sample_value(name, labels) or 0.0


# --------------------------------------------------------------------- accepted
async def test_the_right_service_account_and_audience_is_accepted(stack: Stack, fake: FakeKube, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(GOOD)
    agent = await stack.add_agent(service_account_token_path=str(token_file))
    async with endpoint(echo_handler) as ep:
        tunnel = await open_tunnel(ep.address, uds_path=stack.uds)
        await tunnel.send(b"through an authenticated agent")
        assert await tunnel.receive() == b"through an authenticated agent"
        await tunnel.aclose()
    review = fake.token_reviews[0]
    assert (review.token, review.audiences, review.content_type) == (GOOD, (AUDIENCE,), "application/json")
    assert fake.requests[0] == ("POST", "/apis/authentication.k8s.io/v1/tokenreviews")
    assert metric(stack, AUTHS, result="accepted") >= 1
    assert agent.agent.clients.is_connected()


async def test_accepted_raw_stream_gets_the_normal_headers(stack: Stack) -> None:
    answer = await connect(stack, bearer(GOOD))
    assert answer.code is grpc.StatusCode.OK
    assert answer.headers == {"serverid": "test-server", "servercount": "1"}


# --------------------------------------------------------------------- refused
REFUSALS = [
    ("no_header", [], "Authentication context was not found in metadata", 0),
    ("two_headers", bearer(GOOD) + bearer(GOOD), "too many (2) tokens are received", 0),
    ("wrong_scheme", [("authorization", "Basic " + GOOD)], 'received token does not have "Bearer " prefix', 0),
    ("lower_case_scheme", [("authorization", "bearer " + GOOD)], 'received token does not have "Bearer " prefix', 0),
    ("empty_token", bearer(""),
     PREFIX + "Failed to authenticate request. err:token is required for TokenReview in authentication", 0),
    ("unauthenticated", bearer("never-issued-token"), PREFIX + "lookup failed: service account jwt not valid", 1),
    ("expired", bearer("expired-token"), PREFIX + "lookup failed: token has expired", 1),
    ("wrong_audience", bearer("apiserver-audience-token"),
     PREFIX + f'lookup failed: token audiences ["{API_AUDIENCE}"] is invalid for the target audiences ["{AUDIENCE}"]', 1),
    ("wrong_namespace", bearer("default-ns-token"),
     PREFIX + 'lookup failed: incoming request from "default" namespace. Expected "kube-system"', 1),
    ("wrong_service_account", bearer("other-sa-token"),
     PREFIX + 'lookup failed: incoming request from "someone-else" service account. Expected "konnectivity-agent"', 1),
    ("not_a_service_account", bearer("admin-token"), PREFIX + "lookup failed: unexpected username format", 1),
    ("long_token", bearer("x" * (MAX_TOKEN_BYTES + 4096)), PREFIX + f"token is longer than {MAX_TOKEN_BYTES} bytes", 0),
]


@pytest.mark.parametrize(("case", "md", "message", "reviews"), REFUSALS, ids=[r[0] for r in REFUSALS])
async def test_refused_with_the_reference_status_and_never_dialed(
    stack: Stack, fake: FakeKube, case: str, md: list[tuple[str, str]], message: str, reviews: int
) -> None:
    answer = await connect(stack, md)
    assert (answer.code, answer.details) == (grpc.StatusCode.UNKNOWN, message)
    assert "serverid" not in answer.headers
    assert fake.review_count == reviews
    await assert_no_agent_gets_a_dial(stack)
    assert metric(stack, AUTHS, result="accepted") == 0


async def test_a_1mib_header_is_refused_before_any_handler_or_review(stack: Stack, fake: FakeKube) -> None:
    # Deliberately stricter than the reference (grpc-go takes 16 MiB of headers and forwards
    # the token to kube-apiserver): grpc refuses headers above 16 KiB before our code runs.
    answer = await connect(stack, bearer("y" * (1 << 20)))
    assert answer.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "metadata size exceeds hard limit" in answer.details
    assert fake.review_count == 0
    await assert_no_agent_gets_a_dial(stack)


async def test_a_review_without_our_audience_is_refused(stack: Stack, fake: FakeKube) -> None:
    fake.audience_aware = False  # like a webhook authenticator that ignores spec.audiences
    answer = await connect(stack, bearer(GOOD))
    assert answer.code is grpc.StatusCode.UNKNOWN
    assert answer.details == PREFIX + 'lookup failed: audience "system:konnectivity-server" not granted (granted: none)'
    await assert_no_agent_gets_a_dial(stack)


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_unreachable_apiserver_fails_closed(pki: DemoPki, short_tmp: Path, fake: FakeKube) -> None:
    kubeconfig = fake.write_kubeconfig(short_tmp / "kubeconfig")
    kubeconfig.write_text(kubeconfig.read_text().replace(fake.url, f"https://127.0.0.1:{unused_port()}"))
    async with auth_stack(pki, short_tmp, kubeconfig) as stack:
        answer = await connect(stack, bearer(GOOD))
        assert answer.code is grpc.StatusCode.UNKNOWN
        assert answer.details.startswith(PREFIX + 'Failed to authenticate request. err:Post "https://127.0.0.1:')
        assert answer.details.endswith('/apis/authentication.k8s.io/v1/tokenreviews": connect: connection refused')
        await assert_no_agent_gets_a_dial(stack)
        assert metric(stack, AUTHS, result="api_unavailable") == 1


async def test_no_kubeconfig_outside_a_cluster_stops_the_server_from_starting(
    pki: DemoPki, short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    overrides = dict(auth_overrides(Path()), kubeconfig="")  # empty: in-cluster configuration
    server = Stack(pki, short_tmp, **overrides).server
    try:
        with pytest.raises(ConfigError, match=r"cannot load in-cluster configuration \(--kubeconfig is empty\)"):
            await server.start()
    finally:
        await server.stop(0)


async def test_forbidden_tokenreview_fails_closed_with_the_api_message(stack: Stack, fake: FakeKube) -> None:
    fake.forbid_token_reviews = True
    answer = await connect(stack, bearer(GOOD))
    assert answer.details == (PREFIX + 'Failed to authenticate request. err:tokenreviews.authentication.k8s.io is '
                              'forbidden: User "system:konnectivity-client" cannot create resource "tokenreviews" '
                              'in API group "authentication.k8s.io" at the cluster scope')
    await assert_no_agent_gets_a_dial(stack)


async def test_a_slow_apiserver_times_out_and_fails_closed(pki: DemoPki, short_tmp: Path, fake: FakeKube) -> None:
    fake.review_delay = 30  # released when the stand-in closes
    kubeconfig = fake.write_kubeconfig(short_tmp / "kubeconfig")
    async with auth_stack(pki, short_tmp, kubeconfig, token_review_timeout=0.5) as stack:
        loop = asyncio.get_running_loop()
        started = loop.time()
        answer = await connect(stack, bearer(GOOD))
        assert loop.time() - started < 5
        assert answer.details.endswith('/tokenreviews": context deadline exceeded')
        await assert_no_agent_gets_a_dial(stack)
        fake.review_delay = 0
        fake.close()  # lets the review thread finish before the server waits for it


async def test_api_errors_are_not_cached(stack: Stack, fake: FakeKube) -> None:
    fake.fail_reviews_with = (500, "InternalError", "Internal error occurred: etcd leader changed")
    answer = await connect(stack, bearer(GOOD))
    assert answer.details.endswith("err:Internal error occurred: etcd leader changed")
    fake.fail_reviews_with = None
    assert (await connect(stack, bearer(GOOD))).code is grpc.StatusCode.OK
    assert fake.review_count == 2


async def test_a_refused_agent_retries_with_backoff_and_never_gets_a_dial(
    stack: Stack, fake: FakeKube, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    token_file = tmp_path / "token"
    token_file.write_text("other-sa-token")
    await stack.add_agent(wait=False, service_account_token_path=str(token_file), sync_interval=0.05,
                          sync_interval_cap=2.0)

    def refusals() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.getMessage().startswith("proxy server refused authentication")]

    await wait_for(lambda: len(refusals()) >= 4, what="four refused attempts")
    delays = [float(r.args[-1]) for r in refusals()[:4]]  # type: ignore[index]
    assert delays == sorted(delays) and delays[0] < delays[-1], delays
    assert "status=UNKNOWN" in refusals()[0].getMessage()
    assert 'incoming request from "someone-else" service account' in refusals()[0].getMessage()
    assert fake.review_count == 1  # the refusal is cached too (briefly)
    await assert_no_agent_gets_a_dial(stack)


# --------------------------------------------------------------------- cache
async def test_500_connects_with_one_token_cost_one_tokenreview(stack: Stack, fake: FakeKube) -> None:
    credentials = grpc.ssl_channel_credentials(stack.pki.ca_cert.read_bytes())
    target = f"127.0.0.1:{stack.server.agent_port}"
    channels = [grpc.aio.secure_channel(target, credentials) for _ in range(5)]
    calls = []
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        for index in range(500):
            md = [("agentid", f"agent-{index}"), *bearer(GOOD)]
            calls.append(channels[index % 5].stream_stream(CONNECT_METHOD)(metadata=md))
        async with asyncio.timeout(30):
            headers = await asyncio.gather(*(call.initial_metadata() for call in calls))
        assert all(dict(h).get("serverid") == "test-server" for h in headers)
        await wait_for(lambda: len(stack.server.registry) == 500, what="500 backends")
        elapsed = loop.time() - started
    finally:
        for call in calls:
            call.cancel()
        for channel in channels:
            await channel.close()
    assert fake.review_count == 1
    assert metric(stack, CACHE, result="miss") == 1
    assert metric(stack, CACHE, result="hit") + metric(stack, CACHE, result="joined") == 499
    assert metric(stack, AUTHS, result="accepted") == 500
    await wait_for(lambda: len(stack.server.registry) == 0, what="backends gone")
    print(f"500 authenticated Connect streams in {elapsed:.2f}s, TokenReviews={fake.review_count}")


class ManualClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_an_expired_cache_entry_causes_a_new_review(stack: Stack, fake: FakeKube) -> None:
    clock = ManualClock()
    assert stack.server.token_auth is not None
    verifier = stack.server.token_auth.verifier
    verifier.cache.clock = clock
    assert (await connect(stack, bearer(GOOD))).code is grpc.StatusCode.OK
    clock.now += verifier.success_ttl - 1
    assert (await connect(stack, bearer(GOOD))).code is grpc.StatusCode.OK
    assert fake.review_count == 1
    clock.now += 1
    assert (await connect(stack, bearer(GOOD))).code is grpc.StatusCode.OK
    assert fake.review_count == 2
    assert metric(stack, CACHE, result="hit") == 1


async def test_refusals_are_cached_only_briefly(stack: Stack, fake: FakeKube) -> None:
    clock = ManualClock()
    assert stack.server.token_auth is not None
    verifier = stack.server.token_auth.verifier
    verifier.cache.clock = clock
    for _ in range(3):
        assert (await connect(stack, bearer("never-issued-token"))).code is grpc.StatusCode.UNKNOWN
    assert fake.review_count == 1
    clock.now += verifier.failure_ttl
    await connect(stack, bearer("never-issued-token"))
    assert fake.review_count == 2


async def test_a_cached_success_never_outlives_the_tokens_own_expiry(stack: Stack, fake: FakeKube) -> None:
    import base64
    import json

    claims = base64.urlsafe_b64encode(json.dumps({"exp": 2_000_000_030}).encode()).rstrip(b"=").decode()
    token = f"eyJhbGciOiJSUzI1NiJ9.{claims}.c2ln"
    fake.add_service_account_token(token, NAMESPACE, ACCOUNT, audiences=(AUDIENCE,))
    clock = ManualClock()
    assert stack.server.token_auth is not None
    verifier = stack.server.token_auth.verifier
    verifier.cache.clock = clock
    verifier.wall_clock = lambda: 2_000_000_000.0  # the token expires in 30 s, the TTL is longer
    assert verifier.success_ttl > 30
    assert (await connect(stack, bearer(token))).code is grpc.StatusCode.OK
    clock.now += 30
    assert (await connect(stack, bearer(token))).code is grpc.StatusCode.OK
    assert fake.review_count == 2


async def test_kubeconfig_qps_and_burst_pace_the_tokenreviews(pki: DemoPki, short_tmp: Path, fake: FakeKube) -> None:
    kubeconfig = fake.write_kubeconfig(short_tmp / "kubeconfig")
    async with auth_stack(pki, short_tmp, kubeconfig, kubeconfig_qps=5.0, kubeconfig_burst=2) as stack:
        answers = await asyncio.gather(*(connect(stack, bearer(f"distinct-token-{i}")) for i in range(5)))
    assert fake.review_count == 5
    assert all(a.code is grpc.StatusCode.UNKNOWN for a in answers)
    arrivals = sorted(r.at for r in fake.token_reviews)
    # Two at once (the burst), then one every 200 ms: the last is sent 600 ms after the first.
    # Unpaced, all five arrive within a few ms; the slack allows a loaded CI machine to
    # bunch arrivals at the stand-in by up to 300 ms.
    assert arrivals[-1] - arrivals[0] >= 0.3, arrivals
    print(f"5 TokenReviews at 5 qps / burst 2 arrived over {arrivals[-1] - arrivals[0]:.3f}s")


# --------------------------------------------------------------------- agent side
def write_atomically(path: Path, text: str) -> None:
    """As kubelet updates a projected volume: a new file renamed into place."""
    scratch = path.with_suffix(".new")
    scratch.write_text(text)
    os.replace(scratch, path)


async def test_a_rotated_token_file_is_what_the_server_sees_next(stack: Stack, fake: FakeKube, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(GOOD)
    # sync-forever reconnects every interval, so each attempt re-reads the file.
    await stack.add_agent(service_account_token_path=str(token_file), sync_forever=True, sync_interval=0.05)
    await wait_for(lambda: GOOD in fake.reviewed_tokens(), what="the first token reviewed")
    write_atomically(token_file, OTHER_GOOD)
    await wait_for(lambda: OTHER_GOOD in fake.reviewed_tokens(), what="the rotated token reviewed")
    assert fake.reviewed_tokens()[:2] == [GOOD, OTHER_GOOD]
    assert len(stack.server.registry) >= 1


async def test_an_unreadable_token_file_is_a_clear_error_retried_until_it_appears(
    stack: Stack, fake: FakeKube, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="proxy_agent")
    token_file = tmp_path / "tokens" / "konnectivity-agent-token"
    await stack.add_agent(wait=False, service_account_token_path=str(token_file))

    def complaints() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.getMessage().startswith("no credentials for proxy server")]

    await wait_for(lambda: len(complaints()) >= 2, what="two failed attempts")
    assert f"cannot read service account token file {token_file}: No such file or directory" in complaints()[0]
    assert fake.review_count == 0
    token_file.parent.mkdir()
    token_file.write_text("")
    await wait_for(lambda: any("is empty" in c for c in complaints()), what="the empty file reported")
    write_atomically(token_file, GOOD)
    await wait_for(lambda: len(stack.server.registry) == 1, what="the agent registered")


async def test_tokens_never_appear_in_logs_at_full_verbosity(
    stack: Stack, fake: FakeKube, tmp_path: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    for name in ("proxy_server", "proxy_agent", "proxy_common", "grpc", "urllib3", "kubernetes", "asyncio"):
        caplog.set_level(logging.DEBUG, logger=name)
    secrets = ["other-sa-token", "never-issued-token", GOOD, OTHER_GOOD]
    token_file = tmp_path / "token"
    token_file.write_text(secrets[0])
    await stack.add_agent(wait=False, service_account_token_path=str(token_file), sync_forever=True,
                          sync_interval=0.05)
    for reviewed, secret in enumerate(secrets[1:], start=1):
        await wait_for(lambda n=reviewed: fake.review_count >= n, what="a review of the previous token")
        write_atomically(token_file, secret)
    await wait_for(lambda: OTHER_GOOD in fake.reviewed_tokens(), what="the last token reviewed")
    await wait_for(lambda: len(stack.server.registry) >= 1, what="the agent registered")
    async with endpoint(echo_handler) as ep:
        tunnel = await open_tunnel(ep.address, uds_path=stack.uds)
        await tunnel.send(b"ping")
        assert await tunnel.receive() == b"ping"
        await tunnel.aclose()
    assert any(r.getMessage().startswith("proxy server refused authentication") for r in caplog.records)
    assert any(r.levelno == logging.DEBUG for r in caplog.records)
    stderr = capfd.readouterr()
    logged = caplog.text + "".join(repr(r.args) for r in caplog.records) + stderr.out + stderr.err
    for secret in secrets:
        assert secret not in logged
