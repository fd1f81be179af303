"""Keep one stream to every proxy server: connect, de-duplicate by server ID, back off.

SHELL. The sync loop follows the reference: a round opens one new Connect stream when the
agent holds fewer streams than the server count (or always, with `--sync-forever`); a
stream to a server ID already held is closed at once. Waits are `--sync-interval` plus
jitter after a success, and exponential (x1.5, jitter, capped at `--sync-interval-cap`)
after a failure. Unlike the reference, repeated duplicates back off too, and the reason
is logged, so a server count larger than the reachable servers never becomes a tight
reconnect loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from proxy_agent.config import AgentConfig
from proxy_agent.leases import LeaseCounter
from proxy_agent.metrics import AgentMetrics
from proxy_agent.session import Session
from proxy_common import leases, metadata
from proxy_common.errors import AuthError, TunnelBroken
from proxy_common.streams import CONNECT_METHOD, TRANSPORT_OPTIONS, ClientStream
from proxy_common.tasks import race

log = logging.getLogger("proxy_agent")

MAX_MESSAGE_BYTES = 16 << 20
STATUS_GRACE = 1.0  # seconds a header-less answer may take to show its status
DUPLICATE_WARNING_STREAK = 5  # consecutive duplicates before the likely cause is logged as a warning


class ConnectFailed(Exception):
    """A connection attempt to a server did not produce a usable stream."""


class AuthRefused(ConnectFailed):
    """The server refused the stream because of the agent's credentials."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


# How servers word an authentication refusal (the reference sends them with status UNKNOWN).
AUTH_REFUSAL_TEXTS = ("Failed to validate authentication token", "Authentication context was not found",
                      "too many (", "received token does not have")


def refusal(code: grpc.StatusCode, details: str) -> ConnectFailed:
    if code is grpc.StatusCode.UNAUTHENTICATED or details.startswith(AUTH_REFUSAL_TEXTS):
        return AuthRefused(code.name, details)
    return ConnectFailed(f"server refused the stream: {code.name}: {details}")


def redact(text: str, secret: str) -> str:
    """`text` without `secret` (a peer's message could quote what we sent)."""
    return text.replace(secret, "[redacted]") if secret else text


class Backoff:
    """Exponential back-off: base, x1.5 per failure, capped, then up to 10% jitter on top.

    The jitter comes after the cap (as in Kubernetes' wait.Backoff): were it capped too, every
    agent at the cap would wait exactly as long, and agents behind one round-robin balancer
    could stay in step, each landing again and again on the server it already holds."""

    def __init__(self, base: float, cap: float, rng: random.Random | None = None) -> None:
        self.base, self.cap = base, cap
        self.failures = 0
        self._rng = rng or random.Random()

    def success(self) -> float:
        self.failures = 0
        return self.base * (1 + 0.1 * self._rng.random())

    def failure(self) -> float:
        delay = self.nth(self.failures)
        self.failures += 1
        return delay

    def nth(self, failures: int) -> float:
        """The wait after `failures` earlier failures in a row."""
        return min(self.cap, self.base * 1.5**failures) * (1 + 0.1 * self._rng.random())


def read_token(path: str) -> str:
    """The projected service-account token, re-read on every connect (it rotates)."""
    try:
        token = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise AuthError(f"cannot read service account token file {path}: {reason}") from None
    if not token:
        raise AuthError(f"service account token file {path} is empty")
    return token


@dataclass(slots=True)
class Connected:
    server_id: str
    server_count: int
    channel: grpc.aio.Channel
    stream: ClientStream
    flow_token: str | None = None


class ServerConnector:
    """Opens one authenticated Connect stream to one server address."""

    def __init__(self, config: AgentConfig, host: str, port: int) -> None:
        self.config = config
        self.host, self.port = host, port
        self._credentials = self._build_credentials()

    def _build_credentials(self) -> grpc.ChannelCredentials:
        c = self.config
        key = Path(c.agent_key).read_bytes() if c.agent_key else None
        cert = Path(c.agent_cert).read_bytes() if c.agent_cert else None
        return grpc.ssl_channel_credentials(Path(c.ca_cert).read_bytes(), key, cert)

    def _metadata(self) -> list[tuple[str, str]]:
        c = self.config
        md = [(metadata.AGENT_ID, c.agent_id), (metadata.AGENT_IDENTIFIERS, c.agent_identifiers)]
        if c.flow_control:
            md.append((metadata.FLOW_CONTROL, metadata.FLOW_CONTROL_VERSION))
        if c.service_account_token_path:
            md.append((metadata.AUTHORIZATION, metadata.BEARER_PREFIX + read_token(c.service_account_token_path)))
        return md

    async def connect(self) -> Connected:
        c = self.config
        md = self._metadata()
        token = next((value[len(metadata.BEARER_PREFIX) :] for key, value in md if key == metadata.AUTHORIZATION), "")
        target = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            *TRANSPORT_OPTIONS,
            ("grpc.keepalive_time_ms", int(c.keepalive_time * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.use_local_subchannel_pool", 1),  # a fresh TCP connection per stream
            ("grpc.enable_retries", 0),
        ]
        channel = grpc.aio.secure_channel(target, self._credentials, options=options)
        try:
            call = channel.stream_stream(CONNECT_METHOD)(metadata=md, wait_for_ready=False)
            async with asyncio.timeout(c.connect_timeout):
                headers = await call.initial_metadata()
            server_id = metadata.single(headers, metadata.SERVER_ID)
            count_text = metadata.single(headers, metadata.SERVER_COUNT)
            if not headers and not call.done():
                # A trailers-only refusal can resolve the headers a moment before the status:
                # give the status a short, bounded moment (a live stream is not waited on).
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(STATUS_GRACE, c.connect_timeout)):
                        await call.code()
            if call.done():  # trailers-only answer: the server refused the stream
                raise refusal(await call.code(), redact(await call.details() or "", token))
            if server_id is None:
                raise ConnectFailed(f"expected one server ID in the response headers, got {metadata.values(headers, metadata.SERVER_ID)}")
            if count_text is None:
                raise ConnectFailed(f"expected one server count, got {len(metadata.values(headers, metadata.SERVER_COUNT))}")
            try:
                count = int(count_text)
            except ValueError:
                raise ConnectFailed(f"invalid servercount {count_text!r}") from None
            flow_token = None
            if c.flow_control and metadata.single(headers, metadata.FLOW_CONTROL) == metadata.FLOW_CONTROL_VERSION:
                flow_token = metadata.single(headers, metadata.SESSION)
            return Connected(server_id, count, channel, ClientStream(call), flow_token)
        except TimeoutError:
            await channel.close()
            raise ConnectFailed(f"no answer from {target} within {c.connect_timeout}s") from None
        except grpc.aio.AioRpcError as exc:
            await channel.close()
            raise ConnectFailed(f"{exc.code().name}: {redact(exc.details() or '', token)}") from None
        except BaseException:
            await channel.close()
            raise


class ClientSet:
    """All of the agent's server streams, kept at the server count."""

    def __init__(
        self,
        config: AgentConfig,
        metrics: AgentMetrics,
        rng: random.Random | None = None,
        *,
        lease_counter: LeaseCounter | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.sessions: dict[str, Session] = {}
        self.last_server_count = 1
        self._backoff = Backoff(config.sync_interval, config.sync_interval_cap, rng)
        self.draining = False
        self.lease_counter = lease_counter
        self.attempts = 0  # connection attempts so far (debug view, tests)
        self.duplicate_streak = 0
        # Streams that ended soon after connecting, in a row: the next connection waits the
        # back-off of that many failures, so a server that accepts and drops is not a tight loop.
        self.flaps = 0
        self._not_before = 0.0
        self._rng = rng or random.Random()
        self._connectors = [ServerConnector(config, host, port) for host, port in config.server_targets()]
        self._connector_servers: dict[int, str] = {}  # connector index -> server ID it reached last
        self._next_target = 0

    @property
    def target_count(self) -> int:
        """How many distinct servers to hold: from `servercount` or the Leases (`--server-count-source`),
        and at least one per address given in `--proxy-server-addresses`."""
        counter = self.lease_counter
        target = leases.target_server_count(
            self.config.server_count_source, counting_leases=counter is not None,
            lease_count=counter.count() if counter is not None else 0, response_count=self.last_server_count,
        )
        return max(target, len(self._connectors))

    def buffered_bytes(self) -> int:
        """Payload bytes queued toward servers and endpoints (the buffered-bytes gauge)."""
        return sum(session.buffered_bytes() for session in list(self.sessions.values()))

    def is_connected(self) -> bool:
        return bool(self.sessions)

    async def run(self) -> None:
        """The sync loop: run until cancelled."""
        backoff = self._backoff = Backoff(self.config.sync_interval, self.config.sync_interval_cap, self._rng)
        loop = asyncio.get_running_loop()
        async with asyncio.TaskGroup() as group:
            while True:
                delay = backoff.base
                target = self.target_count
                self.metrics.known_server_count.set(target)
                if not self.draining and (self.config.sync_forever or len(self.sessions) < target):
                    hold = self._not_before - loop.time()
                    delay = hold if hold > 0 else await self._sync_once(group, backoff)
                await self._wait(delay)

    def drain(self) -> None:
        """First SIGTERM: DRAIN on every stream, no new server connections."""
        self.draining = True
        for session in list(self.sessions.values()):
            session.send_drain()

    def _pick_connector(self) -> int:
        """The next address to try: round robin, skipping addresses whose server is already held."""
        count = len(self._connectors)
        for offset in range(count):
            index = (self._next_target + offset) % count
            if self._connector_servers.get(index) not in self.sessions:
                self._next_target = index + 1
                return index
        index = self._next_target % count
        self._next_target += 1
        return index

    async def _sync_once(self, group: asyncio.TaskGroup, backoff: Backoff) -> float:
        index = self._pick_connector()
        connector = self._connectors[index]
        self.attempts += 1
        try:
            connected = await connector.connect()
        except AuthRefused as exc:
            delay = backoff.failure()
            log.warning("proxy server refused authentication address=%s:%d status=%s message=%s retry_in=%.1fs",
                        connector.host, connector.port, exc.code, exc.message, delay)
            return delay
        except AuthError as exc:
            delay = backoff.failure()
            log.warning("no credentials for proxy server address=%s:%d error=%s retry_in=%.1fs",
                        connector.host, connector.port, exc, delay)
            return delay
        except (ConnectFailed, TunnelBroken) as exc:
            delay = backoff.failure()
            log.warning("cannot connect to proxy server address=%s:%d error=%s retry_in=%.1fs",
                        connector.host, connector.port, exc, delay)
            return delay
        self._connector_servers[index] = connected.server_id
        if connected.server_id in self.sessions:
            await connected.channel.close()
            if self.config.sync_forever:  # expected churn: the reference's pace, sync interval + jitter
                delay = backoff.success()
                log.debug("server already connected, connection closed server_id=%s holding=%d retry_in=%.1fs",
                          connected.server_id, len(self.sessions), delay)
                return delay
            delay = backoff.failure()
            self.duplicate_streak += 1
            log.info("duplicate server, connection closed server_id=%s holding=%d want=%d retry_in=%.1fs",
                     connected.server_id, len(self.sessions), self.target_count, delay)
            if self.duplicate_streak == DUPLICATE_WARNING_STREAK:
                log.warning("%d connections in a row reached servers already connected (holding=%d want=%d): "
                            "the server count (servercount header or Leases) may be larger than the servers "
                            "reachable through %s:%d; retrying with back-off up to %.1fs",
                            self.duplicate_streak, len(self.sessions), self.target_count, connector.host,
                            connector.port, backoff.cap)
            return delay
        self.duplicate_streak = 0
        self.last_server_count = max(connected.server_count, 1)
        self.metrics.known_server_count.set(self.target_count)
        session = Session(
            connected.stream, self.config, self.metrics, server_id=connected.server_id,
            channel=connected.channel, flow_token=connected.flow_token,
        )
        self.sessions[connected.server_id] = session
        self.metrics.open_server_connections.set(len(self.sessions))
        group.create_task(self._serve(session, connected), name=f"session server_id={connected.server_id}")
        log.info("connected to proxy server server_id=%s server_count=%d", connected.server_id, connected.server_count)
        return backoff.success()

    async def _serve(self, session: Session, connected: Connected) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            await race(
                session.run(),
                self._probe(session, connected.channel),
                names=(f"session-run server_id={session.server_id}", f"session-probe server_id={session.server_id}"),
            )
        finally:
            self.sessions.pop(session.server_id, None)
            self.metrics.open_server_connections.set(len(self.sessions))
            lived = loop.time() - started
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                pass  # the agent is stopping: not the server's doing
            elif lived < self.config.sync_interval_cap:
                wait = self._backoff.nth(self.flaps)
                self.flaps += 1
                self._not_before = loop.time() + wait
                log.log(logging.WARNING if self.flaps > 1 else logging.INFO,
                        "server stream ended %.2fs after connecting (%d in a row) server_id=%s; "
                        "next connection in %.1fs", lived, self.flaps, session.server_id, wait)
            else:
                self.flaps = 0
            await connected.channel.close()
            log.info("disconnected from proxy server server_id=%s", session.server_id)

    async def _probe(self, session: Session, channel: grpc.aio.Channel) -> None:
        """End the session when its channel is no longer READY (the reference's probe)."""
        while True:
            await asyncio.sleep(self.config.probe_interval)
            state = channel.get_state(try_to_connect=False)
            if state is not grpc.ChannelConnectivity.READY:
                log.info("server connection not ready, closing server_id=%s state=%s", session.server_id, state.name)
                return

    @staticmethod
    async def _wait(delay: float) -> None:
        await asyncio.sleep(delay)
