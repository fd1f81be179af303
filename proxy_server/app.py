"""Composition root of proxy-server: builds the router and listeners and runs them.

ROOT. `ProxyServer` is what tests and the demo start in-process; `serve()` is what the
command line runs (signals, exit status).
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from pathlib import Path

from proxy_common import probes
from proxy_common.errors import ConfigError
from proxy_common.streams import CONNECT_METHOD, PROXY_METHOD
from proxy_common.tasks import two_stage_signals
from proxy_server import debug, tokenreview
from proxy_server import leases as lease_control
from proxy_server.agent_service import AgentServicer, Authenticator
from proxy_server.auth import AuthPolicy
from proxy_server.backends import BackendRegistry
from proxy_server.config import ServerConfig
from proxy_server.connection_service import SERVICE as CONNECTION_SERVICE
from proxy_server.connection_service import ConnectionServicer
from proxy_server.frontend_service import ProxyServicer
from proxy_server.grpc_native import NativeGrpcServer
from proxy_server.http_connect import HttpConnectFrontend, bind_unix
from proxy_server.metrics import ServerMetrics
from proxy_server.router import Router
from proxy_server.switchboard import Switchboard
from proxy_server.tls import server_tls_context

log = logging.getLogger("proxy_server")

MAX_MESSAGE_BYTES = 16 << 20


def grpc_address(host: str, port: int) -> str:
    if not host:
        return f"[::]:{port}"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def prepare_uds(path: str, delete_existing: bool) -> None:
    """Make room for the frontend socket, refusing to touch anything but a stale socket."""
    target = Path(path)
    if not target.exists() and not target.is_symlink():
        target.parent.mkdir(parents=True, exist_ok=True)
        return
    if not stat.S_ISSOCK(target.lstat().st_mode):
        raise ConfigError([f"--uds-name {path} exists and is not a socket; refusing to replace it"])
    if not delete_existing:
        raise ConfigError([f"--uds-name {path} already exists (use --delete-existing-uds-file)"])
    target.unlink()


def remove_uds(path: str) -> None:
    """Remove the frontend socket we created (one local unlink, like prepare_uds's; no need for a thread)."""
    Path(path).unlink(missing_ok=True)


class ProxyServer:
    """proxy-server's listeners around one switchboard."""

    def __init__(self, config: ServerConfig, *, authenticate: Authenticator | None = None) -> None:
        self.config = config
        self.metrics = ServerMetrics(config.proxy_strategies)
        self.registry = BackendRegistry(config.proxy_strategies)
        self.router = Router(self.registry)
        self.board = Switchboard(
            self.router,
            self.metrics,
            frontend_buffer_bytes=config.frontend_buffer_bytes,
            overflow_wait=config.overflow_wait,
            stall_timeout=config.stalled_connection_timeout,
            dial_timeout=config.backend_dial_timeout,
        )
        self.metrics.buffered_bytes.set_function(self.board.buffered_bytes)
        self.authenticate = authenticate
        self.token_auth: tokenreview.AgentTokenAuth | None = None
        self.lease_controller: lease_control.LeaseController | None = None
        self.agent_port = 0
        self.frontend_port = 0
        self._agent_server: NativeGrpcServer | None = None
        self._uds_created = False
        self._http: HttpConnectFrontend | None = None
        self._frontend: NativeGrpcServer | None = None
        self._proxy_servicer: ProxyServicer | None = None
        self.metrics.data_bytes.live = self.board.live_bytes
        self.metrics_page = probes.MetricsPage(self.metrics.render, self.metrics.registry)
        self._probes: list[probes.ProbeServer] = []
        self.health_port_bound = 0
        self.admin_port_bound = 0

    async def start(self) -> None:
        self._start_token_auth()
        await self._start_probes()
        await self._start_agent_listener()
        if self.config.mode == "grpc":
            await self._start_grpc_frontend()
        else:
            await self._start_http_connect_frontend()
        self._start_lease_controller()

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting, end every stream (after `grace` seconds at most), remove the socket.

        Meanwhile the server's Lease is deleted, so agents counting Leases stop looking for it."""
        controller, self.lease_controller = self.lease_controller, None
        http, self._http = self._http, None
        grpc_servers = [server for server in (self._agent_server, self._frontend) if server is not None]
        self._agent_server = self._frontend = None
        await asyncio.gather(
            *(server.stop(grace) for server in grpc_servers), *([http.aclose(grace)] if http else []),
            *([controller.stop()] if controller is not None else []),
        )
        self.board.cancel_timers()
        if self._proxy_servicer is not None:
            self._proxy_servicer.close()
        await self._stop_probes()
        if self.token_auth is not None:
            await self.token_auth.aclose()
            self.token_auth = None
        if self._uds_created:
            remove_uds(self.config.uds_name)
            self._uds_created = False

    def _start_lease_controller(self) -> None:
        """Publish and renew this server's Lease, and cull expired ones (--enable-lease-controller)."""
        if self.config.enable_lease_controller and self.lease_controller is None:
            self.lease_controller = lease_control.build(self.config, self.metrics)
            self.lease_controller.start()

    def _start_token_auth(self) -> None:
        """TokenReview authentication of agents when --agent-namespace is set (unless a hook was given)."""
        c = self.config
        if not c.token_auth or self.authenticate is not None:
            return
        self.token_auth = tokenreview.build(
            policy=AuthPolicy(c.agent_namespace, c.agent_service_account, c.authentication_audience),
            kubeconfig=c.kubeconfig, registry=self.metrics.registry, content_type=c.kube_api_content_type,
            qps=c.kubeconfig_qps, burst=c.kubeconfig_burst, timeout=c.token_review_timeout,
            success_ttl=c.token_review_cache_ttl, failure_ttl=c.token_review_failure_ttl,
            cache_size=c.token_review_cache_size,
        )
        self.authenticate = self.token_auth.authenticator

    async def _start_agent_listener(self) -> None:
        c = self.config
        agents = AgentServicer(self.board, server_id=c.server_id, server_count=c.server_count,
                               authenticate=self.authenticate, flow_control=c.flow_control)
        server = NativeGrpcServer(
            {CONNECT_METHOD: agents.connect, f"/{CONNECTION_SERVICE}/Stream": ConnectionServicer(self.board).stream},
            max_message_bytes=MAX_MESSAGE_BYTES, keepalive_time=c.keepalive_time, name="agent port",
        )
        tls = server_tls_context(c.cluster_cert, c.cluster_key, c.cluster_ca_cert or None, c.tls_min_version,
                                 c.openssl_cipher_list(), alpn="h2")
        self.agent_port = await server.listen_tcp(c.agent_bind_address, c.agent_port, tls)
        self._agent_server = server
        log.info("agent port listening address=%s mtls=%s", grpc_address(c.agent_bind_address, self.agent_port),
                 bool(c.cluster_ca_cert))

    async def _start_grpc_frontend(self) -> None:
        c = self.config
        self._proxy_servicer = ProxyServicer(self.board, max_data_bytes=c.frontend_data_bytes)
        server = NativeGrpcServer(
            {PROXY_METHOD: self._proxy_servicer.proxy},
            max_message_bytes=MAX_MESSAGE_BYTES, keepalive_time=c.frontend_keepalive_time, name="frontend",
        )
        self._frontend = server
        if c.uds_name:
            prepare_uds(c.uds_name, c.delete_existing_uds_file)
            sock = bind_unix(c.uds_name, 0o660 if c.uds_group_access else 0o600)
            try:
                await server.listen_unix(sock)
            except BaseException:
                sock.close()
                raise
            self._uds_created = True
            log.info("frontend listening mode=grpc uds=%s", c.uds_name)
        else:
            tls = server_tls_context(
                c.server_cert, c.server_key, c.server_ca_cert, c.tls_min_version, c.openssl_cipher_list(), alpn="h2"
            )
            self.frontend_port = await server.listen_tcp(c.server_bind_address, c.server_port, tls)
            log.info("frontend listening mode=grpc address=%s mtls=true", grpc_address(c.server_bind_address, self.frontend_port))

    async def _start_http_connect_frontend(self) -> None:
        c = self.config
        tls = None if c.uds_name else server_tls_context(
            c.server_cert, c.server_key, c.server_ca_cert, c.tls_min_version, c.openssl_cipher_list(), alpn="http/1.1"
        )
        self._http = HttpConnectFrontend(
            self.board, header_timeout=c.frontend_header_timeout, tls=tls, stall_limit=c.overflow_wait
        )
        if c.uds_name:
            prepare_uds(c.uds_name, c.delete_existing_uds_file)
            await self._http.listen_unix(c.uds_name, 0o660 if c.uds_group_access else 0o600)
            self._uds_created = True
        else:
            self.frontend_port = await self._http.listen_tcp(c.server_bind_address, c.server_port)

    async def _start_probes(self) -> None:
        """The health listener (/healthz, /readyz, /metrics) and the admin listener (/metrics, /debug)."""
        c = self.config
        health = probes.ProbeServer(
            "health", probes.server_health_routes(self.registry.is_ready, self.metrics_page),
            host=c.health_bind_address, port=c.health_port,
        )
        admin = probes.ProbeServer(
            "admin", probes.server_admin_routes(self.metrics_page, debug.sources(self.board)),
            host=c.admin_bind_address, port=c.admin_port,
        )
        for listener in (health, admin):
            await listener.start()
            self._probes.append(listener)
        self.health_port_bound, self.admin_port_bound = health.port, admin.port

    async def _stop_probes(self) -> None:
        while self._probes:
            await self._probes.pop().aclose()




async def serve(config: ServerConfig) -> int:
    """Run until SIGTERM/SIGINT; a second signal exits at once with status 1."""
    server = ProxyServer(config)
    stopping = asyncio.Event()
    exit_code = 0

    def second() -> None:
        nonlocal exit_code
        exit_code = 1
        os._exit(1)

    with two_stage_signals(stopping.set, second):
        try:
            await server.start()
        except ConfigError as exc:
            log.error("cannot start: %s", exc)
            await server.stop(0)
            return 2
        log.info("proxy-server running server_id=%s server_count=%d", config.server_id, config.server_count)
        await stopping.wait()
        log.info("stopping grace_seconds=%s", config.graceful_shutdown_timeout)
        await server.stop(config.graceful_shutdown_timeout)
    return exit_code
