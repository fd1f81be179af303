"""Agent token authentication against kube-apiserver: TokenReview, cached and coalesced.

SHELL. Three layers, each small:

* `KubeTokenReviewer` asks kube-apiserver through the official `kubernetes` client
  (`AuthenticationV1Api.create_token_review`). The client is synchronous, so each review
  runs in one of a few worker threads of our own, under a bounded timeout; a semaphore
  keeps at most that many reviews in flight, so nothing queues without a deadline.
  `--kubeconfig-qps`/`--kubeconfig-burst` become a token bucket in front of it (0 = none:
  the worker count already bounds concurrency). The Python client speaks JSON only, so
  `--kube-api-content-type=application/vnd.kubernetes.protobuf` (the reference's default)
  is accepted and JSON is sent; kube-apiserver accepts both.
* `CachedVerifier` keeps answers in a bounded LRU keyed by the SHA-256 of the token (the
  token itself is never stored): reviews that vouched for a token for `success_ttl` (never
  past the token's own `exp`), refusals for `failure_ttl`. Errors reaching the API are not
  cached. Concurrent lookups of one token share one request, so a fleet reconnecting at
  once with one token costs one TokenReview. Hits and misses are counted.
* `TokenAuthenticator` is the `authenticate` hook of `AgentServicer`: header, review,
  decision (the decisions are `proxy_server.auth`'s), and the counters.

Fails closed: no answer from the API is a refusal. No token is ever logged; texts coming
from the API or the HTTP stack are passed through `auth.redact` before they go anywhere.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from proxy_common import metadata
from proxy_common.kube import api_status, load_client_configuration, transport_error_text
from proxy_server import auth
from proxy_server.auth import AgentAuthError, AuthPolicy, ReviewResult, ReviewUnavailable, TokenVerifier

if TYPE_CHECKING:  # `kubernetes` (about a second to import) loads only when token auth is built
    from kubernetes import client as kube

log = logging.getLogger("proxy_server.auth")

PREFIX = "konnectivity_network_proxy_server_"
TOKEN_REVIEW_PATH = "/apis/authentication.k8s.io/v1/tokenreviews"
REVIEW_WORKERS = 8
DEFAULT_BURST = 10  # client-go's default burst when a QPS is set without one
REVIEW_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
USER_AGENT = "konnectivity-py-proxy-server"
JSON_HEADERS = {"Content-Type": "application/json", "Accept": "application/json"}


class TokenReviewMetrics:
    """Counters of the review cache and of agent authentication, in the server's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.cache = Counter(
            PREFIX + "token_review_cache",
            "TokenReview cache lookups by result: hit (cached answer), miss (a TokenReview was sent), "
            "joined (shared a TokenReview already in flight for the same token).",
            ["result"], registry=registry,
        )
        self.entries = Gauge(PREFIX + "token_review_cache_entries", "Answers held in the TokenReview cache.",
                             registry=registry)
        self.reviews = Counter(
            PREFIX + "token_reviews",
            "TokenReviews sent to kube-apiserver, by result: authenticated, unauthenticated or error (no answer).",
            ["result"], registry=registry,
        )
        self.review_duration = Histogram(
            PREFIX + "token_review_duration_seconds", "Latency of TokenReview requests to kube-apiserver.",
            buckets=REVIEW_BUCKETS, registry=registry,
        )
        self.authentications = Counter(
            PREFIX + "agent_authentications",
            "Agent token authentications by result: accepted, or the reason of the refusal.",
            ["result"], registry=registry,
        )
        for result in ("hit", "miss", "joined"):
            self.cache.labels(result)


# ----------------------------------------------------------------------------- cache
def cache_key(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


@dataclass(slots=True)
class _Entry:
    result: ReviewResult
    expires_at: float


class ReviewCache:
    """A bounded LRU of review answers with per-entry expiry; keys are token digests."""

    def __init__(self, max_entries: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        if max_entries <= 0:
            raise ValueError("max_entries must be positive")
        self.max_entries = max_entries
        self.clock = clock
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> ReviewResult | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if self.clock() >= entry.expires_at:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry.result

    def put(self, key: bytes, result: ReviewResult, ttl: float) -> None:
        if ttl <= 0:
            self._entries.pop(key, None)
            return
        self._entries[key] = _Entry(result, self.clock() + ttl)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)


class CachedVerifier:
    """A TokenVerifier in front of another: cached answers and one request per token at a time."""

    def __init__(
        self,
        inner: TokenVerifier,
        cache: ReviewCache,
        metrics: TokenReviewMetrics,
        *,
        success_ttl: float,
        failure_ttl: float,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.inner = inner
        self.cache = cache
        self.metrics = metrics
        self.success_ttl = success_ttl
        self.failure_ttl = failure_ttl
        self.wall_clock = wall_clock
        self._inflight: dict[bytes, asyncio.Task[ReviewResult]] = {}

    async def review(self, token: str) -> ReviewResult:
        key = cache_key(token)
        cached = self.cache.get(key)
        self.metrics.entries.set(len(self.cache))
        if cached is not None:
            self.metrics.cache.labels("hit").inc()
            return cached
        task = self._inflight.get(key)
        if task is None:
            self.metrics.cache.labels("miss").inc()
            task = asyncio.create_task(self._lookup(key, token), name="token-review")
            self._inflight[key] = task
            task.add_done_callback(lambda done: self._finished(key, done))
        else:
            self.metrics.cache.labels("joined").inc()
        # Shielded: an agent that hangs up must not cancel the review others wait for.
        return await asyncio.shield(task)

    async def _lookup(self, key: bytes, token: str) -> ReviewResult:
        result = await self.inner.review(token)
        self.cache.put(key, result, self._ttl(token, result))
        self.metrics.entries.set(len(self.cache))
        return result

    def _ttl(self, token: str, result: ReviewResult) -> float:
        if not auth.is_cacheable_success(result):
            return self.failure_ttl
        expiry = auth.token_expiry(token)
        if expiry is None:
            return self.success_ttl
        return min(self.success_ttl, expiry - self.wall_clock())

    def _finished(self, key: bytes, task: asyncio.Task[ReviewResult]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved here, so a review nobody waits for any more is not reported

    async def aclose(self) -> None:
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._inflight.clear()


# ------------------------------------------------------------------- kube-apiserver
class RateLimiter:
    """Token bucket: `qps` per second, up to `burst` at once. Waiters are served in order."""

    def __init__(self, qps: float, burst: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.qps, self.burst = qps, max(1, burst)
        self.clock = clock
        self._tokens = float(self.burst)
        self._stamp = clock()
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        async with self._lock:
            while True:
                now = self.clock()
                self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.qps)
                self._stamp = now
                if self._tokens >= 1:
                    self._tokens -= 1
                    return
                await asyncio.sleep((1 - self._tokens) / self.qps)


class KubeTokenReviewer:
    """TokenVerifier that creates TokenReviews in kube-apiserver."""

    def __init__(
        self,
        configuration: kube.Configuration,
        audience: str,
        metrics: TokenReviewMetrics,
        *,
        timeout: float = 10.0,
        qps: float = 0.0,
        burst: int = 0,
        workers: int = REVIEW_WORKERS,
    ) -> None:
        import urllib3
        from kubernetes import client as kube

        configuration.connection_pool_maxsize = workers
        # No retries inside the bound: a failed review refuses this attempt and the agent retries
        # with its back-off (urllib3 already skips pooled connections the server has dropped).
        configuration.retries = urllib3.Retry(total=0, redirect=0)
        self.url = configuration.host.rstrip("/") + TOKEN_REVIEW_PATH
        self.audience = audience
        self.metrics = metrics
        self.timeout = timeout
        self._api_client = kube.ApiClient(configuration)
        self._api_client.user_agent = USER_AGENT
        self._api = kube.AuthenticationV1Api(self._api_client)
        self._kube = kube
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="token-review")
        self._slots = asyncio.Semaphore(workers)
        self._limiter = RateLimiter(qps, burst or DEFAULT_BURST) if qps > 0 else None

    async def review(self, token: str) -> ReviewResult:
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.timeout):
                if self._limiter is not None:
                    await self._limiter.acquire()
                async with self._slots:
                    result = await loop.run_in_executor(self._executor, self._review_blocking, token)
        except TimeoutError:
            self.metrics.reviews.labels("error").inc()
            raise ReviewUnavailable(f'Post "{self.url}": context deadline exceeded') from None
        except ReviewUnavailable:
            self.metrics.reviews.labels("error").inc()
            raise
        finally:
            self.metrics.review_duration.observe(time.monotonic() - started)
        self.metrics.reviews.labels("authenticated" if result.authenticated else "unauthenticated").inc()
        return result

    def _review_blocking(self, token: str) -> ReviewResult:
        """Runs in a worker thread. Every failure leaves as ReviewUnavailable, token-free."""
        kube = self._kube
        body = kube.V1TokenReview(
            api_version="authentication.k8s.io/v1",
            kind="TokenReview",
            spec=kube.V1TokenReviewSpec(token=token, audiences=[self.audience]),
        )
        try:
            answer = self._api.create_token_review(body, _request_timeout=self.timeout, _headers=dict(JSON_HEADERS))
        except kube.ApiException as exc:
            failure = _api_error_text(exc)
        except Exception as exc:  # the HTTP stack's and the model's errors, translated once, here
            failure = f'Post "{self.url}": {transport_error_text(exc)}'
        else:
            return _result_of(answer, token)
        # Raised outside the handler on purpose: the library's exception, its traceback and the
        # HTTP response its frames hold (with the connection's socket) are dropped right here.
        raise ReviewUnavailable(auth.redact(failure, token))

    async def aclose(self) -> None:
        """Wait for reviews still running in threads (bounded by their timeout), then close sockets."""
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)
        self._api_client.close()  # type: ignore[no-untyped-call]


def _result_of(answer: Any, token: str) -> ReviewResult:
    status = getattr(answer, "status", None)
    if status is None:
        return ReviewResult(authenticated=False)
    user = status.user
    return ReviewResult(
        authenticated=bool(status.authenticated),
        username=(user.username or "") if user is not None else "",
        error=auth.redact(status.error or "", token),
        audiences=tuple(status.audiences or ()),
    )


def _api_error_text(exc: kube.ApiException) -> str:
    """client-go's text for an API error: the Status message when there is one."""
    return api_status(exc)[2]


# ------------------------------------------------------------------- the agent hook
class TokenAuthenticator:
    """AgentServicer's `authenticate` hook: refuse unless the token names the configured SA."""

    def __init__(self, policy: AuthPolicy, verifier: TokenVerifier, metrics: TokenReviewMetrics) -> None:
        self.policy = policy
        self.verifier = verifier
        self.metrics = metrics

    async def __call__(self, md: metadata.Metadata) -> None:
        try:
            token = auth.bearer_token(md)
            try:
                result = await self.verifier.review(token)
            except ReviewUnavailable as exc:
                raise auth.unavailable(str(exc)) from None
            identity = auth.check_review(self.policy, result)
        except AgentAuthError as exc:
            self.metrics.authentications.labels(str(exc.reason)).inc()
            raise
        self.metrics.authentications.labels("accepted").inc()
        log.debug("agent authenticated username=%s", identity.username)


@dataclass(slots=True)
class AgentTokenAuth:
    """Everything token authentication owns, built from the server's flags."""

    authenticator: TokenAuthenticator
    verifier: CachedVerifier
    reviewer: KubeTokenReviewer

    async def aclose(self) -> None:
        await self.verifier.aclose()
        await self.reviewer.aclose()


def build(
    *,
    policy: AuthPolicy,
    kubeconfig: str,
    registry: CollectorRegistry,
    content_type: str = "application/json",
    qps: float = 0.0,
    burst: int = 0,
    timeout: float = 10.0,
    success_ttl: float = 120.0,
    failure_ttl: float = 10.0,
    cache_size: int = 10_000,
) -> AgentTokenAuth:
    """Token authentication for the agent port; raises ConfigError when the API config is unusable."""
    configuration = load_client_configuration(kubeconfig)
    if "json" not in content_type:
        log.info("kube-api-content-type=%s is not available in the Python client; TokenReviews are sent as JSON",
                 content_type)
    metrics = TokenReviewMetrics(registry)
    reviewer = KubeTokenReviewer(configuration, policy.audience, metrics, timeout=timeout, qps=qps, burst=burst)
    verifier = CachedVerifier(reviewer, ReviewCache(cache_size), metrics,
                              success_ttl=success_ttl, failure_ttl=failure_ttl)
    log.info("agent token authentication on namespace=%s service_account=%s audience=%s api=%s "
             "cache_ttl=%ss failure_ttl=%ss cache_size=%d",
             policy.namespace, policy.service_account, policy.audience, configuration.host,
             success_ttl, failure_ttl, cache_size)
    return AgentTokenAuth(TokenAuthenticator(policy, verifier, metrics), verifier, reviewer)
