"""ServerConfig: every proxy-server setting, with the reference's defaults.

DATA. Field names are the reference's flag names in snake_case; durations are seconds.
`validate()` reports every problem at once.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from proxy_common import leases
from proxy_common.errors import ConfigError
from proxy_server.backends import STRATEGIES

MODES = ("grpc", "http-connect")
TLS_VERSIONS = ("", "VersionTLS10", "VersionTLS11", "VersionTLS12", "VersionTLS13")
# --cipher-suites: Go's names of its secure TLS 1.2 suites -> OpenSSL names, applied by both
# TLS listeners (the agent port and the TCP frontend) through Python's ssl.
CIPHER_SUITES = {
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_RSA_WITH_AES_128_GCM_SHA256": "AES128-GCM-SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384": "AES256-GCM-SHA384",
    "TLS_RSA_WITH_AES_128_CBC_SHA": "AES128-SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA": "AES256-SHA",
}
# TLS 1.3 suites are always on (as in Go, where listing them changes nothing).
TLS13_CIPHER_SUITES = ("TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256")


def default_server_id() -> str:
    return os.environ.get("PROXY_SERVER_ID") or str(uuid.uuid4())


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerConfig:
    mode: str = "grpc"
    uds_name: str = ""
    delete_existing_uds_file: bool = True
    uds_group_access: bool = False
    server_port: int = 8090
    server_bind_address: str = ""
    server_cert: str = ""
    server_key: str = ""
    server_ca_cert: str = ""
    agent_port: int = 8091
    agent_bind_address: str = ""
    cluster_cert: str = ""
    cluster_key: str = ""
    cluster_ca_cert: str = ""
    admin_port: int = 8095
    admin_bind_address: str = "127.0.0.1"
    health_port: int = 8092
    health_bind_address: str = ""
    keepalive_time: float = 3600.0
    frontend_keepalive_time: float = 3600.0
    server_id: str = field(default_factory=default_server_id)
    server_count: int = 1
    agent_namespace: str = ""
    agent_service_account: str = ""
    authentication_audience: str = ""
    kubeconfig: str = ""
    kubeconfig_qps: float = 0.0
    kubeconfig_burst: int = 0
    kube_api_content_type: str = "application/vnd.kubernetes.protobuf"
    proxy_strategies: tuple[str, ...] = ("default",)
    cipher_suites: tuple[str, ...] = ()
    tls_min_version: str = ""
    xfr_channel_size: int = 10
    enable_lease_controller: bool = False
    lease_namespace: str = "kube-system"
    lease_label: str = "k8s-app=konnectivity-server"
    graceful_shutdown_timeout: float = 0.0
    backend_dial_timeout: float = 0.0
    enable_profiling: bool = False
    enable_contention_profiling: bool = False
    # Our own settings (no reference equivalent).
    frontend_buffer_bytes: int = 4 << 20
    frontend_data_bytes: int = 256 << 10
    overflow_wait: float = 5.0
    flow_control: bool = True
    stalled_connection_timeout: float = 0.0
    frontend_header_timeout: float = 60.0
    token_review_cache_ttl: float = 120.0
    token_review_failure_ttl: float = 10.0
    token_review_cache_size: int = 10_000
    token_review_timeout: float = 10.0
    # The Lease's timings (the reference's fixed values; tests shorten them).
    lease_duration_seconds: int = leases.LEASE_DURATION_SECONDS
    lease_renew_interval: float = leases.RENEW_INTERVAL_SECONDS
    lease_gc_interval: float = leases.GC_INTERVAL_SECONDS
    lease_api_timeout: float = 10.0

    @property
    def token_auth(self) -> bool:
        return bool(self.agent_namespace)

    def validate(self) -> None:
        problems: list[str] = []
        if self.mode not in MODES:
            problems.append(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.uds_name:
            if self.server_port != 0:
                problems.append("--server-port must be 0 when --uds-name is set")
            if self.server_cert or self.server_key or self.server_ca_cert:
                problems.append("--server-cert/--server-key/--server-ca-cert cannot be used with --uds-name")
        else:
            for flag, value in (("--server-cert", self.server_cert), ("--server-key", self.server_key),
                                ("--server-ca-cert", self.server_ca_cert)):
                if not value:
                    problems.append(f"{flag} is required for the TCP frontend (no --uds-name)")
        for flag, value in (("--cluster-cert", self.cluster_cert), ("--cluster-key", self.cluster_key)):
            if not value:
                problems.append(f"{flag} is required (the agent port always uses TLS)")
        for flag, value in self._files():
            if value and not Path(value).is_file():
                problems.append(f"{flag}: no such file {value!r}")
        problems += self._auth_problems()
        if self.server_count < 0:
            problems.append("--server-count must not be negative")
        if self.xfr_channel_size <= 0:
            problems.append("--xfr-channel-size must be positive")
        if not self.proxy_strategies:
            problems.append("--proxy-strategies must name at least one strategy")
        unknown = [s for s in self.proxy_strategies if s not in STRATEGIES]
        if unknown:
            problems.append(f"unknown --proxy-strategies {unknown}; known: {', '.join(STRATEGIES)}")
        if self.tls_min_version not in TLS_VERSIONS:
            problems.append(f"--tls-min-version must be one of {', '.join(v for v in TLS_VERSIONS if v)}")
        problems += self._tls_problems()
        if self.enable_contention_profiling and not self.enable_profiling:
            problems.append("--enable-contention-profiling requires --enable-profiling")
        if self.frontend_buffer_bytes <= 0:
            problems.append("--frontend-buffer-bytes must be positive")
        if not 1 << 10 <= self.frontend_data_bytes <= (4 << 20) - (1 << 10):
            problems.append("--frontend-data-bytes must be between 1 KiB and 4 MiB - 1 KiB (a Go client's receive limit)")
        if min(self.token_review_cache_ttl, self.token_review_failure_ttl) < 0 or self.token_review_cache_size <= 0:
            problems.append("--token-review-cache-ttl/--token-review-failure-ttl must not be negative and "
                            "--token-review-cache-size must be positive")
        if self.token_review_timeout <= 0:
            problems.append("--token-review-timeout must be positive")
        if self.frontend_header_timeout <= 0:
            problems.append("--frontend-header-timeout must be positive")
        problems += self._lease_problems()
        if problems:
            raise ConfigError(problems)

    def lease_labels(self) -> dict[str, str]:
        """`--lease-label` as a dict (raises LeaseLabelError when it does not parse)."""
        return leases.parse_labels(self.lease_label)

    def _lease_problems(self) -> list[str]:
        if not self.enable_lease_controller:
            return []
        problems = []
        try:
            self.lease_labels()
        except leases.LeaseLabelError as exc:
            problems.append(f"--lease-label: {exc}")
        if not self.lease_namespace:
            problems.append("--lease-namespace must not be empty with --enable-lease-controller")
        name_problem = leases.name_problem(leases.lease_name(self.server_id))
        if name_problem:
            problems.append(f"--server-id {self.server_id!r} cannot name this server's Lease: {name_problem}")
        if self.lease_duration_seconds <= 0 or not 0 < self.lease_renew_interval < self.lease_duration_seconds:
            problems.append("the Lease must be renewed more often than it lasts (0 < renew interval < duration)")
        if self.lease_gc_interval <= 0 or self.lease_api_timeout <= 0:
            problems.append("the Lease garbage collection interval and API timeout must be positive")
        return problems

    def _files(self) -> tuple[tuple[str, str], ...]:
        return (
            ("--server-cert", self.server_cert), ("--server-key", self.server_key),
            ("--server-ca-cert", self.server_ca_cert), ("--cluster-cert", self.cluster_cert),
            ("--cluster-key", self.cluster_key), ("--cluster-ca-cert", self.cluster_ca_cert),
            ("--kubeconfig", self.kubeconfig),
        )

    def openssl_cipher_list(self) -> str:
        """`--cipher-suites` as the OpenSSL cipher list grpcio takes (TLS 1.2 suites only)."""
        names = dict.fromkeys(CIPHER_SUITES[s] for s in self.cipher_suites if s in CIPHER_SUITES)
        return ":".join(names)

    def _tls_problems(self) -> list[str]:
        problems = []
        unknown = [s for s in self.cipher_suites if s not in CIPHER_SUITES and s not in TLS13_CIPHER_SUITES]
        if unknown:
            problems.append(f"--cipher-suites: {', '.join(unknown)} not allowed (weak or unknown); "
                            f"allowed: {', '.join([*CIPHER_SUITES, *TLS13_CIPHER_SUITES])}")
        elif self.cipher_suites and not self.openssl_cipher_list() and self.tls_min_version != "VersionTLS13":
            problems.append("--cipher-suites names only TLS 1.3 suites, which are always on (as in Go): name at "
                            "least one TLS 1.2 suite, or use --tls-min-version=VersionTLS13 to turn TLS 1.2 off")
        return problems

    def _auth_problems(self) -> list[str]:
        given = [self.agent_namespace, self.agent_service_account, self.authentication_audience]
        if any(given) and not all(given):
            return ["--agent-namespace, --agent-service-account and --authentication-audience go together"]
        if all(given) and self.cluster_ca_cert:
            return ["token authentication (--agent-namespace) and --cluster-ca-cert are exclusive"]
        return []
