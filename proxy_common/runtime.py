"""Process-wide settings, applied by the CLIs before grpc is loaded and starts its threads.

SHELL. Two settings, each measured with the benchmarks (bench/README.md); an operator's own
environment variable wins over each.

Malloc arenas. grpc's C core runs its own threads, and glibc gives every thread that allocates
its own malloc arena (up to 8 per core). Buffers allocated in one thread and freed in
another then leave each arena holding freed pages, and RSS climbs far above what is live:
in the flow-control benchmark the server's RSS grew 83 MiB with the default arenas and
17 MiB with two, at the same throughput and CPU per GiB. So we cap the arenas at two, as
MALLOC_ARENA_MAX=2 would; an operator's own MALLOC_ARENA_MAX wins.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

M_ARENA_MAX = -8  # glibc's mallopt() parameter number
DEFAULT_ARENAS = 2

# grpc's I/O on its EventEngine adds thread hops to every read and write. With its client
# and listener experiments off, grpc uses its older in-line I/O paths: measured on 2 cores,
# a dial + echo + close cost the server 18% less CPU (p50 latency 15-20% lower), and a peer
# sending 4 KiB packets cost 98 instead of 139 microseconds per packet.
GRPC_EXPERIMENTS = "-event_engine_client,-event_engine_listener"


def prepare_process() -> None:
    """Everything below, in the order it must happen: before grpc is imported."""
    prefer_inline_grpc_io()
    limit_malloc_arenas()


def prefer_inline_grpc_io() -> bool:
    """Turn grpc's EventEngine client and listener experiments off, unless the environment
    already says something about GRPC_EXPERIMENTS; True when applied. grpc reads the
    variable when it initialises, so this must run before grpc is imported."""
    if "GRPC_EXPERIMENTS" in os.environ:
        return False
    os.environ["GRPC_EXPERIMENTS"] = GRPC_EXPERIMENTS
    return True


def limit_malloc_arenas(arenas: int = DEFAULT_ARENAS) -> bool:
    """Cap glibc's malloc arenas; True when applied. A no-op off glibc or when the
    environment already sets MALLOC_ARENA_MAX (glibc read it at start-up)."""
    if "MALLOC_ARENA_MAX" in os.environ or platform.libc_ver()[0] != "glibc":
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(M_ARENA_MAX, arenas))
    except (OSError, AttributeError):
        return False
