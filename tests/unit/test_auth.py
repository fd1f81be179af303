"""Agent authentication decisions (pure), the review cache, and the TLS/auth flag rules.

No event loop and no sockets here. The refusal texts are checked against the Go server's
recorded answers in tests/interop/server-agent-auth.json.
"""

from __future__ import annotations

import ast
import base64
import json
from pathlib import Path

import pytest

from proxy_common.errors import ConfigError
from proxy_server import auth, cli
from proxy_server.auth import AgentAuthError, AuthPolicy, Refusal, ReviewResult
from proxy_server.config import CIPHER_SUITES, ServerConfig
from proxy_server.tokenreview import ReviewCache, cache_key

ROOT = Path(__file__).resolve().parents[2]
RECORDING = json.loads((ROOT / "tests/interop/server-agent-auth.json").read_text())
POLICY = AuthPolicy("kube-system", "konnectivity-agent", "system:konnectivity-server")
GOOD_USER = "system:serviceaccount:kube-system:konnectivity-agent"


def refusal_of(md: list[tuple[str, str]]) -> AgentAuthError:
    with pytest.raises(AgentAuthError) as caught:
        auth.bearer_token(md)
    return caught.value


def review_refusal(result: ReviewResult) -> AgentAuthError:
    with pytest.raises(AgentAuthError) as caught:
        auth.check_review(POLICY, result)
    return caught.value


def recorded_message(case: str) -> str:
    headers = dict(RECORDING["cases"][case]["server_response_headers_first_attempt"])
    assert headers["grpc-status"] == "2"  # UNKNOWN, what AgentServicer sends for every AuthError
    return headers["grpc-message"]


def result_from_recording(case: str) -> ReviewResult:
    status = RECORDING["cases"][case]["tokenreview_status_returned_by_fake_apiserver"]
    return ReviewResult(
        authenticated=bool(status.get("authenticated")),
        username=(status.get("user") or {}).get("username", ""),
        error=status.get("error", ""),
        audiences=tuple(status.get("audiences") or ()),
    )


# ------------------------------------------------------------------ the header
def test_the_token_is_what_follows_bearer_and_one_space() -> None:
    assert auth.bearer_token([("agentid", "a"), ("authorization", "Bearer abc.def.ghi")]) == "abc.def.ghi"


def test_token_bytes_are_not_trimmed_like_the_reference() -> None:
    assert auth.bearer_token([("authorization", "Bearer tok\n")]) == "tok\n"


def test_no_header_gets_the_reference_text() -> None:
    refused = refusal_of([("agentid", "a")])
    assert refused.reason is Refusal.NO_HEADER
    assert str(refused) == recorded_message("no_token_file")


def test_two_headers_are_refused_with_the_reference_text() -> None:
    refused = refusal_of([("authorization", "Bearer a"), ("authorization", "Bearer b")])
    assert (refused.reason, str(refused)) == (Refusal.TOO_MANY_HEADERS, "too many (2) tokens are received")


@pytest.mark.parametrize("value", ["bearer abc", "Basic abc", "Bearer", "Bearerabc", "abc", ""])
def test_other_schemes_are_refused_with_the_reference_text(value: str) -> None:
    refused = refusal_of([("authorization", value)])
    assert (refused.reason, str(refused)) == (Refusal.WRONG_SCHEME, 'received token does not have "Bearer " prefix')


def test_an_empty_token_is_refused_without_asking_with_kube_apiservers_words() -> None:
    refused = refusal_of([("authorization", "Bearer ")])
    assert refused.reason is Refusal.EMPTY_TOKEN
    assert str(refused) == ("Failed to validate authentication token, err:Failed to authenticate request. "
                            "err:token is required for TokenReview in authentication")


def test_an_oversized_token_is_refused_without_asking_and_not_echoed() -> None:
    token = "x" * (auth.MAX_TOKEN_BYTES + 1)
    refused = refusal_of([("authorization", "Bearer " + token)])
    assert refused.reason is Refusal.TOKEN_TOO_LONG
    assert token not in str(refused)
    assert auth.bearer_token([("authorization", "Bearer " + "x" * auth.MAX_TOKEN_BYTES)])


# ------------------------------------------------------------------ the review
def test_the_recorded_accepted_review_is_accepted() -> None:
    identity = auth.check_review(POLICY, result_from_recording("ok"))
    assert identity.username == GOOD_USER


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("not_authenticated", Refusal.NOT_AUTHENTICATED),
        ("status_error", Refusal.REVIEW_ERROR),
        ("wrong_namespace", Refusal.WRONG_NAMESPACE),
        ("wrong_sa", Refusal.WRONG_SERVICE_ACCOUNT),
        ("not_a_service_account", Refusal.USERNAME_FORMAT),
    ],
)
def test_recorded_refusals_get_the_go_servers_exact_message(case: str, reason: Refusal) -> None:
    refused = review_refusal(result_from_recording(case))
    assert refused.reason is reason
    assert str(refused) == recorded_message(case)


def test_a_four_part_name_that_is_not_a_service_account_is_refused() -> None:
    refused = review_refusal(ReviewResult(True, "system:node:kube-system:konnectivity-agent",
                                          audiences=(POLICY.audience,)))
    assert str(refused).endswith("lookup failed: username returned is not a service account")


@pytest.mark.parametrize("username", ["system:serviceaccount:kube-system", "system:serviceaccount:kube-system:a:b", ""])
def test_usernames_without_exactly_four_parts_are_refused(username: str) -> None:
    assert review_refusal(ReviewResult(True, username, audiences=(POLICY.audience,))).reason is Refusal.USERNAME_FORMAT


def test_status_error_wins_over_authenticated() -> None:
    refused = review_refusal(ReviewResult(True, GOOD_USER, error="webhook timed out", audiences=(POLICY.audience,)))
    assert str(refused) == "Failed to validate authentication token, err:lookup failed: webhook timed out"


def test_a_review_that_does_not_grant_our_audience_is_refused() -> None:
    refused = review_refusal(ReviewResult(True, GOOD_USER, audiences=("https://kubernetes.default.svc",)))
    assert refused.reason is Refusal.AUDIENCE_NOT_GRANTED
    assert 'audience "system:konnectivity-server" not granted' in str(refused)


def test_a_review_from_an_authenticator_that_is_not_audience_aware_is_refused() -> None:
    assert review_refusal(ReviewResult(True, GOOD_USER)).reason is Refusal.AUDIENCE_NOT_GRANTED


def test_unavailable_api_refuses_in_client_go_words() -> None:
    refused = auth.unavailable('Post "https://10.0.0.1/apis/authentication.k8s.io/v1/tokenreviews": i/o timeout')
    assert refused.reason is Refusal.API_UNAVAILABLE
    assert str(refused).startswith("Failed to validate authentication token, err:Failed to authenticate request. err:Post ")


# ------------------------------------------------------------------ helpers
def jwt(claims: dict[str, object]) -> str:
    part = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"eyJhbGciOiJSUzI1NiJ9.{part}.c2lnbmF0dXJl"


def test_token_expiry_reads_the_exp_claim_of_a_jwt() -> None:
    assert auth.token_expiry(jwt({"exp": 1_900_000_000, "aud": ["x"]})) == 1_900_000_000.0


@pytest.mark.parametrize("token", ["opaque", "a.b", "a.!!!.c", jwt({"exp": "soon"}), jwt({"exp": True}), jwt({})])
def test_token_expiry_is_none_for_anything_else(token: str) -> None:
    assert auth.token_expiry(token) is None


def test_redact_replaces_every_copy_of_the_token() -> None:
    assert auth.redact("a tok b tok", "tok") == f"a {auth.REDACTED} b {auth.REDACTED}"
    assert auth.redact("text", "") == "text"


def test_the_auth_module_is_pure() -> None:
    tree = ast.parse((ROOT / "proxy_server/auth.py").read_text())
    roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    roots |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not roots & {"asyncio", "socket", "ssl", "time", "logging", "grpc", "threading", "kubernetes", "hashlib"}


# ------------------------------------------------------------------ cache
class ManualClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_cache_keys_are_digests_not_tokens() -> None:
    key = cache_key("secret-token")
    assert len(key) == 32 and b"secret-token" not in key
    assert key == cache_key("secret-token") != cache_key("secret-token2")


def test_cache_entries_expire_after_their_ttl() -> None:
    clock = ManualClock()
    cache = ReviewCache(10, clock=clock)
    cache.put(b"k", ReviewResult(True, GOOD_USER), ttl=5)
    clock.now += 4.9
    assert cache.get(b"k") == ReviewResult(True, GOOD_USER)
    clock.now += 0.1
    assert cache.get(b"k") is None
    assert len(cache) == 0


def test_cache_is_bounded_and_evicts_the_least_recently_used() -> None:
    cache = ReviewCache(3, clock=ManualClock())
    for key in (b"a", b"b", b"c"):
        cache.put(key, ReviewResult(False), ttl=60)
    assert cache.get(b"a") is not None  # a is now the most recent
    cache.put(b"d", ReviewResult(False), ttl=60)
    assert len(cache) == 3
    assert cache.get(b"b") is None
    assert all(cache.get(k) is not None for k in (b"a", b"c", b"d"))


def test_a_zero_ttl_stores_nothing() -> None:
    cache = ReviewCache(3, clock=ManualClock())
    cache.put(b"a", ReviewResult(True), ttl=60)
    cache.put(b"a", ReviewResult(True), ttl=0)
    assert cache.get(b"a") is None


# ------------------------------------------------------------------ flags
def config(**overrides: object) -> ServerConfig:
    fields: dict[str, object] = {"uds_name": "/tmp/x.sock", "server_port": 0, "server_id": "s"}
    fields.update(overrides)
    return ServerConfig(**fields)  # type: ignore[arg-type]


def problems(**overrides: object) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        config(**overrides).validate()
    return caught.value.problems


def test_token_auth_needs_all_three_flags() -> None:
    assert any("go together" in p for p in problems(agent_namespace="kube-system"))


def test_token_auth_and_agent_client_certificates_are_exclusive(tmp_path: Path) -> None:
    ca = tmp_path / "ca.crt"
    ca.write_text("x")
    found = problems(agent_namespace="a", agent_service_account="b", authentication_audience="c", cluster_ca_cert=str(ca))
    assert any("exclusive" in p for p in found)


def test_go_cipher_names_map_to_openssl_names_without_duplicates() -> None:
    c = config(cipher_suites=("TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256", "TLS_AES_128_GCM_SHA256",
                              "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305", "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256"))
    assert c.openssl_cipher_list() == "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-CHACHA20-POLY1305"
    assert not any("cipher" in p for p in problems(cipher_suites=c.cipher_suites))


@pytest.mark.parametrize("suite", ["TLS_RSA_WITH_3DES_EDE_CBC_SHA", "TLS_ECDHE_RSA_WITH_RC4_128_SHA",
                                   "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256", "NOT_A_SUITE"])
def test_weak_or_unknown_cipher_suites_are_refused(suite: str) -> None:
    assert any(suite in p and "weak or unknown" in p for p in problems(cipher_suites=(suite,)))


def test_only_tls13_suites_need_the_tls13_minimum() -> None:
    assert any("only TLS 1.3" in p for p in problems(cipher_suites=("TLS_AES_128_GCM_SHA256",)))
    assert not any("cipher" in p for p in problems(cipher_suites=("TLS_AES_128_GCM_SHA256",), tls_min_version="VersionTLS13"))


def test_tls13_and_tls12_minimums_are_accepted() -> None:
    for version in ("VersionTLS12", "VersionTLS13"):
        assert not any("tls-min-version" in p for p in problems(tls_min_version=version))


def test_every_mapped_suite_is_an_aead_or_cbc_sha_suite_with_no_weak_algorithm() -> None:
    for name in CIPHER_SUITES.values():
        assert not any(weak in name for weak in ("RC4", "3DES", "DES-CBC3", "NULL", "MD5", "EXP"))
        assert "GCM" in name or "CHACHA20" in name or name.endswith("-SHA"), name  # no CBC-SHA256 (Lucky13)


def test_token_review_flags_parse(tmp_path: Path) -> None:
    cert = tmp_path / "c"
    cert.write_text("x")
    parsed, _ = cli.parse([
        "--uds-name=/tmp/p.sock", "--server-port=0", f"--cluster-cert={cert}", f"--cluster-key={cert}",
        "--agent-namespace=kube-system", "--agent-service-account=konnectivity-agent",
        "--authentication-audience=system:konnectivity-server", "--token-review-cache-ttl=5m",
        "--token-review-failure-ttl=2s", "--token-review-cache-size=50", "--token-review-timeout=3s",
        "--cipher-suites=TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
    ])
    assert (parsed.token_review_cache_ttl, parsed.token_review_failure_ttl) == (300.0, 2.0)
    assert (parsed.token_review_cache_size, parsed.token_review_timeout) == (50, 3.0)
    assert parsed.token_auth and parsed.openssl_cipher_list() == "ECDHE-ECDSA-AES256-GCM-SHA384"
