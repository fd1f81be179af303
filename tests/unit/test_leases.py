"""The Lease decisions (proxy_common.leases): names, labels, validity, culling, counting."""

from __future__ import annotations

import datetime as dt

import pytest

from proxy_common import leases
from proxy_common.leases import LeaseView

NOW = dt.datetime(2026, 6, 1, 12, 0, 0, tzinfo=dt.UTC)


def ago(seconds: float) -> dt.datetime:
    return NOW - dt.timedelta(seconds=seconds)


def test_lease_name_is_the_references() -> None:
    assert leases.lease_name("server-1") == "konnectivity-proxy-server-server-1"


def test_labels_parse_like_the_flag_documents() -> None:
    assert leases.parse_labels("k8s-app=konnectivity-server") == {"k8s-app": "konnectivity-server"}
    assert leases.parse_labels("a=1, b=2,,example.com/c=") == {"a": "1", "b": "2", "example.com/c": ""}
    assert leases.selector_of({"b": "2", "a": "1"}) == "a=1,b=2"


@pytest.mark.parametrize("bad", ["", ",", "novalue", "=v", "a=1,a=2", "bad key=v", "k=bad value", "-k=v",
                                 "k=" + "x" * 64, "Upper.Case/k=v"])
def test_bad_labels_are_refused(bad: str) -> None:
    with pytest.raises(leases.LeaseLabelError):
        leases.parse_labels(bad)


def test_validity_uses_renew_time_else_acquire_time() -> None:
    assert leases.is_valid(LeaseView("a", duration_seconds=30, renew_time=ago(29)), NOW)
    assert not leases.is_valid(LeaseView("a", duration_seconds=30, renew_time=ago(30)), NOW)
    assert leases.is_valid(LeaseView("a", duration_seconds=30, acquire_time=ago(10)), NOW)
    # renewTime wins over an older or newer acquireTime
    assert not leases.is_valid(LeaseView("a", duration_seconds=30, renew_time=ago(31), acquire_time=ago(1)), NOW)
    assert leases.is_valid(LeaseView("a", duration_seconds=30, renew_time=ago(1), acquire_time=ago(300)), NOW)


def test_no_time_or_no_duration_is_invalid() -> None:
    assert not leases.is_valid(LeaseView("a", duration_seconds=30), NOW)
    assert not leases.is_valid(LeaseView("a", renew_time=ago(1)), NOW)


def test_gc_culls_exactly_the_invalid_ones_in_order() -> None:
    listed = [
        LeaseView("live", "1", duration_seconds=30, renew_time=ago(5)),
        LeaseView("old", "2", duration_seconds=30, renew_time=ago(60)),
        LeaseView("never", "3"),
        LeaseView("future", "4", duration_seconds=30, renew_time=NOW + dt.timedelta(seconds=10)),
    ]
    assert [lease.name for lease in leases.to_cull(listed, NOW)] == ["old", "never"]
    assert leases.count_valid(listed, NOW) == 2


@pytest.mark.parametrize(
    ("source", "counting", "from_leases", "from_header", "expected"),
    [
        ("default", False, 5, 3, 3),  # not counting leases: the header
        ("", False, 0, 0, 1),  # zero is never a target
        ("default", True, 2, 3, 2),  # counting: the leases win
        ("", True, 2, 3, 2),
        ("default", True, 0, 3, 1),  # no valid lease -> 1
        ("max", True, 2, 3, 3),
        ("max", True, 4, 3, 4),
        ("max", False, 4, 3, 3),  # max only means something with leases on
        ("max", True, 0, 0, 1),
    ],
)
def test_target_server_count(source: str, counting: bool, from_leases: int, from_header: int, expected: int) -> None:
    got = leases.target_server_count(source, counting_leases=counting, lease_count=from_leases,
                                     response_count=from_header)
    assert got == expected


def test_unknown_count_source_is_refused() -> None:
    with pytest.raises(ValueError, match="server count source"):
        leases.target_server_count("min", counting_leases=True, lease_count=1, response_count=1)


def test_renew_jitter_is_at_most_four_percent() -> None:
    assert leases.renew_delay(15.0, 0.0) == 15.0
    assert leases.renew_delay(15.0, 0.999) < 15.0 * 1.04
    assert leases.renew_delay(15.0, 0.5) == pytest.approx(15.3)


def test_write_retry_doubles_up_to_seven_seconds() -> None:
    delays = [leases.create_retry_delay(n, 0.2) for n in range(1, 9)]
    assert delays == [0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 7.0, 7.0]


def test_lease_names_must_be_dns_subdomains() -> None:
    assert leases.name_problem("konnectivity-proxy-server-0b3c-4d.example") is None
    for bad in ("", "Upper", "under_score", "-lead", "trail-", "x" * 254):
        assert leases.name_problem(bad), bad


def test_server_config_reports_lease_problems_only_with_the_controller_on() -> None:
    from proxy_common.errors import ConfigError
    from proxy_server.config import ServerConfig

    base = {"uds_name": "/tmp/x.sock", "server_port": 0, "cluster_cert": "", "cluster_key": "", "server_id": "Bad_ID",
            "lease_label": "novalue"}
    with pytest.raises(ConfigError) as off:
        ServerConfig(**base).validate()  # fails on other grounds (no certificates), not on the Lease
    assert not [p for p in off.value.problems if "Lease" in p or "lease" in p]
    with pytest.raises(ConfigError) as on:
        ServerConfig(**base, enable_lease_controller=True, lease_renew_interval=40).validate()
    problems = "\n".join(on.value.problems)
    assert "--lease-label: invalid label 'novalue'" in problems
    assert "--server-id 'Bad_ID' cannot name this server's Lease" in problems
    assert "renewed more often than it lasts" in problems


def test_times_sent_to_the_api_always_carry_microseconds() -> None:
    """kube-apiserver parses MicroTime with exactly six fractional digits; the client writes
    isoformat(), which drops a zero fraction."""
    from proxy_common.kube import micro_time

    whole = dt.datetime(2026, 6, 1, 12, 0, 0, tzinfo=dt.UTC)
    assert micro_time(whole).isoformat() == "2026-06-01T12:00:00.000001+00:00"
    exact = whole.replace(microsecond=250_000)
    assert micro_time(exact) is exact


def test_agent_lease_flags_reach_the_config(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from proxy_agent import cli

    ca = tmp_path / "ca.crt"
    ca.write_text("x")
    config, _ = cli.parse([f"--ca-cert={ca}", "--count-server-leases", "--lease-namespace=konnectivity",
                           "--lease-label=app=proxy", "--server-count-source=max", "--lease-list-interval=2s"])
    assert (config.count_server_leases, config.lease_namespace, config.lease_label_selector,
            config.server_count_source, config.lease_list_interval) == (True, "konnectivity", "app=proxy", "max", 2.0)


def test_server_lease_flags_reach_the_config() -> None:
    from proxy_server import cli

    args = cli.build_parser().parse_args(["--enable-lease-controller", "--lease-namespace=konnectivity",
                                          "--lease-label=a=1,b=2", "--server-id=cp-1"])
    config = cli.config_from_args(args)
    assert (config.enable_lease_controller, config.lease_namespace, config.lease_labels()) == (
        True, "konnectivity", {"a": "1", "b": "2"})
    assert (config.lease_duration_seconds, config.lease_renew_interval, config.lease_gc_interval) == (30, 15.0, 15.0)
