"""A small HTTPS stand-in for the few kube-apiserver calls the proxy makes.

The only stand-in the developer guide allows: no kube-apiserver runs in CI, so this
answers like one for exactly two APIs, over real TLS on loopback, and the product talks to
it through the real `kubernetes` Python client (point a kubeconfig at it with
`write_kubeconfig()`):

* `POST /apis/authentication.k8s.io/v1/tokenreviews`: answered from a table of known
  tokens (`add_service_account_token`, `add_user_token`), the way kube-apiserver's
  service-account authenticator does: unknown token -> `authenticated: false`; expired ->
  `error: "token has expired"`; no audience in common with `spec.audiences` (default: the
  API server's own) -> refused with kube-apiserver's audience error; otherwise the user and
  the granted audiences. Empty token -> 400, as kube-apiserver. Every review is recorded
  (`token_reviews`, `review_count`) so tests can prove the proxy's cache.
* `coordination.k8s.io/v1` Leases in any namespace: create (POST, with `generateName`),
  get, replace (PUT, optimistic concurrency on `metadata.resourceVersion`), list with an
  equality-based `labelSelector` (`k=v`, `k==v`, `k!=v`, `k`, `!k`, comma = and), delete
  with `preconditions` (uid, resourceVersion). 404/409/422 carry kube-apiserver's `Status`
  bodies. `lease()` / `store_lease()` let a test read or plant objects directly.

Callers authenticate with the client certificate or bearer token of the kubeconfig (401
otherwise); `forbid_token_reviews` answers 403 like missing RBAC, and `fail_reviews_with`
makes every review fail with a given status, `review_delay` holds each review back.
Only JSON bodies are accepted (415 otherwise): the Python client never sends protobuf.

Runs in a thread (`start()`/`close()`, or `with FakeKube(...) as fake:`); `close()` shuts
every connection so no socket outlives the test. It never logs a request.
"""

from __future__ import annotations

import contextlib
import http.server
import itertools
import json
import secrets
import socket
import ssl
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from proxy_common.certs import DemoPki

API_AUDIENCE = "https://kubernetes.default.svc.cluster.local"
MAX_BODY_BYTES = 3 << 20  # kube-apiserver's request body limit
LEASE_PREFIX = "/apis/coordination.k8s.io/v1/namespaces/"
TOKEN_REVIEW_PATH = "/apis/authentication.k8s.io/v1/tokenreviews"
CREATED_AT = "2026-01-01T00:00:00Z"


@dataclass(frozen=True)
class KnownToken:
    """What the fake's authenticator knows about one bearer token."""

    username: str
    audiences: tuple[str, ...] = (API_AUDIENCE,)
    expired: bool = False
    uid: str = field(default_factory=lambda: str(uuid.uuid4()))
    groups: tuple[str, ...] = ("system:authenticated",)


@dataclass(frozen=True)
class ReviewRecord:
    token: str
    audiences: tuple[str, ...]
    content_type: str
    at: float  # time.monotonic() on arrival


class ApiError(Exception):
    """Ends a request with a kube-apiserver `Status` body."""

    def __init__(self, code: int, reason: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details


def status_body(code: int, reason: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                            "message": message, "reason": reason, "code": code}
    if details is not None:
        body["details"] = details
    return body


def go_quoted_list(values: tuple[str, ...] | list[str]) -> str:
    """Go's `%q` of a []string: ["a" "b"]."""
    return "[" + " ".join(json.dumps(v) for v in values) + "]"


def _lease_details(name: str) -> dict[str, Any]:
    return {"name": name, "group": "coordination.k8s.io", "kind": "leases"}


def _not_found(name: str) -> ApiError:
    return ApiError(404, "NotFound", f'leases.coordination.k8s.io "{name}" not found', _lease_details(name))


def _conflict(name: str) -> ApiError:
    return ApiError(409, "Conflict", f'Operation cannot be fulfilled on leases.coordination.k8s.io "{name}": '
                    "the object has been modified; please apply your changes to the latest version and try again",
                    _lease_details(name))


def parse_selector(text: str) -> list[tuple[str, str, str]]:
    """An equality-based label selector as (key, op, value) terms; op in =, !=, exists, !exists."""
    terms: list[tuple[str, str, str]] = []
    for raw in filter(None, (part.strip() for part in text.split(","))):
        if "(" in raw or " in " in raw or " notin " in raw:
            raise ApiError(400, "BadRequest", f"unable to parse requirement: set-based selector {raw!r} "
                           "is not supported by this stand-in")
        if "!=" in raw:
            key, value = raw.split("!=", 1)
            terms.append((key.strip(), "!=", value.strip()))
        elif "==" in raw or "=" in raw:
            key, value = raw.split("==", 1) if "==" in raw else raw.split("=", 1)
            terms.append((key.strip(), "=", value.strip()))
        elif raw.startswith("!"):
            terms.append((raw[1:].strip(), "!exists", ""))
        else:
            terms.append((raw, "exists", ""))
    return terms


def selector_matches(terms: list[tuple[str, str, str]], labels: dict[str, str]) -> bool:
    for key, op, value in terms:
        present = key in labels
        if op == "=" and labels.get(key) != value:
            return False
        if op == "!=" and present and labels[key] == value:
            return False
        if op == "exists" and not present:
            return False
        if op == "!exists" and present:
            return False
    return True


class FakeKube:
    """kube-apiserver's TokenReview and Lease APIs over HTTPS on 127.0.0.1."""

    def __init__(self, pki: DemoPki, *, client_tokens: tuple[str, ...] = ()) -> None:
        self.pki = pki
        self.client_tokens = set(client_tokens)
        self.tokens: dict[str, KnownToken] = {}
        self.audience_aware = True
        self.forbid_token_reviews = False
        self.fail_reviews_with: tuple[int, str, str] | None = None
        self.review_delay = 0.0
        self.token_reviews: list[ReviewRecord] = []
        self.requests: list[tuple[str, str]] = []
        self._leases: dict[tuple[str, str], dict[str, Any]] = {}
        self._versions = itertools.count(1000)
        self._lock = threading.Lock()
        self._release = threading.Event()
        self._connections: set[socket.socket] = set()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ test API
    def add_service_account_token(
        self, token: str, namespace: str, name: str, *, audiences: tuple[str, ...] = (API_AUDIENCE,),
        expired: bool = False,
    ) -> None:
        groups = ("system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated")
        self.tokens[token] = KnownToken(f"system:serviceaccount:{namespace}:{name}", audiences, expired, groups=groups)

    def add_user_token(self, token: str, username: str, *, audiences: tuple[str, ...] = (API_AUDIENCE,)) -> None:
        self.tokens[token] = KnownToken(username, audiences)

    @property
    def review_count(self) -> int:
        with self._lock:
            return len(self.token_reviews)

    def reviewed_tokens(self) -> list[str]:
        with self._lock:
            return [r.token for r in self.token_reviews]

    def lease(self, namespace: str, name: str) -> dict[str, Any] | None:
        with self._lock:
            found = self._leases.get((namespace, name))
            return json.loads(json.dumps(found)) if found is not None else None

    def store_lease(self, namespace: str, lease: dict[str, Any]) -> dict[str, Any]:
        """Plant a Lease as if another server had written it (any spec, e.g. an expired one)."""
        with self._lock:
            return self._store(namespace, lease, uid=str(uuid.uuid4()), created=CREATED_AT)

    @property
    def url(self) -> str:
        assert self._server is not None, "not started"
        return f"https://127.0.0.1:{self._server.server_address[1]}"

    def write_kubeconfig(self, path: Path, *, token: str | None = None) -> Path:
        """A kubeconfig for this server: the test CA, and the client certificate unless `token`."""
        user: dict[str, str] = (
            {"token": token} if token is not None
            else {"client-certificate": str(self.pki.client_cert), "client-key": str(self.pki.client_key)}
        )
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url,
                                                      "certificate-authority": str(self.pki.ca_cert)}}],
            "users": [{"name": "fake", "user": user}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
        }
        path.write_text(json.dumps(config, indent=1))
        return path

    # --------------------------------------------------------------- lifecycle
    def start(self) -> FakeKube:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.pki.server_cert, self.pki.server_key)
        context.load_verify_locations(self.pki.ca_cert)
        context.verify_mode = ssl.CERT_OPTIONAL
        fake = self

        class Handler(_Handler):
            owner = fake

        server = _Server(("127.0.0.1", 0), Handler)
        server.daemon_threads = False
        server.block_on_close = True
        server.socket = context.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fakekube", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._server is None:
            return
        self._release.set()
        self._server.shutdown()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._server.server_close()  # joins the request threads
        assert self._thread is not None
        self._thread.join(timeout=5)
        self._server = None

    def __enter__(self) -> FakeKube:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------- API logic
    def handle(self, method: str, path: str, query: dict[str, list[str]], body: Any,
               user: str, content_type: str) -> tuple[int, Any]:
        with self._lock:
            self.requests.append((method, path))
        if path == TOKEN_REVIEW_PATH and method == "POST":
            return self._token_review(body, user, content_type)
        if path.startswith(LEASE_PREFIX):
            rest = path[len(LEASE_PREFIX) :].split("/")
            if len(rest) in (2, 3) and rest[1] == "leases":
                with self._lock:
                    return self._leases_call(method, rest[0], rest[2] if len(rest) == 3 else "", query, body)
        raise ApiError(404, "NotFound", "the server could not find the requested resource")

    def _token_review(self, body: Any, user: str, content_type: str) -> tuple[int, Any]:
        if self.forbid_token_reviews:
            raise ApiError(403, "Forbidden", f'tokenreviews.authentication.k8s.io is forbidden: User "{user}" cannot '
                           'create resource "tokenreviews" in API group "authentication.k8s.io" at the cluster scope',
                           {"group": "authentication.k8s.io", "kind": "tokenreviews"})
        spec = (body.get("spec") or {}) if isinstance(body, dict) else {}
        token = spec.get("token") or ""
        if not token:
            raise ApiError(400, "BadRequest", "token is required for TokenReview in authentication")
        requested = tuple(spec.get("audiences") or ())
        with self._lock:
            self.token_reviews.append(ReviewRecord(token, requested, content_type, time.monotonic()))
        if self.review_delay:
            self._release.wait(self.review_delay)
        if self.fail_reviews_with is not None:
            raise ApiError(*self.fail_reviews_with)
        answer = dict(body)
        answer.update(apiVersion="authentication.k8s.io/v1", kind="TokenReview",
                      metadata={"creationTimestamp": None}, status=self._review_status(token, requested))
        return 201, answer  # kube-apiserver echoes the spec, token included

    def _review_status(self, token: str, requested: tuple[str, ...]) -> dict[str, Any]:
        known = self.tokens.get(token)
        if known is None:
            return {"user": {}}
        if known.expired:
            return {"user": {}, "error": "token has expired"}
        user = {"username": known.username, "uid": known.uid, "groups": list(known.groups)}
        if not self.audience_aware:
            return {"authenticated": True, "user": user}
        targets = requested or (API_AUDIENCE,)
        granted = [a for a in targets if a in known.audiences]
        if not granted:
            return {"user": {}, "error": f"token audiences {go_quoted_list(known.audiences)} is invalid "
                    f"for the target audiences {go_quoted_list(targets)}"}
        return {"authenticated": True, "user": user, "audiences": granted}

    def _leases_call(self, method: str, namespace: str, name: str, query: dict[str, list[str]],
                     body: Any) -> tuple[int, Any]:
        match (method, bool(name)):
            case ("GET", False):
                return 200, self._list(namespace, (query.get("labelSelector") or [""])[0])
            case ("POST", False):
                return 201, self._create(namespace, body)
            case ("GET", True):
                found = self._leases.get((namespace, name))
                if found is None:
                    raise _not_found(name)
                return 200, found
            case ("PUT", True):
                return 200, self._replace(namespace, name, body)
            case ("DELETE", True):
                return 200, self._delete(namespace, name, body)
        raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")

    def _list(self, namespace: str, selector: str) -> dict[str, Any]:
        terms = parse_selector(selector)
        items = [
            {k: v for k, v in lease.items() if k not in ("apiVersion", "kind")}
            for (ns, _), lease in sorted(self._leases.items())
            if ns == namespace and selector_matches(terms, lease["metadata"].get("labels") or {})
        ]
        return {"apiVersion": "coordination.k8s.io/v1", "kind": "LeaseList",
                "metadata": {"resourceVersion": str(next(self._versions))}, "items": items}

    def _create(self, namespace: str, body: Any) -> dict[str, Any]:
        meta = (body.get("metadata") or {}) if isinstance(body, dict) else {}
        name = meta.get("name") or ""
        if not name and meta.get("generateName"):
            name = meta["generateName"] + secrets.token_hex(3)[:5]
        if not name:
            raise ApiError(422, "Invalid", 'Lease.coordination.k8s.io "" is invalid: metadata.name: Required value: '
                           "name or generateName is required")
        if meta.get("namespace") not in (None, "", namespace):
            raise ApiError(400, "BadRequest", "the namespace of the provided object does not match the namespace "
                           "sent on the request")
        if (namespace, name) in self._leases:
            raise ApiError(409, "AlreadyExists", f'leases.coordination.k8s.io "{name}" already exists',
                           _lease_details(name))
        lease = dict(body)
        lease["metadata"] = dict(meta, name=name)
        return self._store(namespace, lease, uid=str(uuid.uuid4()), created=CREATED_AT)

    def _replace(self, namespace: str, name: str, body: Any) -> dict[str, Any]:
        meta = (body.get("metadata") or {}) if isinstance(body, dict) else {}
        if meta.get("name") != name:
            raise ApiError(400, "BadRequest", f"the name of the object ({meta.get('name')}) does not match the "
                           f"name on the URL ({name})")
        current = self._leases.get((namespace, name))
        if current is None:
            raise _not_found(name)
        version = meta.get("resourceVersion")
        if not version:
            raise ApiError(422, "Invalid", f'Lease.coordination.k8s.io "{name}" is invalid: '
                           "metadata.resourceVersion: Invalid value: 0x0: must be specified for an update")
        if version != current["metadata"]["resourceVersion"]:
            raise _conflict(name)
        return self._store(namespace, dict(body), uid=current["metadata"]["uid"],
                           created=current["metadata"]["creationTimestamp"])

    def _delete(self, namespace: str, name: str, body: Any) -> dict[str, Any]:
        current = self._leases.get((namespace, name))
        if current is None:
            raise _not_found(name)
        pre = (body.get("preconditions") or {}) if isinstance(body, dict) else {}
        for key, label in (("uid", "UID"), ("resourceVersion", "ResourceVersion")):
            wanted, actual = pre.get(key), current["metadata"][key]
            if wanted is not None and wanted != actual:
                raise ApiError(409, "Conflict", f"Precondition failed: {label} in precondition: {wanted}, "
                               f"{label} in object meta: {actual}", _lease_details(name))
        del self._leases[(namespace, name)]
        details = dict(_lease_details(name), uid=current["metadata"]["uid"])
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": details}

    def _store(self, namespace: str, lease: dict[str, Any], *, uid: str, created: str) -> dict[str, Any]:
        meta = dict(lease.get("metadata") or {})
        meta.update(namespace=namespace, uid=uid, creationTimestamp=created,
                    resourceVersion=str(next(self._versions)))
        stored = dict(lease, apiVersion="coordination.k8s.io/v1", kind="Lease", metadata=meta)
        stored.setdefault("spec", {})
        self._leases[(namespace, meta["name"])] = stored
        return json.loads(json.dumps(stored))


class _Server(http.server.ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        """A peer that fails the TLS handshake or hangs up is not an error of the fake's."""


class _Handler(http.server.BaseHTTPRequestHandler):
    owner: FakeKube
    protocol_version = "HTTP/1.1"
    timeout = 10

    def setup(self) -> None:
        super().setup()
        with self.owner._lock:
            self.owner._connections.add(self.request)
        self.request.do_handshake()

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            super().finish()
        with self.owner._lock:
            self.owner._connections.discard(self.request)

    def log_message(self, format: str, *args: Any) -> None:  # never log requests (they carry tokens)
        return

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def _serve(self, method: str) -> None:
        try:
            body, content_type = self._body()  # read first: the connection is reused
            user = self._caller()
            split = urlsplit(self.path)
            code, answer = self.owner.handle(method, split.path, parse_qs(split.query), body, user, content_type)
        except ApiError as exc:
            code, answer = exc.code, status_body(exc.code, exc.reason, exc.message, exc.details)
        payload = json.dumps(answer).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _caller(self) -> str:
        cert = self.request.getpeercert()
        if cert:
            for rdn in cert.get("subject", ()):
                for key, value in rdn:
                    if key == "commonName":
                        return str(value)
        header = self.headers.get("Authorization", "")
        if header.startswith("Bearer ") and header[len("Bearer ") :] in self.owner.client_tokens:
            return "token-user"
        raise ApiError(401, "Unauthorized", "Unauthorized")

    def _body(self) -> tuple[Any, str]:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            raise ApiError(413, "RequestEntityTooLarge", "Request entity too large: limit is 3145728")
        raw = self.rfile.read(length) if length else b""
        content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip()
        if not raw:
            return None, content_type
        if content_type not in ("", "application/json"):  # none means JSON, as in kube-apiserver
            raise ApiError(415, "UnsupportedMediaType", f'the body of the request was in an unknown format - '
                           f'accepted media types include: application/json (got "{content_type}")')
        try:
            return json.loads(raw), content_type
        except ValueError as exc:
            raise ApiError(400, "BadRequest", f"the body of the request could not be decoded: {exc}") from None
