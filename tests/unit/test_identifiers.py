from __future__ import annotations

import pytest

from proxy_common.identifiers import IdentifierError, host_of, parse

HELP_EXAMPLE = "host=localhost&host=node1.mydomain.com&cidr=127.0.0.1/16&ipv4=1.2.3.4&ipv4=5.6.7.8&ipv6=:::::&default-route=true"


def test_reference_help_example_parses() -> None:
    ids = parse(HELP_EXAMPLE, strict=True)
    assert ids.host == ("localhost", "node1.mydomain.com")
    assert ids.ipv4 == ("1.2.3.4", "5.6.7.8")
    assert ids.ipv6 == (":::::",)
    assert ids.cidr == ("127.0.0.1/16",)
    assert ids.default_route is True


def test_empty_is_no_identifiers() -> None:
    assert parse("").destination_keys() == ()


def test_agent_refuses_unknown_keys_server_ignores_them() -> None:
    with pytest.raises(IdentifierError, match="unknown address type: uid"):
        parse("uid=1", strict=True)
    assert parse("uid=1&ipv4=1.1.1.1").ipv4 == ("1.1.1.1",)


@pytest.mark.parametrize("bad", ["ipv4=1;ipv4=2", "default-route=maybe", "=&&="])
def test_unparsable_identifiers(bad: str) -> None:
    with pytest.raises(IdentifierError):
        parse(bad)


@pytest.mark.parametrize(
    ("address", "host"),
    [("10.0.0.5:10250", "10.0.0.5"), ("[fd00::5]:443", "fd00::5"), ("fd00::5", "fd00::5"), ("node:1", "node")],
)
def test_host_of(address: str, host: str) -> None:
    assert host_of(address) == host
