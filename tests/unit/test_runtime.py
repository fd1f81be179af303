"""Process-wide settings the CLIs apply before grpc loads (proxy_common.runtime)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from proxy_common import runtime

PROBE = "from proxy_common import runtime; print(runtime.limit_malloc_arenas())"


def run_probe(probe: str = PROBE, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("MALLOC_ARENA_MAX", "GRPC_EXPERIMENTS")}
    done = subprocess.run([sys.executable, "-c", probe], env={**clean, **env}, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt arenas are a glibc setting")
def test_arenas_are_capped_on_glibc() -> None:
    assert run_probe() == "True"


def test_an_operators_malloc_arena_max_wins() -> None:
    assert run_probe(MALLOC_ARENA_MAX="4") == "False"


def test_both_clis_apply_it_before_importing_the_app() -> None:
    root = Path(__file__).resolve().parents[2]
    for package in ("proxy_server", "proxy_agent"):
        source = (root / package / "cli.py").read_text()
        assert source.index("runtime.prepare_process()") < source.index(f"from {package} import app")


GRPC_PROBE = (
    "import os, sys; from proxy_common import runtime; runtime.prepare_process(); "
    "import grpc; print(repr(os.environ['GRPC_EXPERIMENTS']), 'grpc' in sys.modules)"
)


def test_grpc_inline_io_is_chosen_before_grpc_loads_unless_the_operator_says_otherwise() -> None:
    assert run_probe(GRPC_PROBE) == f"{runtime.GRPC_EXPERIMENTS!r} True"
    assert run_probe(GRPC_PROBE, GRPC_EXPERIMENTS="") == "'' True"


def test_the_clis_import_no_grpc_before_preparing_the_process() -> None:
    probe = "import sys, proxy_server.cli, proxy_agent.cli; print('grpc' in sys.modules)"
    assert run_probe(probe) == "False"
