"""Server Leases: names, labels, validity, what to cull, and how agents count servers.

PURE. What the reference decides about `coordination.k8s.io/v1` Leases, without the API:

* a server publishes `konnectivity-proxy-server-<server-id>` in `--lease-namespace`, labelled
  from `--lease-label` (`k=v,k2=v2`), holder = its server ID, 30 s duration, renewed every 15 s;
* a Lease is valid while (renewTime, else acquireTime) + leaseDurationSeconds is in the
  future; neither time set (or no duration) means invalid;
* the server's garbage collector deletes the invalid ones it lists (with their
  resourceVersion as precondition, so a Lease renewed meanwhile survives);
* an agent counts the valid Leases; `--server-count-source` picks between that count and the
  last `servercount` header: `default` = leases when counting them, else the header; `max` =
  the larger of the two. Zero is never a target: it becomes 1.

Times are timezone-aware `datetime`s passed in by the caller; nothing here reads a clock.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

LEASE_NAME_PREFIX = "konnectivity-proxy-server-"
LEASE_DURATION_SECONDS = 30
RENEW_INTERVAL_SECONDS = 15.0
RENEW_JITTER = 0.04
GC_INTERVAL_SECONDS = 15.0
CREATE_RETRY_CAP_SECONDS = 7.0
COUNT_SOURCES = ("", "default", "max")

# Kubernetes label syntax: optional DNS-subdomain prefix and "/", a name of at most 63
# characters; values of at most 63 characters, possibly empty.
_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_PREFIX = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
_KEY = re.compile(rf"^({_PREFIX}/)?{_NAME}$")
_VALUE = re.compile(rf"^({_NAME})?$")
_SUBDOMAIN = re.compile(rf"^{_PREFIX}$")


class LeaseLabelError(ValueError):
    """A `--lease-label` / `--lease-label-selector` text that does not parse."""


@dataclass(frozen=True, slots=True)
class LeaseView:
    """The fields of one Lease that the decisions need."""

    name: str
    resource_version: str = ""
    holder: str = ""
    duration_seconds: int | None = None
    renew_time: dt.datetime | None = None
    acquire_time: dt.datetime | None = None


def lease_name(server_id: str) -> str:
    return LEASE_NAME_PREFIX + server_id


def name_problem(name: str) -> str | None:
    """Why `name` cannot name a Lease (a DNS-1123 subdomain), or None when it can."""
    if not name or len(name) > 253:
        return f"{name!r} must be 1 to 253 characters"
    if not _SUBDOMAIN.match(name):
        return f"{name!r} must be lowercase letters, digits, '-' and '.', starting and ending with a letter or digit"
    return None


def parse_labels(text: str) -> dict[str, str]:
    """`k=v,k2=v2` as a dict; every item needs a key and `=`; keys and values follow label syntax."""
    labels: dict[str, str] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise LeaseLabelError(f"invalid label {item!r}: expected key=value")
        if not _KEY.match(key) or len(key.rpartition("/")[2]) > 63:
            raise LeaseLabelError(f"invalid label key {key!r}")
        if not _VALUE.match(value):
            raise LeaseLabelError(f"invalid label value {value!r} for key {key!r}")
        if key in labels and labels[key] != value:
            raise LeaseLabelError(f"label key {key!r} given twice with different values")
        labels[key] = value
    if not labels:
        raise LeaseLabelError("no labels given; the Leases could not be found again")
    return labels


def selector_of(labels: dict[str, str]) -> str:
    """The equality label selector that finds Leases carrying `labels`."""
    return ",".join(f"{key}={value}" for key, value in sorted(labels.items()))


def expires_at(lease: LeaseView) -> dt.datetime | None:
    start = lease.renew_time or lease.acquire_time
    if start is None or lease.duration_seconds is None:
        return None
    return start + dt.timedelta(seconds=lease.duration_seconds)


def is_valid(lease: LeaseView, now: dt.datetime) -> bool:
    end = expires_at(lease)
    return end is not None and end > now


def count_valid(leases: list[LeaseView], now: dt.datetime) -> int:
    return sum(1 for lease in leases if is_valid(lease, now))


def to_cull(leases: list[LeaseView], now: dt.datetime) -> list[LeaseView]:
    """The Leases the garbage collector deletes: every invalid one, in listed order."""
    return [lease for lease in leases if not is_valid(lease, now)]


def target_server_count(source: str, *, counting_leases: bool, lease_count: int, response_count: int) -> int:
    """The number of distinct servers the agent keeps streams to (never 0)."""
    if source not in COUNT_SOURCES:
        raise ValueError(f"unknown server count source {source!r}")
    if not counting_leases:
        chosen = response_count
    elif source == "max":
        chosen = max(lease_count, response_count)
    else:
        chosen = lease_count
    return max(1, chosen)


def renew_delay(interval: float, jitter_draw: float) -> float:
    """The wait before the next renewal: `interval` plus up to 4 % (`jitter_draw` in [0, 1))."""
    return interval * (1 + RENEW_JITTER * jitter_draw)


def create_retry_delay(failures: int, base: float, cap: float = CREATE_RETRY_CAP_SECONDS) -> float:
    """Exponential retry while the Lease cannot be written: base, x2 per failure, capped."""
    return min(cap, base * 2.0 ** max(0, failures - 1))
