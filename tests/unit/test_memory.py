"""The CLIs cap glibc's malloc arenas before grpc starts its threads (proxy_common.memory)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = "from proxy_common import memory; print(memory.limit_malloc_arenas())"


def run_probe(**env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    done = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True, timeout=30)
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
        assert source.index("memory.limit_malloc_arenas()") < source.index(f"from {package} import app")
