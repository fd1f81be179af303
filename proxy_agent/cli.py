"""proxy-agent command line: parse flags into an AgentConfig and run the agent.

ROOT. Flag names and defaults are the reference's; Go duration syntax is accepted.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from proxy_agent.config import AgentConfig, default_agent_id
from proxy_common import flags, logs, runtime, tasks


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="proxy-agent",
        description="Konnectivity proxy agent: opens node-side connections for the proxy servers it is connected to.",
        allow_abbrev=False,
    )
    d = AgentConfig(agent_id="x")
    sv = p.add_argument_group("proxy server connection")
    sv.add_argument("--proxy-server-host", default=d.proxy_server_host, help="server address, also the TLS name (default %(default)s)")
    sv.add_argument("--proxy-server-port", type=flags.port, default=d.proxy_server_port, help="server agent port (default %(default)s)")
    sv.add_argument("--proxy-server-addresses", default="",
                    help="comma-separated host:port list of every server, instead of one load-balanced address")
    sv.add_argument("--ca-cert", default=d.ca_cert, help="CA bundle that verifies the server (required)")
    sv.add_argument("--agent-cert", default=d.agent_cert, help="client certificate for mTLS")
    sv.add_argument("--agent-key", default=d.agent_key, help="client key for mTLS")
    sv.add_argument("--alpn-proto", default="", help="accepted for compatibility (grpcio offers h2 only)")
    sv.add_argument("--service-account-token-path", default=d.service_account_token_path,
                    help="token file sent as 'authorization: Bearer', re-read on every connect")
    sv.add_argument("--keepalive-time", type=flags.duration, default=d.keepalive_time, help="keepalive ping interval (default 1h)")
    sv.add_argument("--sync-interval", type=flags.duration, default=d.sync_interval, help="connect loop interval (default 1s)")
    sv.add_argument("--sync-interval-cap", type=flags.duration, default=d.sync_interval_cap, help="back-off cap (default 10s)")
    sv.add_argument("--probe-interval", type=flags.duration, default=d.probe_interval, help="server connection probe period (default 1s)")
    flags.add_bool(sv, "--sync-forever", d.sync_forever, "keep connecting to discover new servers")
    sv.add_argument("--connect-timeout", type=flags.duration, default=d.connect_timeout, help="bound on one connection attempt (default 10s)")
    idn = p.add_argument_group("identity")
    idn.add_argument("--agent-id", default=None, help="ID sent to servers (default $PROXY_AGENT_ID or a random UUID)")
    idn.add_argument("--agent-identifiers", default=d.agent_identifiers,
                     help="URL-query list of ipv4, ipv6, host, cidr, default-route identifiers")
    ep = p.add_argument_group("endpoint connections")
    ep.add_argument("--xfr-channel-size", type=int, default=d.xfr_channel_size, help="per-connection queue length")
    ep.add_argument("--dial-timeout", type=flags.duration, default=d.dial_timeout, help="endpoint dial timeout (default 5s)")
    ep.add_argument("--read-chunk-bytes", type=int, default=d.read_chunk_bytes, help="largest endpoint read, one DATA packet (default 256 KiB)")
    ep.add_argument("--endpoint-buffer-bytes", type=int, default=d.endpoint_buffer_bytes,
                    help="bytes buffered per connection toward a slow endpoint (default 4 MiB)")
    ep.add_argument("--overflow-wait", type=flags.duration, default=d.overflow_wait,
                    help="how long a full endpoint buffer may hold the server stream before that connection is closed")
    flags.add_bool(ep, "--flow-control", d.flow_control,
                   "use one stream per connection with servers that offer it, so a slow reader slows only itself (default true)")
    ep.add_argument("--flow-upgrade-bytes", type=int, default=d.flow_upgrade_bytes,
                    help="with flow control, move a connection onto its own stream once it has carried this many bytes "
                         "(default 64 KiB; 0 = from the dial on)")
    ls = p.add_argument_group("server counting")
    flags.add_bool(ls, "--count-server-leases", d.count_server_leases, "count servers from Leases")
    ls.add_argument("--lease-namespace", default=d.lease_namespace, help="namespace of the server Leases")
    ls.add_argument("--lease-label-selector", "--lease-label", default=d.lease_label_selector, help="label selector of the server Leases")
    ls.add_argument("--server-count-source", default=d.server_count_source, help="default or max")
    ls.add_argument("--lease-list-interval", type=flags.duration, default=d.lease_list_interval,
                    help="how often the server Leases are listed (default 5s; the reference watches them)")
    ls.add_argument("--kubeconfig", default=d.kubeconfig, help="kubeconfig for lease counting; empty = in-cluster")
    ls.add_argument("--kube-api-content-type", default=d.kube_api_content_type, help="API request content type")
    ops = p.add_argument_group("health, admin and lifecycle")
    ops.add_argument("--health-server-host", default=d.health_server_host, help="health bind host (default all)")
    ops.add_argument("--health-server-port", type=flags.port, default=d.health_server_port, help="/healthz /readyz /metrics port")
    ops.add_argument("--admin-server-port", type=flags.port, default=d.admin_server_port, help="admin port")
    ops.add_argument("--admin-bind-address", default=d.admin_bind_address, help="admin bind address")
    ops.add_argument("--drain-grace", type=flags.duration, default=d.drain_grace,
                     help="after the first SIGTERM, how long open connections may finish before the agent exits "
                     "(default 25s: done before the kubelet's default 30s termination grace; 0 = until a second signal)")
    flags.add_compatibility(p, ops, profiling=d.enable_profiling, contention_profiling=d.enable_contention_profiling)
    return p


def config_from_args(args: argparse.Namespace) -> AgentConfig:
    return AgentConfig(
        proxy_server_host=args.proxy_server_host, proxy_server_port=args.proxy_server_port,
        proxy_server_addresses=tuple(a.strip() for a in args.proxy_server_addresses.split(",") if a.strip()),
        ca_cert=args.ca_cert, agent_cert=args.agent_cert, agent_key=args.agent_key,
        alpn_proto=tuple(a for a in args.alpn_proto.split(",") if a),
        service_account_token_path=args.service_account_token_path,
        health_server_host=args.health_server_host, health_server_port=args.health_server_port,
        admin_server_port=args.admin_server_port, admin_bind_address=args.admin_bind_address,
        enable_profiling=args.enable_profiling, enable_contention_profiling=args.enable_contention_profiling,
        agent_id=args.agent_id or default_agent_id(), agent_identifiers=args.agent_identifiers,
        sync_interval=args.sync_interval, sync_interval_cap=args.sync_interval_cap, probe_interval=args.probe_interval,
        keepalive_time=args.keepalive_time, sync_forever=args.sync_forever, xfr_channel_size=args.xfr_channel_size,
        count_server_leases=args.count_server_leases, lease_namespace=args.lease_namespace,
        lease_label_selector=args.lease_label_selector, server_count_source=args.server_count_source,
        lease_list_interval=args.lease_list_interval,
        kubeconfig=args.kubeconfig, kube_api_content_type=args.kube_api_content_type,
        dial_timeout=args.dial_timeout, read_chunk_bytes=args.read_chunk_bytes,
        endpoint_buffer_bytes=args.endpoint_buffer_bytes, overflow_wait=args.overflow_wait,
        drain_grace=args.drain_grace, connect_timeout=args.connect_timeout,
        flow_control=args.flow_control, flow_upgrade_bytes=args.flow_upgrade_bytes,
    )


def parse(argv: Sequence[str] | None = None) -> tuple[AgentConfig, argparse.Namespace]:
    return flags.parse_config(build_parser(), argv, config_from_args)


def main(argv: Sequence[str] | None = None) -> int:
    config, args = parse(argv)
    logs.start_from_flags(args, logging.getLogger("proxy_agent"), ["--alpn-proto"] if config.alpn_proto else [])
    runtime.prepare_process()  # before grpc is imported and starts its threads
    from proxy_agent import app

    return tasks.run(app.serve(config))


if __name__ == "__main__":
    sys.exit(main())
