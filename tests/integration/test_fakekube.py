"""The Kubernetes API stand-in (tests/fakekube.py) answers the real `kubernetes` client the
way kube-apiserver does, for the calls the proxy makes: TokenReview and Leases.

These pin the stand-in itself, so tests built on it (token authentication here, lease-based
server counting next) rest on kube-apiserver's behaviour rather than on the stand-in's.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kubernetes import client as kube
from kubernetes import config as kube_config

from proxy_common.certs import DemoPki
from tests.fakekube import API_AUDIENCE, FakeKube, parse_selector, selector_matches

pytestmark = pytest.mark.integration
NS = "kube-system"


@pytest.fixture
def fake(pki: DemoPki) -> Iterator[FakeKube]:
    with FakeKube(pki, client_tokens=("operator-token",)) as kube_api:
        yield kube_api


def api_client(fake: FakeKube, tmp: Path, **kubeconfig: str) -> kube.ApiClient:
    configuration = kube.Configuration()
    path = fake.write_kubeconfig(tmp / "kubeconfig", **kubeconfig)
    kube_config.load_kube_config(config_file=str(path), client_configuration=configuration, persist_config=False)
    return kube.ApiClient(configuration)


@pytest.fixture
def leases(fake: FakeKube, tmp_path: Path) -> Iterator[kube.CoordinationV1Api]:
    client = api_client(fake, tmp_path)
    try:
        yield kube.CoordinationV1Api(client)
    finally:
        client.close()


def lease(name: str, labels: dict[str, str] | None = None, holder: str = "server-1") -> kube.V1Lease:
    return kube.V1Lease(
        metadata=kube.V1ObjectMeta(name=name, labels=labels or {"k8s-app": "konnectivity-server"}),
        spec=kube.V1LeaseSpec(holder_identity=holder, lease_duration_seconds=30,
                              renew_time=dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.UTC)),
    )


def failure(call: Callable[..., object], *args: object, **kwargs: object) -> tuple[int, dict[str, object]]:
    """The HTTP status and Status body of a call that must fail.

    The client's exception is dropped here, inside: its traceback holds the HTTP response
    and with it the connection's socket, which pytest.raises would keep alive.
    """
    try:
        call(*args, **kwargs)
    except kube.ApiException as exc:
        status, body = int(exc.status), json.loads(exc.body)
    else:
        raise AssertionError("the call succeeded")
    return status, body


# ------------------------------------------------------------------ leases
def test_create_get_and_list_by_label(leases: kube.CoordinationV1Api, fake: FakeKube) -> None:
    created = leases.create_namespaced_lease(NS, lease("server-1"))
    leases.create_namespaced_lease(NS, lease("other", {"app": "x"}))
    leases.create_namespaced_lease("default", lease("elsewhere"))
    assert created.metadata.namespace == NS and created.metadata.uid and created.metadata.resource_version
    got = leases.read_namespaced_lease("server-1", NS)
    assert got.spec.holder_identity == "server-1" and got.spec.lease_duration_seconds == 30
    assert got.spec.renew_time == dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.UTC)
    listed = leases.list_namespaced_lease(NS, label_selector="k8s-app=konnectivity-server")
    assert [item.metadata.name for item in listed.items] == ["server-1"]
    assert [i.metadata.name for i in leases.list_namespaced_lease(NS).items] == ["other", "server-1"]
    assert fake.lease(NS, "server-1")["spec"]["holderIdentity"] == "server-1"  # type: ignore[index]


def test_generate_name_makes_a_unique_name(leases: kube.CoordinationV1Api) -> None:
    body = lease("")
    body.metadata.name = None
    body.metadata.generate_name = "konnectivity-server-"
    first = leases.create_namespaced_lease(NS, body)
    second = leases.create_namespaced_lease(NS, body)
    assert first.metadata.name.startswith("konnectivity-server-")
    assert first.metadata.name != second.metadata.name


def test_creating_twice_is_a_409_already_exists(leases: kube.CoordinationV1Api) -> None:
    leases.create_namespaced_lease(NS, lease("server-1"))
    status, body = failure(leases.create_namespaced_lease, NS, lease("server-1"))
    assert (status, body["reason"]) == (409, "AlreadyExists")
    assert body["message"] == 'leases.coordination.k8s.io "server-1" already exists'


def test_missing_lease_is_a_404_with_a_status(leases: kube.CoordinationV1Api) -> None:
    status, body = failure(leases.read_namespaced_lease, "nope", NS)
    assert (status, body["reason"]) == (404, "NotFound")
    assert body["message"] == 'leases.coordination.k8s.io "nope" not found'


def test_replace_uses_optimistic_concurrency(leases: kube.CoordinationV1Api) -> None:
    created = leases.create_namespaced_lease(NS, lease("server-1"))
    created.spec.holder_identity = "server-2"
    updated = leases.replace_namespaced_lease("server-1", NS, created)
    assert updated.spec.holder_identity == "server-2"
    assert updated.metadata.uid == created.metadata.uid
    assert int(updated.metadata.resource_version) > int(created.metadata.resource_version)
    status, body = failure(leases.replace_namespaced_lease, "server-1", NS, created)  # the stale copy
    assert (status, body["reason"]) == (409, "Conflict")
    created.metadata.resource_version = None
    assert failure(leases.replace_namespaced_lease, "server-1", NS, created)[0] == 422
    assert failure(leases.replace_namespaced_lease, "ghost", NS, lease("ghost"))[0] == 404


def test_delete_honours_preconditions(leases: kube.CoordinationV1Api, fake: FakeKube) -> None:
    created = leases.create_namespaced_lease(NS, lease("server-1"))
    wrong = kube.V1DeleteOptions(preconditions=kube.V1Preconditions(uid="not-the-uid"))
    status, body = failure(leases.delete_namespaced_lease, "server-1", NS, body=wrong)
    assert status == 409
    assert str(body["message"]).startswith("Precondition failed: UID in precondition: not-the-uid")
    stale = kube.V1DeleteOptions(preconditions=kube.V1Preconditions(resource_version="1"))
    assert failure(leases.delete_namespaced_lease, "server-1", NS, body=stale)[0] == 409
    right = kube.V1DeleteOptions(preconditions=kube.V1Preconditions(
        uid=created.metadata.uid, resource_version=created.metadata.resource_version))
    leases.delete_namespaced_lease("server-1", NS, body=right)
    assert fake.lease(NS, "server-1") is None
    assert failure(leases.delete_namespaced_lease, "server-1", NS)[0] == 404


def test_planted_leases_are_listed_like_created_ones(leases: kube.CoordinationV1Api, fake: FakeKube) -> None:
    fake.store_lease(NS, {"metadata": {"name": "old", "labels": {"k8s-app": "konnectivity-server"}},
                          "spec": {"holderIdentity": "gone", "leaseDurationSeconds": 1,
                                   "renewTime": "2020-01-01T00:00:00.000000Z"}})
    [item] = leases.list_namespaced_lease(NS, label_selector="k8s-app=konnectivity-server").items
    assert item.spec.renew_time.year == 2020


@pytest.mark.parametrize(
    ("selector", "labels", "matches"),
    [
        ("a=1", {"a": "1"}, True), ("a==1", {"a": "2"}, False), ("a!=1", {}, True), ("a!=1", {"a": "1"}, False),
        ("a", {"a": ""}, True), ("!a", {"a": "x"}, False), ("a=1,b=2", {"a": "1", "b": "2"}, True),
        ("a=1,b=2", {"a": "1"}, False), ("", {"x": "y"}, True),
    ],
)
def test_equality_label_selectors(selector: str, labels: dict[str, str], matches: bool) -> None:
    assert selector_matches(parse_selector(selector), labels) is matches


# ------------------------------------------------------------------ tokenreview and access
def review(client: kube.ApiClient, token: str, audiences: list[str] | None) -> kube.V1TokenReviewStatus:
    body = kube.V1TokenReview(spec=kube.V1TokenReviewSpec(token=token, audiences=audiences))
    return kube.AuthenticationV1Api(client).create_token_review(body).status


def test_token_reviews_answer_like_the_service_account_authenticator(fake: FakeKube, tmp_path: Path) -> None:
    fake.add_service_account_token("t1", NS, "konnectivity-agent", audiences=("system:konnectivity-server",))
    client = api_client(fake, tmp_path)
    try:
        ok = review(client, "t1", ["system:konnectivity-server", "other"])
        assert (ok.authenticated, ok.user.username, ok.audiences) == (
            True, "system:serviceaccount:kube-system:konnectivity-agent", ["system:konnectivity-server"])
        assert "system:serviceaccounts:kube-system" in ok.user.groups
        assert review(client, "t1", None).error.startswith("token audiences")  # default: the API server's own
        assert not review(client, "unknown", None).authenticated
        assert failure(review, client, "", None)[0] == 400
    finally:
        client.close()
    assert [r.audiences for r in fake.token_reviews] == [("system:konnectivity-server", "other"), (), ()]
    assert API_AUDIENCE not in fake.tokens["t1"].audiences


def test_callers_need_a_client_certificate_or_a_known_token(fake: FakeKube, tmp_path: Path) -> None:
    with_token = api_client(fake, tmp_path, token="operator-token")
    stranger = api_client(fake, tmp_path, token="who-knows")
    try:
        assert kube.CoordinationV1Api(with_token).list_namespaced_lease(NS).items == []
        assert failure(kube.CoordinationV1Api(stranger).list_namespaced_lease, NS)[0] == 401
    finally:
        with_token.close()
        stranger.close()
