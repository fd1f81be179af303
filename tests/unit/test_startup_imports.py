"""A daemon that never talks to kube-apiserver never loads the `kubernetes` client.

Importing it (and its HTTP stack) costs about a second and a half of startup and tens of
MiB, so the modules that use it import it when token authentication or Lease handling is
built. Checked in a fresh interpreter, since this test process has loaded everything.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("kubernetes", "urllib3", "yaml")


def loaded_after(statement: str) -> list[str]:
    probe = f"{statement}\nimport sys\nprint(','.join(sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r})))"
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    return [name for name in done.stdout.strip().split(",") if name]


@pytest.mark.parametrize("module", ["proxy_server.app", "proxy_server.cli", "proxy_agent.app", "proxy_agent.cli"])
def test_starting_without_kube_api_does_not_import_kubernetes(module: str) -> None:
    assert loaded_after(f"import {module}") == []


KUBECONFIG = """apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://127.0.0.1:1", insecure-skip-tls-verify: true}}]
users: [{name: u, user: {token: not-a-real-token}}]
contexts: [{name: x, context: {cluster: c, user: u}}]
current-context: x
"""


def test_building_token_authentication_does_load_kubernetes(tmp_path: Path) -> None:
    """The check above can fail: building the TokenReview client (no request is sent) loads it."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(KUBECONFIG)
    statement = (
        "import asyncio\n"
        "from prometheus_client import CollectorRegistry\n"
        "from proxy_server import tokenreview\n"
        "from proxy_server.auth import AuthPolicy\n"
        "policy = AuthPolicy('kube-system', 'konnectivity-agent', 'system:konnectivity-server')\n"
        f"built = tokenreview.build(policy=policy, kubeconfig={str(kubeconfig)!r}, registry=CollectorRegistry())\n"
        "asyncio.run(built.aclose())"
    )
    assert "kubernetes" in loaded_after(statement)
