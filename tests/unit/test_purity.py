"""Pure modules import no I/O: no asyncio, sockets, TLS, clocks, logging or grpc."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("proxy_common", "proxy_server", "proxy_agent")
PURE = [
    "proxy_common/messages.py",
    "proxy_common/wire.py",
    "proxy_common/errors.py",
    "proxy_common/identifiers.py",
    "proxy_common/metadata.py",
    "proxy_common/leases.py",
    "proxy_server/router.py",
    "proxy_server/backends.py",
    "proxy_server/config.py",
    "proxy_server/auth.py",
    "proxy_server/http_responses.py",
    "proxy_server/h2_core.py",
    "proxy_agent/connections.py",
    "proxy_agent/config.py",
]
FORBIDDEN = {"asyncio", "socket", "ssl", "time", "logging", "grpc", "threading", "prometheus_client", "h11", "kubernetes"}
PURE_CONTRACT = "Decision-making modules do no I/O"


def imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def marked_pure() -> set[str]:
    """Modules whose docstring declares them PURE (the house style's marker)."""
    found = set()
    for package in PACKAGES:
        for path in sorted((ROOT / package).glob("*.py")):
            docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
            if docstring.startswith("PURE") or "\n\nPURE" in docstring:
                found.add(path.relative_to(ROOT).as_posix())
    return found


def contract_modules() -> set[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for contract in config["tool"]["importlinter"]["contracts"]:
        if contract["name"] == PURE_CONTRACT:
            return {name.replace(".", "/") + ".py" for name in contract["source_modules"]}
    raise AssertionError(f"pyproject.toml has no import-linter contract named {PURE_CONTRACT!r}")


@pytest.mark.parametrize("module", PURE)
def test_pure_module_does_no_io(module: str) -> None:
    assert not imported_roots(ROOT / module) & FORBIDDEN


def test_every_module_marked_pure_is_checked_here_and_by_import_linter() -> None:
    marked = marked_pure()
    assert marked, "no module carries the PURE marker: the discovery is broken"
    assert marked - set(PURE) == set(), "add these PURE modules to PURE in this file"
    assert marked - contract_modules() == set(), f"add these PURE modules to the {PURE_CONTRACT!r} contract"


def test_the_import_linter_contract_and_this_list_agree() -> None:
    assert contract_modules() == set(PURE)
