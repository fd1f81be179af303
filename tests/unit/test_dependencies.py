"""Every third-party import is declared in pyproject.toml, in the extra that installs it.

Runtime packages need `[project] dependencies`; tests and scripts may also use the `dev`
extra, benchmarks the `bench` extra. A missing declaration works on a developer's machine
and breaks `pip install` of the wheel or a fresh image, so it is caught here.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LOCAL = {"proxy_common", "proxy_server", "proxy_agent", "tests", "bench", "scripts"}
SCOPES = {  # directory -> the requirement lists it may rely on
    "proxy_common": ("runtime",),
    "proxy_server": ("runtime",),
    "proxy_agent": ("runtime",),
    "tests": ("runtime", "dev"),
    "scripts": ("runtime", "dev"),
    "bench": ("runtime", "dev", "bench"),
}


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> dict[str, set[str]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lists = {"runtime": project["dependencies"], **project["optional-dependencies"]}
    return {scope: {normalized(re.match(r"[A-Za-z0-9_.-]+", req).group()) for req in reqs}  # type: ignore[union-attr]
            for scope, reqs in lists.items()}


def third_party_imports(directory: str) -> dict[str, str]:
    """Top-level module imported -> first file importing it (generated protobuf code included)."""
    found: dict[str, str] = {}
    for path in sorted((ROOT / directory).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                root = name.split(".")[0]
                if root not in sys.stdlib_module_names and root not in LOCAL:
                    found.setdefault(root, path.relative_to(ROOT).as_posix())
    return found


@pytest.mark.parametrize("directory", sorted(SCOPES))
def test_every_third_party_import_is_declared(directory: str) -> None:
    lists = declared()
    allowed = set().union(*(lists[scope] for scope in SCOPES[directory]))
    providers = importlib.metadata.packages_distributions()
    imports = third_party_imports(directory)
    assert imports, f"no third-party import found under {directory}/: the scan is broken"
    undeclared = {
        root: where for root, where in imports.items()
        if not {normalized(dist) for dist in providers.get(root, [root])} & allowed
    }
    assert undeclared == {}, f"declare these in pyproject.toml ({' or '.join(SCOPES[directory])}): {undeclared}"
