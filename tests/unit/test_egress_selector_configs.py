"""configs/egress-selector/: one EgressSelectorConfiguration per way kube-apiserver can reach
proxy-server, each valid by kube-apiserver's rules and agreeing with the proxy-server flags
its comment documents (parsed by the real command line) and with the other files in configs/.

(tests/integration/test_http_connect.py runs a server with each file's flags and connects
the way kube-apiserver does.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy_server import cli as server_cli
from proxy_server.config import ServerConfig
from tests import manifests as m

EGRESS_DIR = m.CONFIGS / "egress-selector"
FILES = sorted(EGRESS_DIR.glob("*.yaml"))
PROTOCOL_FOR_MODE = {"grpc": "GRPC", "http-connect": "HTTPConnect"}


def documented_flags(path: Path) -> list[str]:
    """The proxy-server flags a file's comment says it needs (the line after '# proxy-server flags')."""
    lines = path.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# proxy-server flags"))
    return lines[start + 1].lstrip("#").split()


def server_config(flags: list[str]) -> ServerConfig:
    return server_cli.config_from_args(server_cli.build_parser().parse_args(flags))


def apiserver_problems(body: dict[str, Any]) -> list[str]:
    """What kube-apiserver's validation of an EgressSelectorConfiguration would refuse here."""
    problems = []
    if body.get("apiVersion") not in ("apiserver.k8s.io/v1beta1", "apiserver.k8s.io/v1"):
        problems.append(f"apiVersion {body.get('apiVersion')!r}")
    if body.get("kind") != "EgressSelectorConfiguration":
        problems.append(f"kind {body.get('kind')!r}")
    for selection in body.get("egressSelections") or [{}]:
        connection = selection.get("connection", {})
        transport = connection.get("transport") or {}
        if len(transport) != 1:
            problems.append(f"exactly one of uds/tcp needed, got {sorted(transport)}")
            continue
        if connection.get("proxyProtocol") == "GRPC" and "tcp" in transport:
            problems.append("GRPC is only supported over uds")
        if "uds" in transport and not str(transport["uds"].get("udsName", "")).startswith("/"):
            problems.append("uds.udsName must be an absolute path")
        if "tcp" in transport:
            tcp = transport["tcp"]
            url, tls = str(tcp.get("url", "")), tcp.get("tlsConfig")
            if url.startswith("https://"):
                if not (tls and tls.get("clientCert") and tls.get("clientKey")):
                    problems.append("https needs tlsConfig.clientCert and tlsConfig.clientKey")
            elif url.startswith("http://"):
                if tls is not None:
                    problems.append("tlsConfig must not be present with http://")
            else:
                problems.append(f"url {url!r}: http:// or https:// only")
    return problems


def flag_mismatches(body: dict[str, Any], config: ServerConfig) -> list[str]:
    """Where the file and the server flags disagree (kube-apiserver could not reach that server)."""
    (selection,) = body["egressSelections"]
    connection = selection["connection"]
    transport = connection["transport"]
    problems = []
    if PROTOCOL_FOR_MODE[config.mode] != connection["proxyProtocol"]:
        problems.append(f"--mode={config.mode} but proxyProtocol {connection['proxyProtocol']}")
    if "uds" in transport:
        if config.uds_name != transport["uds"]["udsName"]:
            problems.append(f"--uds-name={config.uds_name!r} but udsName {transport['uds']['udsName']!r}")
        if config.server_port != 0 or config.server_cert or config.server_key or config.server_ca_cert:
            problems.append("a Unix-socket server takes --server-port=0 and no --server-cert/key/ca-cert")
    else:
        host, _, port = transport["tcp"]["url"].removeprefix("https://").rpartition(":")
        if config.uds_name:
            problems.append("a TCP frontend needs --uds-name empty")
        if (config.server_bind_address, config.server_port) != (host, int(port)):
            problems.append(f"--server-bind-address/--server-port {config.server_bind_address}:{config.server_port}"
                            f" but url {transport['tcp']['url']}")
        if not (config.server_cert and config.server_key and config.server_ca_cert):
            problems.append("a TCP frontend needs --server-cert, --server-key and --server-ca-cert")
    return problems


@pytest.fixture(params=FILES, ids=lambda p: p.stem)
def egress(request: pytest.FixtureRequest) -> tuple[Path, dict[str, Any], ServerConfig]:
    path: Path = request.param
    return path, yaml.safe_load(path.read_text()), server_config(documented_flags(path))


def test_one_file_per_supported_way() -> None:
    ways = set()
    for path in FILES:
        (selection,) = yaml.safe_load(path.read_text())["egressSelections"]
        assert selection["name"] == "cluster"
        ways.add((selection["connection"]["proxyProtocol"], *selection["connection"]["transport"]))
    assert ways == {("GRPC", "uds"), ("HTTPConnect", "uds"), ("HTTPConnect", "tcp")}


def test_kube_apiserver_accepts_it(egress: tuple[Path, dict[str, Any], ServerConfig]) -> None:
    _path, body, _config = egress
    assert apiserver_problems(body) == []


def test_it_matches_the_server_flags_it_documents(egress: tuple[Path, dict[str, Any], ServerConfig]) -> None:
    _path, body, config = egress
    assert flag_mismatches(body, config) == []


def test_its_flags_agree_with_the_server_manifest(egress: tuple[Path, dict[str, Any], ServerConfig]) -> None:
    """Same socket path as configs/konnectivity-server.yaml, and a TCP port that does not
    clash with the manifest's agent, admin and health ports."""
    _path, body, config = egress
    _doc, server = m.only_container(m.SERVER_POD)
    pod = m.flag_values(server["args"])
    transport = body["egressSelections"][0]["connection"]["transport"]
    if "uds" in transport:
        assert config.uds_name == pod["--uds-name"]
    else:
        assert str(config.server_port) not in {pod["--agent-port"], pod["--admin-port"], pod["--health-port"]}


def test_grpc_over_uds_is_the_default_configuration() -> None:
    """configs/egress-selector-configuration.yaml (what the manifests mount) is grpc-uds.yaml."""
    assert yaml.safe_load((EGRESS_DIR / "grpc-uds.yaml").read_text()) == yaml.safe_load(m.EGRESS.read_text())
    _doc, server = m.only_container(m.SERVER_POD)
    assert server_config(documented_flags(EGRESS_DIR / "grpc-uds.yaml")).mode == m.flag_values(server["args"])["--mode"]


def test_the_checks_catch_mistakes() -> None:
    body = yaml.safe_load((EGRESS_DIR / "http-connect-tcp.yaml").read_text())
    config = server_config(documented_flags(EGRESS_DIR / "http-connect-tcp.yaml"))
    wrong_port = server_config([*documented_flags(EGRESS_DIR / "http-connect-tcp.yaml"), "--server-port=9999"])
    assert flag_mismatches(body, wrong_port) == [
        "--server-bind-address/--server-port 127.0.0.1:9999 but url https://127.0.0.1:8131"
    ]
    grpc = server_config([*documented_flags(EGRESS_DIR / "http-connect-tcp.yaml"), "--mode=grpc"])
    assert flag_mismatches(body, grpc) == ["--mode=grpc but proxyProtocol HTTPConnect"]
    uds = yaml.safe_load((EGRESS_DIR / "http-connect-uds.yaml").read_text())
    assert "a TCP frontend needs --uds-name empty" not in flag_mismatches(uds, config)
    assert flag_mismatches(uds, config)[0].startswith("--uds-name=''")
    no_client_cert = yaml.safe_load((EGRESS_DIR / "http-connect-tcp.yaml").read_text())
    del no_client_cert["egressSelections"][0]["connection"]["transport"]["tcp"]["tlsConfig"]["clientCert"]
    assert apiserver_problems(no_client_cert) == ["https needs tlsConfig.clientCert and tlsConfig.clientKey"]
    grpc_tcp = yaml.safe_load((EGRESS_DIR / "http-connect-tcp.yaml").read_text())
    grpc_tcp["egressSelections"][0]["connection"]["proxyProtocol"] = "GRPC"
    assert apiserver_problems(grpc_tcp) == ["GRPC is only supported over uds"]
