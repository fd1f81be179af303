"""Pure modules import no I/O: no asyncio, sockets, TLS, clocks, logging or grpc."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PURE = [
    "proxy_common/messages.py",
    "proxy_common/wire.py",
    "proxy_common/errors.py",
    "proxy_common/identifiers.py",
    "proxy_common/metadata.py",
    "proxy_server/router.py",
    "proxy_server/backends.py",
    "proxy_server/config.py",
    "proxy_agent/connections.py",
    "proxy_agent/config.py",
]
FORBIDDEN = {"asyncio", "socket", "ssl", "time", "logging", "grpc", "threading", "prometheus_client", "h11", "kubernetes"}


def imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("module", PURE)
def test_pure_module_does_no_io(module: str) -> None:
    assert not imported_roots(ROOT / module) & FORBIDDEN
