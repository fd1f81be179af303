"""AgentConfig: every proxy-agent setting, with the reference's defaults.

DATA. Field names are the reference's flag names in snake_case; durations are seconds.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from proxy_common import identifiers
from proxy_common.errors import ConfigError


def default_agent_id() -> str:
    return os.environ.get("PROXY_AGENT_ID") or str(uuid.uuid4())


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentConfig:
    proxy_server_host: str = "127.0.0.1"
    proxy_server_port: int = 8091
    proxy_server_addresses: tuple[str, ...] = ()
    ca_cert: str = ""
    agent_cert: str = ""
    agent_key: str = ""
    alpn_proto: tuple[str, ...] = ()
    service_account_token_path: str = ""
    health_server_host: str = ""
    health_server_port: int = 8093
    admin_server_port: int = 8094
    admin_bind_address: str = "127.0.0.1"
    enable_profiling: bool = False
    enable_contention_profiling: bool = False
    agent_id: str = field(default_factory=default_agent_id)
    agent_identifiers: str = ""
    sync_interval: float = 1.0
    sync_interval_cap: float = 10.0
    probe_interval: float = 1.0
    keepalive_time: float = 3600.0
    sync_forever: bool = False
    xfr_channel_size: int = 150
    count_server_leases: bool = False
    lease_namespace: str = "kube-system"
    lease_label_selector: str = "k8s-app=konnectivity-server"
    server_count_source: str = "default"
    kubeconfig: str = ""
    kube_api_content_type: str = "application/vnd.kubernetes.protobuf"
    # Our own settings (no reference equivalent).
    dial_timeout: float = 5.0
    read_chunk_bytes: int = 256 << 10
    endpoint_buffer_bytes: int = 4 << 20
    overflow_wait: float = 5.0
    # After the first SIGTERM, how long open connections may finish (0 = until a second signal);
    # 25 s ends before the kubelet's default 30 s termination grace period.
    drain_grace: float = 25.0
    connect_timeout: float = 10.0
    flow_control: bool = True
    # With flow control: a connection moves onto its own stream once it has carried this many
    # bytes (both directions together); 0 = its own stream from the dial on.
    flow_upgrade_bytes: int = 64 << 10
    lease_list_interval: float = 5.0
    lease_api_timeout: float = 10.0

    def server_targets(self) -> tuple[tuple[str, int], ...]:
        """(host, port) of every server address to keep a stream to."""
        if not self.proxy_server_addresses:
            return ((self.proxy_server_host, self.proxy_server_port),)
        targets = []
        for item in self.proxy_server_addresses:
            host, _, port = item.rpartition(":")
            targets.append((host.strip("[]"), int(port)))
        return tuple(targets)

    def validate(self) -> None:
        problems: list[str] = []
        if not self.ca_cert:
            problems.append("--ca-cert is required (the server's certificate is always verified)")
        if bool(self.agent_cert) != bool(self.agent_key):
            problems.append("--agent-cert and --agent-key go together")
        for flag, value in (("--ca-cert", self.ca_cert), ("--agent-cert", self.agent_cert),
                            ("--agent-key", self.agent_key), ("--kubeconfig", self.kubeconfig)):
            if value and not Path(value).is_file():
                problems.append(f"{flag}: no such file {value!r}")
        if self.proxy_server_port <= 0:
            problems.append("--proxy-server-port must be positive")
        for item in self.proxy_server_addresses:
            host, sep, port = item.rpartition(":")
            if not sep or not host or not port.isdigit():
                problems.append(f"--proxy-server-addresses: {item!r} is not host:port")
        try:
            identifiers.parse(self.agent_identifiers, strict=True)
        except identifiers.IdentifierError as exc:
            problems.append(f"agent address is invalid: {exc}")
        if self.sync_interval <= 0 or self.sync_interval > self.sync_interval_cap:
            problems.append("--sync-interval must be positive and not above --sync-interval-cap")
        if self.probe_interval <= 0:
            problems.append("--probe-interval must be positive")
        if self.xfr_channel_size <= 0:
            problems.append("--xfr-channel-size must be positive")
        if self.lease_list_interval <= 0 or self.lease_api_timeout <= 0:
            problems.append("--lease-list-interval and the lease API timeout must be positive")
        if self.count_server_leases and not self.lease_namespace:
            problems.append("--lease-namespace must not be empty with --count-server-leases")
        if self.server_count_source not in ("", "default", "max"):
            problems.append("--server-count-source must be default or max")
        if self.read_chunk_bytes < 4096 or self.read_chunk_bytes > (4 << 20) - 1024:
            problems.append("--read-chunk-bytes must be between 4096 and just under 4 MiB")
        if self.flow_upgrade_bytes < 0 or self.flow_upgrade_bytes > self.endpoint_buffer_bytes:
            problems.append("--flow-upgrade-bytes must be between 0 and --endpoint-buffer-bytes")
        if self.drain_grace < 0:
            problems.append("--drain-grace must not be negative (0 waits for a second signal)")
        if problems:
            raise ConfigError(problems)
