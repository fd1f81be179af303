"""Both command lines accept the reference's flags, defaults and syntax."""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

import pytest

from proxy_agent import cli as agent_cli
from proxy_agent.config import AgentConfig
from proxy_common import logs
from proxy_common.flags import duration
from proxy_server import cli as server_cli
from proxy_server.config import ServerConfig


@pytest.mark.parametrize(("text", "seconds"), [("1h0m0s", 3600.0), ("5s", 5.0), ("500ms", 0.5), ("1m30s", 90.0), ("0", 0.0), ("2.5", 2.5)])
def test_go_durations(text: str, seconds: float) -> None:
    assert duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "5x", "1h5", "s"])
def test_bad_durations(bad: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        duration(bad)


def test_server_defaults_are_the_references() -> None:
    args = server_cli.build_parser().parse_args([])
    assert (args.mode, args.server_port, args.agent_port, args.health_port, args.admin_port) == ("grpc", 8090, 8091, 8092, 8095)
    assert (args.admin_bind_address, args.keepalive_time, args.server_count, args.xfr_channel_size) == ("127.0.0.1", 3600.0, 1, 10)
    assert args.delete_existing_uds_file is True
    assert args.proxy_strategies == "default"


def test_agent_defaults_are_the_references() -> None:
    args = agent_cli.build_parser().parse_args([])
    assert (args.proxy_server_host, args.proxy_server_port, args.health_server_port, args.admin_server_port) == ("127.0.0.1", 8091, 8093, 8094)
    assert (args.sync_interval, args.sync_interval_cap, args.probe_interval, args.xfr_channel_size) == (1.0, 10.0, 1.0, 150)


def test_kubernetes_docs_server_args_parse(tmp_path) -> None:
    cert = tmp_path / "c"
    cert.write_text("x")
    config, _ = server_cli.parse([
        "--logtostderr=true", "--uds-name=/etc/kubernetes/konnectivity-server/konnectivity-server.socket",
        "--delete-existing-uds-file", f"--cluster-cert={cert}", f"--cluster-key={cert}", "--mode=grpc",
        "--server-port=0", "--agent-port=8132", "--admin-port=8133", "--health-port=8134",
        "--agent-namespace=kube-system", "--agent-service-account=konnectivity-agent",
        f"--kubeconfig={cert}", "--authentication-audience=system:konnectivity-server", "--keepalive-time=1h", "-v=5",
    ])
    assert config.agent_port == 8132 and config.token_auth and config.keepalive_time == 3600.0


def test_server_reports_every_problem_at_once(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        server_cli.parse(["--mode=socks", "--uds-name=/tmp/x.sock", "--server-port=8090", "--proxy-strategies=nearest"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    for fragment in ("--mode must be one of", "--server-port must be 0", "--cluster-cert is required", "unknown --proxy-strategies"):
        assert fragment in err


def test_flags_outside_the_reference_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        server_cli.build_parser().parse_args(["--no-such-flag=1"])
    assert "unrecognized arguments" in capsys.readouterr().err


def test_agent_refuses_unknown_identifier_keys(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    ca = tmp_path / "ca"
    ca.write_text("x")
    with pytest.raises(SystemExit):
        agent_cli.parse([f"--ca-cert={ca}", "--agent-identifiers=uid=5"])
    assert "agent address is invalid: unknown address type: uid" in capsys.readouterr().err


def test_agent_id_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    ca = tmp_path / "ca"
    ca.write_text("x")
    monkeypatch.setenv("PROXY_AGENT_ID", "node-7")
    config, _ = agent_cli.parse([f"--ca-cert={ca}", "--sync-interval=5s", "--sync-interval-cap=30s", "--probe-interval=5s"])
    assert config.agent_id == "node-7"
    assert (config.sync_interval, config.sync_interval_cap) == (5.0, 30.0)


def test_agent_cli_defaults_are_the_config_defaults(tmp_path) -> None:
    """AgentConfig is the single source of defaults: no flag may quietly differ from its field."""
    ca = tmp_path / "ca"
    ca.write_text("x")
    config, _ = agent_cli.parse([f"--ca-cert={ca}", "--agent-id=node-1"])
    expected = AgentConfig(ca_cert=str(ca), agent_id="node-1")
    differing = {f.name for f in dataclasses.fields(AgentConfig) if getattr(config, f.name) != getattr(expected, f.name)}
    assert differing == set()
    assert config.drain_grace == 25.0  # finishes before the kubelet's default 30 s termination grace


def test_server_cli_defaults_are_the_config_defaults() -> None:
    config = server_cli.config_from_args(server_cli.build_parser().parse_args(["--server-id=s1"]))
    expected = ServerConfig(server_id="s1")
    differing = {f.name for f in dataclasses.fields(ServerConfig) if getattr(config, f.name) != getattr(expected, f.name)}
    assert differing == set()


def test_agent_refuses_a_negative_drain_grace(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    ca = tmp_path / "ca"
    ca.write_text("x")
    with pytest.raises(SystemExit):
        agent_cli.parse([f"--ca-cert={ca}", "--drain-grace=-5s"])
    assert "--drain-grace must not be negative" in capsys.readouterr().err


def test_flags_without_effect_are_named_once_at_start(tmp_path: Path) -> None:
    log_file, ca = tmp_path / "agent.log", tmp_path / "ca"
    ca.write_text("x")
    config, args = agent_cli.parse([
        f"--ca-cert={ca}", "--logtostderr=false", f"--log-file={log_file}", "--vmodule=x=5",
        "--warn-on-channel-limit", "--enable-profiling", "--alpn-proto=h2",
    ])
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        logs.start_from_flags(args, logging.getLogger("proxy_agent"), ["--alpn-proto"] if config.alpn_proto else [])
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers[:], root.level = saved
    (line,) = log_file.read_text().splitlines()  # the honoured klog flags are not named
    assert line.endswith(" I proxy_agent: flags accepted for compatibility, without effect here "
                         "flags=--vmodule,--warn-on-channel-limit,--enable-profiling,--alpn-proto")
