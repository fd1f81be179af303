"""Logging set-up: one line per event, `key=value` fields, klog-like verbosity and destinations.

SHELL. `-v` maps onto Python levels as the reference uses klog's: 0-1 warnings and errors,
2-4 lifecycle (INFO: listeners, agents and servers coming and going, dial failures),
5+ per-connection and per-packet detail (DEBUG).

Every record is written on one line: a message or traceback with line breaks has them
escaped, so one event is one line for `kubectl logs | grep` and log shippers.

No token and no payload byte is ever formatted into a message: messages carry ids,
addresses, sizes and reasons only (message reprs omit payloads, see messages.py).

Destinations follow klog's flags, so the Go binaries' manifests behave the same:
stderr by default (`--logtostderr=true`); with `--logtostderr=false --log-file=F`, the
file, plus stderr for errors (everything with `--alsologtostderr`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterable

from proxy_common import flags

# klog flags this module acts on; the other klog flags are accepted and ignored.
HONOURED_KLOG_FLAGS = ("--logtostderr", "--alsologtostderr", "--log-file")


def level_for(verbosity: int) -> int:
    if verbosity >= 5:
        return logging.DEBUG
    if verbosity >= 2:
        return logging.INFO
    return logging.WARNING


class OneLineFormatter(logging.Formatter):
    """`time level logger: message`, with line breaks escaped."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname).1s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).replace("\r", "\\r").replace("\n", "\\n")


def configure(
    verbosity: int, *, stream: object = None, log_file: str = "", stderr_level: int = logging.NOTSET
) -> None:
    """Send records at `verbosity` to stderr (or `stream`), or to `log_file` plus stderr at
    `stderr_level` and above."""
    handlers: list[logging.Handler] = []
    console = logging.StreamHandler(stream or sys.stderr)  # type: ignore[arg-type]
    if log_file:
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
        console.setLevel(stderr_level or logging.ERROR)
    handlers.append(console)
    for handler in handlers:
        handler.setFormatter(OneLineFormatter())
        handler._konnectivity_owned = True  # type: ignore[attr-defined]
    root = logging.getLogger()
    for old in root.handlers:
        if getattr(old, "_konnectivity_owned", False):
            old.close()
    root.handlers[:] = handlers
    root.setLevel(level_for(verbosity))
    for noisy in ("grpc", "asyncio", "kubernetes", "urllib3"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, level_for(verbosity)))


def configure_from_flags(args: argparse.Namespace) -> None:
    """Apply `-v` and klog's destination flags as parsed by either command line."""

    def given(name: str, default: bool) -> bool:
        value = getattr(args, name, None)
        try:
            return default if value is None else flags.boolean(value)
        except argparse.ArgumentTypeError:
            return default

    log_file = getattr(args, "log_file", None) or ""
    if given("logtostderr", True) or not log_file:
        configure(args.verbosity)
    else:
        configure(args.verbosity, log_file=log_file,
                  stderr_level=logging.NOTSET if not given("alsologtostderr", False) else logging.DEBUG)


def start_from_flags(args: argparse.Namespace, log: logging.Logger, also_ignored: Iterable[str] = ()) -> None:
    """Configure logging from either command line's flags, then say once which of the flags
    accepted for compatibility were given without effect here (plus `also_ignored`)."""
    configure_from_flags(args)
    ignored = [name for name in flags.accepted_but_ignored(args, flags.KLOG_FLAGS + flags.DEPRECATED_FLAGS)
               if name not in HONOURED_KLOG_FLAGS]
    ignored += [name for name in flags.PROFILING_FLAGS if getattr(args, name[2:].replace("-", "_"))]
    ignored += also_ignored
    if ignored:
        log.info("flags accepted for compatibility, without effect here flags=%s", ",".join(ignored))
