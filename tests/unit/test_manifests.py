"""configs/ is what an operator applies: every document must be a valid Kubernetes object,
every container's args must be accepted by our real command lines, and the pieces must
agree with each other (ports, paths, names, audiences) the way the documentation's do.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from kubernetes import client as k8s

from proxy_agent import cli as agent_cli
from proxy_common.errors import ConfigError
from proxy_server import cli as server_cli
from tests import manifests as m

SA_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"  # mounted by the kubelet, not listed
EGRESS_KINDS = {"EgressSelectorConfiguration"}

# The args of the Kubernetes documentation's "Set up Konnectivity service" manifests
# (the server's in both revisions, with and without --delete-existing-uds-file), and the
# extra flags the reference's own examples and e2e templates use.
DOCS_SERVER_ARGS = [
    "--logtostderr=true", "--uds-name=/etc/kubernetes/konnectivity-server/konnectivity-server.socket",
    "--delete-existing-uds-file", "--cluster-cert=/etc/kubernetes/pki/apiserver.crt",
    "--cluster-key=/etc/kubernetes/pki/apiserver.key", "--mode=grpc", "--server-port=0", "--agent-port=8132",
    "--admin-port=8133", "--health-port=8134", "--agent-namespace=kube-system",
    "--agent-service-account=konnectivity-agent", "--kubeconfig=/etc/kubernetes/konnectivity-server.conf",
    "--authentication-audience=system:konnectivity-server",
]
DOCS_AGENT_ARGS = [
    "--logtostderr=true", "--ca-cert=/var/run/secrets/kubernetes.io/serviceaccount/ca.crt",
    "--proxy-server-host=35.225.206.7", "--proxy-server-port=8132", "--admin-server-port=8133",
    "--health-server-port=8134", "--service-account-token-path=/var/run/secrets/tokens/konnectivity-agent-token",
]
REFERENCE_EXAMPLE_SERVER_ARGS = [
    "--keepalive-time=1h", "--mode=http-connect", "--log-file=/var/log/konnectivity-server.log",
    "--log-file-max-size=0", "--logtostderr=false", "--alsologtostderr", "--v=5", "--admin-bind-address=",
    "--enable-lease-controller", "--lease-namespace=kube-system", "--lease-label=k8s-app=konnectivity-server",
    "--server-count=3", "--server-id=server-1", "--proxy-strategies=destHost,default",
    "--graceful-shutdown-timeout=10s", "--backend-dial-timeout=5s", "--xfr-channel-size=10",
]
REFERENCE_EXAMPLE_AGENT_ARGS = [
    "--agent-identifiers=ipv4=10.0.0.5", "--sync-interval=5s", "--sync-interval-cap=30s", "--probe-interval=5s",
    "--sync-forever", "--count-server-leases", "--lease-namespace=kube-system",
    "--lease-label-selector=k8s-app=konnectivity-server", "--server-count-source=max", "--admin-bind-address=",
    "--log-file=/var/log/konnectivity-agent.log", "--log-file-max-size=0", "--logtostderr=false", "--v=5",
    "--agent-id=agent-1", "--keepalive-time=1h", "--xfr-channel-size=150",
]


# ------------------------------------------------------------------ every document
def model_name(body: dict[str, Any]) -> str:
    version = str(body["apiVersion"]).rsplit("/", 1)[-1]
    return version[0].upper() + version[1:] + str(body["kind"])


def build_model(body: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The kubernetes client's model for a document, and that model serialised back."""
    name = model_name(body)
    assert hasattr(k8s, name), f"no kubernetes client model {name}"
    with k8s.ApiClient() as api:
        model = api._ApiClient__deserialize(body, name)  # type: ignore[attr-defined]
        return model, api.sanitize_for_serialization(model)


def test_configs_hold_the_expected_files() -> None:
    names = {p.name for p in m.yaml_files()}
    assert {m.SERVER_POD.name, m.AGENT_DAEMONSET.name, m.RBAC.name, m.EGRESS.name, m.APISERVER_PATCH.name} <= names


@pytest.mark.parametrize("doc", [d for d in m.documents() if d.kind not in EGRESS_KINDS], ids=str)
def test_document_builds_its_kubernetes_model_without_losing_a_field(doc: m.Document) -> None:
    model, round_trip = build_model(doc.body)
    assert type(model).__name__ == model_name(doc.body)
    # The client drops fields it does not know; a misspelt field would vanish here.
    assert round_trip == doc.body


def check_egress(body: dict[str, Any]) -> list[str]:
    """kube-apiserver's rules for an EgressSelectorConfiguration (apiserver.k8s.io)."""
    problems = []
    if body.get("apiVersion") not in ("apiserver.k8s.io/v1beta1", "apiserver.k8s.io/v1alpha1", "apiserver.k8s.io/v1"):
        problems.append(f"apiVersion {body.get('apiVersion')!r}")
    problems += [f"unknown key {k}" for k in set(body) - {"apiVersion", "kind", "egressSelections"}]
    names = [s.get("name") for s in body.get("egressSelections", [])]
    if not names or len(set(names)) != len(names) or not set(names) <= {"cluster", "controlplane", "etcd", "master"}:
        problems.append(f"selection names {names}")
    for selection in body.get("egressSelections", []):
        problems += [f"unknown key {k}" for k in set(selection) - {"name", "connection"}]
        connection = selection.get("connection", {})
        protocol, transport = connection.get("proxyProtocol"), connection.get("transport")
        problems += [f"unknown key {k}" for k in set(connection) - {"proxyProtocol", "transport"}]
        if protocol not in ("GRPC", "HTTPConnect", "Direct"):
            problems.append(f"proxyProtocol {protocol!r}")
        if protocol == "Direct":
            if transport:
                problems.append("Direct takes no transport")
            continue
        if not isinstance(transport, dict) or len(transport) != 1 or not set(transport) <= {"uds", "tcp"}:
            problems.append(f"{protocol} needs exactly one of uds/tcp, got {transport!r}")
            continue
        if "uds" in transport:
            if set(transport["uds"]) != {"udsName"} or not str(transport["uds"]["udsName"]).startswith("/"):
                problems.append(f"uds {transport['uds']!r}")
        else:
            tcp = transport["tcp"]
            if protocol == "GRPC":
                problems.append("kube-apiserver refuses GRPC over tcp")
            if not set(tcp) <= {"url", "tlsConfig"} or not str(tcp.get("url", "")).startswith(("https://", "http://")):
                problems.append(f"tcp {tcp!r}")
            if not set(tcp.get("tlsConfig") or {}) <= {"caBundle", "clientKey", "clientCert"}:
                problems.append(f"tlsConfig {tcp.get('tlsConfig')!r}")
    return problems


@pytest.mark.parametrize("doc", [d for d in m.documents() if d.kind in EGRESS_KINDS], ids=str)
def test_egress_selector_configuration_is_valid(doc: m.Document) -> None:
    assert check_egress(doc.body) == []


def test_egress_checker_catches_mistakes() -> None:
    good = m.documents(m.EGRESS)[0].body
    bad_transport = {**good, "egressSelections": [{"name": "cluster", "connection": {
        "proxyProtocol": "GRPC", "transport": {"tcp": {"url": "https://x:8131"}}}}]}
    assert check_egress(bad_transport) == ["kube-apiserver refuses GRPC over tcp"]
    typo = {**good, "egressSelection": []}
    assert "unknown key egressSelection" in check_egress(typo)


# --------------------------------------------------------- containers and their args
def proxy_containers() -> list[tuple[m.Document, dict[str, Any]]]:
    found = []
    for doc in m.documents():
        if doc.kind in ("Pod", "DaemonSet", "Deployment"):
            found += [(doc, c) for c in m.containers(doc) if c.get("command", [""])[0] in ("/proxy-server", "/proxy-agent")]
    return found


def mount_paths(doc: m.Document, container: dict[str, Any]) -> list[PurePosixPath]:
    paths = [PurePosixPath(v["mountPath"]) for v in container.get("volumeMounts", [])]
    if m.pod_spec(doc).get("automountServiceAccountToken", True):
        paths.append(PurePosixPath(SA_MOUNT))
    return paths


def under_a_mount(path: str, mounts: list[PurePosixPath]) -> bool:
    target = PurePosixPath(path)
    return any(target == mount or mount in target.parents for mount in mounts)


def validate_with_mounts(config: Any, mounts: list[PurePosixPath]) -> list[str]:
    """validate()'s problems, except files that live in the container's volume mounts."""
    try:
        config.validate()
    except ConfigError as exc:
        return [p for p in exc.problems
                if not ((found := re.search(r"no such file '(.+)'", p)) and under_a_mount(found.group(1), mounts))]
    return []


def test_there_is_one_server_and_one_agent_container() -> None:
    commands = sorted(c["command"][0] for _doc, c in proxy_containers())
    assert commands == ["/proxy-agent", "/proxy-server"]


@pytest.mark.parametrize(("doc", "container"), proxy_containers(), ids=lambda x: x["name"] if isinstance(x, dict) else str(x))
def test_container_args_are_accepted_by_the_real_command_line(doc: m.Document, container: dict[str, Any]) -> None:
    cli = server_cli if container["command"] == ["/proxy-server"] else agent_cli
    args = cli.build_parser().parse_args(container["args"])
    config = cli.config_from_args(args)
    assert validate_with_mounts(config, mount_paths(doc, container)) == []


def test_file_paths_outside_the_mounts_are_caught() -> None:
    doc, container = m.only_container(m.SERVER_POD)
    args = m.rewrite(container["args"], {"--cluster-cert": "/etc/elsewhere/apiserver.crt"})
    config = server_cli.config_from_args(server_cli.build_parser().parse_args(args))
    problems = validate_with_mounts(config, mount_paths(doc, container))
    assert problems == ["--cluster-cert: no such file '/etc/elsewhere/apiserver.crt'"]


@pytest.mark.parametrize("args", [DOCS_SERVER_ARGS, DOCS_SERVER_ARGS[:2] + DOCS_SERVER_ARGS[3:], REFERENCE_EXAMPLE_SERVER_ARGS],
                         ids=["docs", "docs-older", "reference-examples"])
def test_every_documented_server_flag_is_accepted(args: list[str]) -> None:
    server_cli.build_parser().parse_args(args)


@pytest.mark.parametrize("args", [DOCS_AGENT_ARGS, REFERENCE_EXAMPLE_AGENT_ARGS], ids=["docs", "reference-examples"])
def test_every_documented_agent_flag_is_accepted(args: list[str]) -> None:
    agent_cli.build_parser().parse_args(args)


def test_our_manifests_keep_every_documented_flag_and_value() -> None:
    _doc, server = m.only_container(m.SERVER_POD)
    _doc, agent = m.only_container(m.AGENT_DAEMONSET)
    ours_server, ours_agent = m.flag_values(server["args"]), m.flag_values(agent["args"])
    assert m.flag_values(DOCS_SERVER_ARGS).items() <= ours_server.items()
    docs_agent = {k: v for k, v in m.flag_values(DOCS_AGENT_ARGS).items() if k != "--proxy-server-host"}
    assert docs_agent.items() <= ours_agent.items()


# ------------------------------------------------------------- the pieces agree
def test_server_pod_is_a_control_plane_static_pod() -> None:
    doc, c = m.only_container(m.SERVER_POD)
    spec, flags = m.pod_spec(doc), m.flag_values(c["args"])
    assert doc.kind == "Pod" and doc.body["metadata"]["namespace"] == "kube-system"
    assert spec["hostNetwork"] is True and spec["priorityClassName"] == "system-cluster-critical"
    assert c["image"].startswith("ghcr.io/konnectivity-py/proxy-server:")
    probe = c["livenessProbe"]["httpGet"]
    assert (probe["host"], str(probe["port"]), probe["path"]) == ("127.0.0.1", flags["--health-port"], "/healthz")
    assert c["resources"]["requests"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"agentport": int(flags["--agent-port"]), "adminport": int(flags["--admin-port"]),
                     "healthport": int(flags["--health-port"])}
    volumes = {v["name"]: v for v in spec["volumes"]}
    uds_dir = str(PurePosixPath(flags["--uds-name"]).parent)
    (uds_mount,) = [v for v in c["volumeMounts"] if v["mountPath"] == uds_dir]
    assert volumes[uds_mount["name"]]["hostPath"] == {"path": uds_dir, "type": "DirectoryOrCreate"}


def test_agent_daemonset_matches_the_server() -> None:
    _sdoc, server = m.only_container(m.SERVER_POD)
    adoc, agent = m.only_container(m.AGENT_DAEMONSET)
    sflags, aflags, spec = m.flag_values(server["args"]), m.flag_values(agent["args"]), m.pod_spec(adoc)
    assert adoc.kind == "DaemonSet" and agent["image"].startswith("ghcr.io/konnectivity-py/proxy-agent:")
    assert aflags["--proxy-server-port"] == sflags["--agent-port"]
    assert spec["serviceAccountName"] == sflags["--agent-service-account"]
    assert adoc.body["metadata"]["namespace"] == sflags["--agent-namespace"]
    assert {"key": "CriticalAddonsOnly", "operator": "Exists"} in spec["tolerations"]
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = agent[probe]["httpGet"]
        assert (str(get["port"]), get["path"]) == (aflags["--health-server-port"], path)
    token = PurePosixPath(aflags["--service-account-token-path"])
    (mount,) = [v for v in agent["volumeMounts"] if v["mountPath"] == str(token.parent)]
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    (source,) = volume["projected"]["sources"]
    assert source["serviceAccountToken"] == {"path": token.name, "audience": sflags["--authentication-audience"]}
    assert agent["securityContext"]["runAsNonRoot"] is True


def test_rbac_grants_what_the_server_and_agents_need() -> None:
    docs = {(d.kind, d.body["metadata"]["name"]): d.body for d in m.documents(m.RBAC)}
    delegator = docs[("ClusterRoleBinding", "system:konnectivity-server")]
    assert delegator["roleRef"]["name"] == "system:auth-delegator"
    assert delegator["subjects"] == [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User",
                                      "name": "system:konnectivity-server"}]
    _doc, server = m.only_container(m.SERVER_POD)
    flags = m.flag_values(server["args"])
    account = docs[("ServiceAccount", flags["--agent-service-account"])]
    assert account["metadata"]["namespace"] == flags["--agent-namespace"]
    reader = docs[("ClusterRole", "system:konnectivity-agent")]
    assert reader["rules"] == [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                                "verbs": ["get", "list", "watch"]}]


def test_apiserver_side_matches_the_server() -> None:
    _doc, server = m.only_container(m.SERVER_POD)
    flags = m.flag_values(server["args"])
    (selection,) = m.documents(m.EGRESS)[0].body["egressSelections"]
    assert selection["name"] == "cluster"
    assert selection["connection"]["proxyProtocol"] == {"grpc": "GRPC", "http-connect": "HTTPConnect"}[flags["--mode"]]
    assert selection["connection"]["transport"]["uds"]["udsName"] == flags["--uds-name"]
    _patch_doc, apiserver = m.only_container(m.APISERVER_PATCH)
    config_flag = m.flag_values(apiserver["command"][1:])["--egress-selector-config-file"]
    mounts = [PurePosixPath(v["mountPath"]) for v in apiserver["volumeMounts"]]
    assert under_a_mount(config_flag, mounts)
    assert under_a_mount(flags["--uds-name"], mounts)
    assert Path(config_flag).name == m.EGRESS.name
