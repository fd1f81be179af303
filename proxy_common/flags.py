"""argparse building blocks shared by both command lines.

SHELL-free helpers: Go-style durations ("1h0m0s", "500ms"), pflag-style booleans
(`--flag`, `--flag=false`), klog's flags, and reference flags we accept but do not act on
(reported at start-up, never a crash), so manifests written for the Go binaries start.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

from proxy_common.errors import ConfigError

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_TRUE = {"1", "t", "true", "yes"}
_FALSE = {"0", "f", "false", "no"}

# klog flags found in the reference binaries and the Kubernetes documentation's manifests.
KLOG_FLAGS = (
    "--logtostderr",
    "--alsologtostderr",
    "--alsologtostderrthreshold",
    "--stderrthreshold",
    "--legacy-stderr-threshold-behavior",
    "--log-file",
    "--log-file-max-size",
    "--log-dir",
    "--one-output",
    "--skip-headers",
    "--skip-log-headers",
    "--add-dir-header",
    "--vmodule",
    "--log-backtrace-at",
    "--log-flush-frequency",
)
# Reference flags both binaries accept so manifests start: deprecated ones, and the
# profiling switches, whose behaviour is not built here.
DEPRECATED_FLAGS = ("--warn-on-channel-limit",)
PROFILING_FLAGS = ("--enable-profiling", "--enable-contention-profiling")


def duration(text: str) -> float:
    """Parse a Go duration (or a bare number of seconds) into seconds."""
    text = text.strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    sign = -1.0 if text.startswith("-") else 1.0
    body = text.lstrip("+-")
    pos, total = 0, 0.0
    for match in _DURATION_PART.finditer(body):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    if pos != len(body) or not body:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r} (examples: 1s, 500ms, 1h0m0s)")
    return sign * total


def boolean(text: str) -> bool:
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"invalid boolean {text!r}")


def port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port {value} out of range 0-65535")
    return value


def add_bool(parser: argparse._ActionsContainer, name: str, default: bool, help: str) -> None:
    """A pflag-style boolean: `--name`, `--name=true`, `--name=false`."""
    parser.add_argument(name, type=boolean, nargs="?", const=True, default=default, metavar="BOOL", help=help)


def add_accepted(parser: argparse.ArgumentParser, names: tuple[str, ...], title: str) -> None:
    """Register flags that are accepted for compatibility but have no effect here."""
    group = parser.add_argument_group(title)
    for name in names:
        group.add_argument(name, nargs="?", const="true", default=None, help=argparse.SUPPRESS)


def add_verbosity(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-v", "--v", dest="verbosity", type=int, default=4, metavar="N",
        help="log verbosity as klog counts it: 0-1 warnings, 2-4 lifecycle, 5+ per-packet (default 4)",
    )


def add_compatibility(
    parser: argparse.ArgumentParser, group: argparse._ActionsContainer, *, profiling: bool, contention_profiling: bool
) -> None:
    """The flags both command lines end with: the profiling switches (in `group`), `-v`,
    and klog's and the deprecated flags, accepted for compatibility."""
    add_bool(group, "--enable-profiling", profiling, "accepted for compatibility")
    add_bool(group, "--enable-contention-profiling", contention_profiling, "accepted for compatibility")
    add_verbosity(parser)
    add_accepted(parser, KLOG_FLAGS + DEPRECATED_FLAGS, "accepted for compatibility (klog and deprecated flags)")


class _Validated(Protocol):
    def validate(self) -> None: ...


C = TypeVar("C", bound=_Validated)


def parse_config(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None, make: Callable[[argparse.Namespace], C]
) -> tuple[C, argparse.Namespace]:
    """Parse and validate; exits 2 with every problem listed when the flags are unusable."""
    args = parser.parse_args(argv)
    try:
        config = make(args)
        config.validate()
    except ConfigError as exc:
        parser.error("\n  ".join(["invalid configuration:", *exc.problems]))
    return config, args


def accepted_but_ignored(args: argparse.Namespace, names: tuple[str, ...]) -> list[str]:
    """The accepted-only flags that were actually given, for a start-up notice."""
    given = []
    for name in names:
        if getattr(args, name.lstrip("-").replace("-", "_"), None) is not None:
            given.append(name)
    return given
