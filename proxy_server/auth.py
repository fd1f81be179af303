"""Agent token authentication: what the `authorization` header and a TokenReview must say.

PURE. No I/O, clocks or logging: the shell (`tokenreview.py`) asks kube-apiserver and
feeds the answer here as a `ReviewResult`; the functions below decide, and a refusal is an
`AgentAuthError` whose text is the gRPC message the agent receives.

Theory of operation
-------------------
The reference checks once per Connect stream, before it sends any response header:

1. the `authorization` metadata has exactly one value, which starts with `Bearer `
   (capital B, one space): `bearer_token()`;
2. a TokenReview with `spec.token` = the rest and `spec.audiences` = [audience] is created;
3. an API error, a non-empty `status.error` or `status.authenticated == false` refuses;
4. `status.user.username` split on `:` gives exactly `system`, `serviceaccount`, `<ns>`,
   `<sa>`, and both names are the configured ones: `check_review()`.

Refusal texts are the reference's, byte for byte (tests/interop/server-agent-auth.json),
and travel as grpc-status 2 (UNKNOWN), as the Go server sends them. Three checks are ours,
each refusing what the reference would have sent to kube-apiserver or accepted:

* an empty token, or one longer than `MAX_TOKEN_BYTES`, is refused without a review
  (kube-apiserver refuses an empty one with 400 "token is required ...": same text);
* when the review lists `status.audiences`, the configured audience must be among them;
  an authenticated review with no audiences at all comes from an authenticator that is
  not audience aware (the token is then valid for kube-apiserver itself, not for us), and
  is refused too. kube-apiserver's own service-account authenticator always lists them.

No message contains the token. `redact()` removes it from texts that come from elsewhere.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Protocol

from proxy_common import metadata
from proxy_common.errors import AuthError

SERVICE_ACCOUNT_USER = ("system", "serviceaccount")
MAX_TOKEN_BYTES = 8192
VALIDATE_PREFIX = "Failed to validate authentication token, err:"
NO_HEADER = "Authentication context was not found in metadata"
REDACTED = "[redacted]"


class Refusal(enum.StrEnum):
    """Why an agent was refused; also the `reason` label of the refusal counter."""

    NO_HEADER = "no_header"
    TOO_MANY_HEADERS = "too_many_headers"
    WRONG_SCHEME = "wrong_scheme"
    EMPTY_TOKEN = "empty_token"
    TOKEN_TOO_LONG = "token_too_long"
    API_UNAVAILABLE = "api_unavailable"
    REVIEW_ERROR = "review_error"
    NOT_AUTHENTICATED = "not_authenticated"
    USERNAME_FORMAT = "username_format"
    NOT_SERVICE_ACCOUNT = "not_service_account"
    WRONG_NAMESPACE = "wrong_namespace"
    WRONG_SERVICE_ACCOUNT = "wrong_service_account"
    AUDIENCE_NOT_GRANTED = "audience_not_granted"


class AgentAuthError(AuthError):
    """An agent failed authentication; `str(exc)` is the gRPC message it is sent."""

    def __init__(self, reason: Refusal, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class AuthPolicy:
    """Who may connect: `--agent-namespace`, `--agent-service-account`, `--authentication-audience`."""

    namespace: str
    service_account: str
    audience: str


@dataclass(frozen=True, slots=True)
class ReviewResult:
    """The `status` of a TokenReview, as kube-apiserver answered it."""

    authenticated: bool
    username: str = ""
    error: str = ""
    audiences: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class AgentIdentity:
    namespace: str
    service_account: str

    @property
    def username(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.service_account}"


class TokenVerifier(Protocol):
    """Asks kube-apiserver about a token; raises `ReviewUnavailable` when it cannot."""

    def review(self, token: str) -> Awaitable[ReviewResult]: ...


class ReviewUnavailable(Exception):
    """No answer from kube-apiserver (unreachable, timed out, refused the request).

    `str(exc)` describes the failure in client-go's words and never contains the token.
    """


def _refuse_lookup(reason: Refusal, detail: str) -> AgentAuthError:
    return AgentAuthError(reason, f"{VALIDATE_PREFIX}lookup failed: {detail}")


def bearer_token(md: metadata.Metadata | None) -> str:
    """The token of the only `authorization: Bearer <token>` header, or a refusal."""
    found = metadata.values(md, metadata.AUTHORIZATION)
    if not found:
        raise AgentAuthError(Refusal.NO_HEADER, NO_HEADER)
    if len(found) > 1:
        raise AgentAuthError(Refusal.TOO_MANY_HEADERS, f"too many ({len(found)}) tokens are received")
    value = found[0]
    if not value.startswith(metadata.BEARER_PREFIX):
        raise AgentAuthError(Refusal.WRONG_SCHEME, f'received token does not have "{metadata.BEARER_PREFIX}" prefix')
    token = value[len(metadata.BEARER_PREFIX) :]
    if not token:
        raise AgentAuthError(
            Refusal.EMPTY_TOKEN,
            f"{VALIDATE_PREFIX}Failed to authenticate request. err:token is required for TokenReview in authentication",
        )
    if len(token) > MAX_TOKEN_BYTES:
        raise AgentAuthError(Refusal.TOKEN_TOO_LONG, f"{VALIDATE_PREFIX}token is longer than {MAX_TOKEN_BYTES} bytes")
    return token


def unavailable(detail: str) -> AgentAuthError:
    """The refusal when kube-apiserver could not be asked (fail closed)."""
    return AgentAuthError(Refusal.API_UNAVAILABLE, f"{VALIDATE_PREFIX}Failed to authenticate request. err:{detail}")


def check_review(policy: AuthPolicy, result: ReviewResult) -> AgentIdentity:
    """Accept the review's user if it is the configured service account, else refuse."""
    if result.error:
        raise _refuse_lookup(Refusal.REVIEW_ERROR, result.error)
    if not result.authenticated:
        raise _refuse_lookup(Refusal.NOT_AUTHENTICATED, "service account jwt not valid")
    parts = result.username.split(":")
    if len(parts) != 4:
        raise _refuse_lookup(Refusal.USERNAME_FORMAT, "unexpected username format")
    if tuple(parts[:2]) != SERVICE_ACCOUNT_USER:
        raise _refuse_lookup(Refusal.NOT_SERVICE_ACCOUNT, "username returned is not a service account")
    namespace, service_account = parts[2], parts[3]
    if namespace != policy.namespace:
        raise _refuse_lookup(
            Refusal.WRONG_NAMESPACE, f'incoming request from "{namespace}" namespace. Expected "{policy.namespace}"'
        )
    if service_account != policy.service_account:
        raise _refuse_lookup(
            Refusal.WRONG_SERVICE_ACCOUNT,
            f'incoming request from "{service_account}" service account. Expected "{policy.service_account}"',
        )
    if policy.audience not in result.audiences:
        granted = ", ".join(f'"{a}"' for a in result.audiences) or "none"
        raise _refuse_lookup(
            Refusal.AUDIENCE_NOT_GRANTED, f'audience "{policy.audience}" not granted (granted: {granted})'
        )
    return AgentIdentity(namespace, service_account)


def is_cacheable_success(result: ReviewResult) -> bool:
    """Whether kube-apiserver vouched for the token (what the cache may keep longest)."""
    return result.authenticated and not result.error


def token_expiry(token: str) -> float | None:
    """The `exp` claim of a JWT, in Unix seconds, read WITHOUT verifying anything.

    Only ever used to shorten how long a review is cached: a cached success must not
    outlive the token it vouched for. Anything that is not a readable JWT gives None.
    """
    parts = token.split(".")
    if len(parts) != 3:
        return None
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except (ValueError, binascii.Error):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        return None
    return float(exp)


def redact(text: str, token: str) -> str:
    """`text` with every occurrence of `token` replaced (for texts we did not write)."""
    return text.replace(token, REDACTED) if token else text
