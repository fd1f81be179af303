"""proxy-server command line: parse flags into a ServerConfig and run the server.

ROOT. Flag names and defaults are the reference's; Go duration syntax is accepted.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from proxy_common import flags, logs, runtime, tasks
from proxy_server.config import ServerConfig, default_server_id


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="proxy-server",
        description="Konnectivity proxy server: kube-apiserver dials through it to reach nodes via proxy-agents.",
        allow_abbrev=False,
    )
    d = ServerConfig(server_id="x")
    fe = p.add_argument_group("frontend (kube-apiserver side)")
    fe.add_argument("--mode", default=d.mode, help="frontend protocol: grpc or http-connect (default %(default)s)")
    fe.add_argument("--uds-name", default=d.uds_name, help="Unix socket for the frontend; empty = TCP+mTLS frontend")
    flags.add_bool(fe, "--delete-existing-uds-file", d.delete_existing_uds_file,
                   "remove a stale socket at --uds-name before listening (default true)")
    flags.add_bool(fe, "--uds-group-access", d.uds_group_access,
                   "make the socket group read/writable (default: owner only)")
    fe.add_argument("--server-port", type=flags.port, default=d.server_port, help="frontend TCP port; 0 with --uds-name")
    fe.add_argument("--server-bind-address", default=d.server_bind_address, help="frontend bind address (default all)")
    fe.add_argument("--server-cert", default=d.server_cert, help="frontend TLS certificate (TCP frontend)")
    fe.add_argument("--server-key", default=d.server_key, help="frontend TLS key (TCP frontend)")
    fe.add_argument("--server-ca-cert", default=d.server_ca_cert, help="CA for frontend client certificates (required on TCP)")
    fe.add_argument("--frontend-keepalive-time", type=flags.duration, default=d.frontend_keepalive_time,
                    help="keepalive ping interval on frontend streams (default 1h)")
    fe.add_argument("--frontend-buffer-bytes", type=int, default=d.frontend_buffer_bytes,
                    help="bytes buffered per connection toward a slow client (default 4 MiB)")
    fe.add_argument("--frontend-data-bytes", type=int, default=d.frontend_data_bytes,
                    help="largest DATA packet sent to a gRPC client (default 256 KiB). A stock Go client gives a "
                         "tunnel up when its reader leaves a packet unread for 10 s: lower it (e.g. 32768) where "
                         "clients read slower than this many bytes per 10 s; smaller packets cost more CPU")
    fe.add_argument("--overflow-wait", type=flags.duration, default=d.overflow_wait,
                    help="how long a full client buffer may hold an agent stream before that one connection is closed")
    fe.add_argument("--frontend-header-timeout", type=flags.duration, default=d.frontend_header_timeout,
                    help="http-connect: limit on the TLS handshake and on each request head (default 1m)")
    flags.add_bool(fe, "--flow-control", d.flow_control,
                   "offer our agents one stream per connection, so a slow reader slows only itself (default true)")
    fe.add_argument("--stalled-connection-timeout", type=flags.duration, default=d.stalled_connection_timeout,
                    help="close a flow-controlled connection whose client has read nothing for this long; 0 = never")
    ag = p.add_argument_group("agent port")
    ag.add_argument("--agent-port", type=flags.port, default=d.agent_port, help="agent gRPC TLS port (default %(default)s)")
    ag.add_argument("--agent-bind-address", default=d.agent_bind_address, help="agent port bind address (default all)")
    ag.add_argument("--cluster-cert", default=d.cluster_cert, help="agent port TLS certificate")
    ag.add_argument("--cluster-key", default=d.cluster_key, help="agent port TLS key")
    ag.add_argument("--cluster-ca-cert", default=d.cluster_ca_cert, help="CA for agent client certificates (enables mTLS agents)")
    ag.add_argument("--keepalive-time", type=flags.duration, default=d.keepalive_time, help="keepalive ping interval on agent streams")
    ag.add_argument("--cipher-suites", default="", help="comma-separated TLS cipher suites (Go names)")
    ag.add_argument("--tls-min-version", default=d.tls_min_version, help="VersionTLS12 or VersionTLS13 (default TLS 1.2)")
    ag.add_argument("--xfr-channel-size", type=int, default=d.xfr_channel_size, help="per-stream receive queue length")
    ag.add_argument("--backend-dial-timeout", type=flags.duration, default=d.backend_dial_timeout,
                    help="bound on an agent's answer to a dial; 0 = off")
    ha = p.add_argument_group("identity, routing and HA")
    ha.add_argument("--server-id", default=None, help="server ID sent to agents (default $PROXY_SERVER_ID or a random UUID)")
    ha.add_argument("--server-count", type=int, default=d.server_count, help="number of proxy servers agents should reach")
    ha.add_argument("--proxy-strategies", default="default", help="ordered list of default, destHost, defaultRoute")
    flags.add_bool(ha, "--enable-lease-controller", d.enable_lease_controller, "publish and renew a Lease for this server")
    ha.add_argument("--lease-namespace", default=d.lease_namespace, help="namespace of the server Leases")
    ha.add_argument("--lease-label", default=d.lease_label, help="labels put on the server Lease (k=v,...)")
    au = p.add_argument_group("agent authentication")
    au.add_argument("--agent-namespace", default=d.agent_namespace, help="expected service-account namespace; enables token auth")
    au.add_argument("--agent-service-account", default=d.agent_service_account, help="expected service-account name")
    au.add_argument("--authentication-audience", default=d.authentication_audience, help="TokenReview audience")
    au.add_argument("--kubeconfig", default=d.kubeconfig, help="kubeconfig for the Kubernetes API; empty = in-cluster")
    au.add_argument("--kubeconfig-qps", type=float, default=d.kubeconfig_qps, help="API client QPS (0 = default)")
    au.add_argument("--kubeconfig-burst", type=int, default=d.kubeconfig_burst, help="API client burst (0 = default)")
    au.add_argument("--kube-api-content-type", default=d.kube_api_content_type,
                    help="accepted; the Python Kubernetes client always sends JSON")
    au.add_argument("--token-review-cache-ttl", type=flags.duration, default=d.token_review_cache_ttl,
                    help="how long a TokenReview that vouched for a token is reused (capped by the token's expiry; 0 = off)")
    au.add_argument("--token-review-failure-ttl", type=flags.duration, default=d.token_review_failure_ttl,
                    help="how long a TokenReview that refused a token is reused (0 = off)")
    au.add_argument("--token-review-cache-size", type=int, default=d.token_review_cache_size,
                    help="most TokenReview answers kept (least recently used go first)")
    au.add_argument("--token-review-timeout", type=flags.duration, default=d.token_review_timeout,
                    help="bound on one TokenReview; no answer in time refuses the agent")
    ops = p.add_argument_group("health, admin and lifecycle")
    ops.add_argument("--health-port", type=flags.port, default=d.health_port, help="/healthz /readyz /metrics port")
    ops.add_argument("--health-bind-address", default=d.health_bind_address, help="health bind address (default all)")
    ops.add_argument("--admin-port", type=flags.port, default=d.admin_port, help="/metrics and debug port")
    ops.add_argument("--admin-bind-address", default=d.admin_bind_address, help="admin bind address")
    ops.add_argument("--graceful-shutdown-timeout", type=flags.duration, default=d.graceful_shutdown_timeout,
                     help="time open streams get to finish on SIGTERM; 0 = close at once")
    flags.add_compatibility(p, ops, profiling=d.enable_profiling, contention_profiling=d.enable_contention_profiling)
    return p


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        mode=args.mode, uds_name=args.uds_name, delete_existing_uds_file=args.delete_existing_uds_file,
        uds_group_access=args.uds_group_access, server_port=args.server_port,
        server_bind_address=args.server_bind_address, server_cert=args.server_cert, server_key=args.server_key,
        server_ca_cert=args.server_ca_cert, agent_port=args.agent_port, agent_bind_address=args.agent_bind_address,
        cluster_cert=args.cluster_cert, cluster_key=args.cluster_key, cluster_ca_cert=args.cluster_ca_cert,
        admin_port=args.admin_port, admin_bind_address=args.admin_bind_address, health_port=args.health_port,
        health_bind_address=args.health_bind_address, keepalive_time=args.keepalive_time,
        frontend_keepalive_time=args.frontend_keepalive_time,
        server_id=args.server_id or default_server_id(), server_count=args.server_count,
        agent_namespace=args.agent_namespace, agent_service_account=args.agent_service_account,
        authentication_audience=args.authentication_audience, kubeconfig=args.kubeconfig,
        kubeconfig_qps=args.kubeconfig_qps, kubeconfig_burst=args.kubeconfig_burst,
        kube_api_content_type=args.kube_api_content_type,
        token_review_cache_ttl=args.token_review_cache_ttl, token_review_failure_ttl=args.token_review_failure_ttl,
        token_review_cache_size=args.token_review_cache_size, token_review_timeout=args.token_review_timeout,
        proxy_strategies=tuple(s for s in args.proxy_strategies.split(",") if s),
        cipher_suites=tuple(s for s in args.cipher_suites.split(",") if s), tls_min_version=args.tls_min_version,
        xfr_channel_size=args.xfr_channel_size, enable_lease_controller=args.enable_lease_controller,
        lease_namespace=args.lease_namespace, lease_label=args.lease_label,
        graceful_shutdown_timeout=args.graceful_shutdown_timeout, backend_dial_timeout=args.backend_dial_timeout,
        enable_profiling=args.enable_profiling, enable_contention_profiling=args.enable_contention_profiling,
        frontend_buffer_bytes=args.frontend_buffer_bytes, overflow_wait=args.overflow_wait,
        frontend_data_bytes=args.frontend_data_bytes,
        flow_control=args.flow_control, stalled_connection_timeout=args.stalled_connection_timeout,
        frontend_header_timeout=args.frontend_header_timeout,
    )


def parse(argv: Sequence[str] | None = None) -> tuple[ServerConfig, argparse.Namespace]:
    """Parse and validate; exits 2 with every problem listed when the flags are unusable."""
    return flags.parse_config(build_parser(), argv, config_from_args)


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    if words[:1] == ["certs"]:  # a subcommand, dispatched before the server's own flags
        from proxy_server import certs_command

        return certs_command.main(words[1:])
    config, args = parse(words)
    logs.start_from_flags(args, logging.getLogger("proxy_server"))
    runtime.prepare_process()  # before grpc is imported and starts its threads
    from proxy_server import app  # imported late so `--help` stays fast

    return tasks.run(app.serve(config))


if __name__ == "__main__":
    sys.exit(main())
