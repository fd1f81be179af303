"""Process-wide memory settings, applied by the CLIs before grpc starts its threads.

SHELL. grpc's C core runs its own threads, and glibc gives every thread that allocates
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
