"""The .proto files keep the reference's wire identity, and the generated code is fresh."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from proxy_common.pb import agent_pb2, client_pb2

ROOT = Path(__file__).resolve().parents[2]


def test_no_package_so_method_paths_are_the_references() -> None:
    for name in ("client.proto", "agent.proto"):
        lines = (ROOT / "proto" / name).read_text().splitlines()
        assert not [line for line in lines if line.strip().startswith("package")]
    proxy = client_pb2.DESCRIPTOR.services_by_name["ProxyService"].methods_by_name["Proxy"]
    connect = agent_pb2.DESCRIPTOR.services_by_name["AgentService"].methods_by_name["Connect"]
    assert f"/{proxy.containing_service.full_name}/{proxy.name}" == "/ProxyService/Proxy"
    assert f"/{connect.containing_service.full_name}/{connect.name}" == "/AgentService/Connect"
    assert proxy.client_streaming and proxy.server_streaming
    assert connect.input_type.full_name == "Packet"


def test_field_numbers_match_the_reference() -> None:
    packet = client_pb2.Packet.DESCRIPTOR
    assert {f.name: f.number for f in packet.fields} == {
        "type": 1, "dialRequest": 2, "dialResponse": 3, "data": 4,
        "closeRequest": 5, "closeResponse": 6, "closeDial": 7, "drain": 8,
    }
    assert [f.name for f in packet.oneofs_by_name["payload"].fields] == [
        "dialRequest", "dialResponse", "data", "closeRequest", "closeResponse", "closeDial", "drain",
    ]
    assert dict(client_pb2.PacketType.items()) == {
        "DIAL_REQ": 0, "DIAL_RSP": 1, "CLOSE_REQ": 2, "CLOSE_RSP": 3, "DATA": 4, "DIAL_CLS": 5, "DRAIN": 6,
    }


def test_generated_modules_are_up_to_date() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
