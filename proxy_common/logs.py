"""Logging set-up: one line per event, `key=value` fields, klog-like verbosity.

SHELL. `-v` maps onto Python levels: 0-1 WARNING, 2-4 INFO, 5+ DEBUG (per-packet lines).
No token and no payload byte is ever formatted into a message: messages carry ids,
addresses, sizes and reasons only.
"""

from __future__ import annotations

import logging
import sys


def level_for(verbosity: int) -> int:
    if verbosity >= 5:
        return logging.DEBUG
    if verbosity >= 2:
        return logging.INFO
    return logging.WARNING


def configure(verbosity: int, *, stream: object = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)  # type: ignore[arg-type]
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname).1s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level_for(verbosity))
    for noisy in ("grpc", "asyncio", "kubernetes", "urllib3"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, level_for(verbosity)))
