"""The `kubernetes` client, built once from `--kubeconfig`, and how its errors read.

SHELL. Shared by the server (TokenReview, its Lease) and the agent (counting Leases). The
`kubernetes` package is imported inside the functions: a daemon that never talks to the
API never pays for loading it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import errno
import functools
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from proxy_common import leases
from proxy_common.errors import ConfigError

if TYPE_CHECKING:
    from kubernetes import client as kube


def load_client_configuration(kubeconfig: str) -> kube.Configuration:
    """The API client configuration from `--kubeconfig`, or in-cluster when it is empty."""
    from kubernetes import client as kube
    from kubernetes import config as kube_config
    from kubernetes.config.config_exception import ConfigException

    configuration = kube.Configuration()
    try:
        if kubeconfig:
            kube_config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=kubeconfig, client_configuration=configuration, persist_config=False
            )
        else:
            kube_config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    except (ConfigException, OSError, ValueError) as exc:
        where = f"--kubeconfig {kubeconfig}" if kubeconfig else "in-cluster configuration (--kubeconfig is empty)"
        raise ConfigError([f"cannot load {where}: {exc}"]) from exc
    return configuration


def api_status(exc: Any) -> tuple[int, str, str]:
    """(HTTP code, Status reason, message) of a `kube.ApiException`, as client-go reports them."""
    code = int(getattr(exc, "status", 0) or 0)
    try:
        body = json.loads(getattr(exc, "body", None) or b"")
    except ValueError:
        body = None
    if isinstance(body, dict):
        reason = body.get("reason") if isinstance(body.get("reason"), str) else ""
        message = body.get("message") if isinstance(body.get("message"), str) else ""
        if message:
            return code, str(reason), str(message)
        return code, str(reason), f"the server responded with the status code {code} ({exc.reason or 'no reason'})"
    return code, "", f"the server responded with the status code {code} ({getattr(exc, 'reason', '') or 'no reason'})"


def transport_error_text(exc: BaseException) -> str:
    """A short, Go-like text for a failure below HTTP (refused, timeout, TLS...)."""
    import urllib3

    root: BaseException = exc
    for _ in range(16):  # the innermost cause, within reason
        inner = getattr(root, "reason", None) if isinstance(root, urllib3.exceptions.MaxRetryError) else None
        inner = inner or root.__cause__ or root.__context__
        if not isinstance(inner, BaseException) or inner is root:
            break
        root = inner
    if isinstance(root, TimeoutError | urllib3.exceptions.TimeoutError):
        return "i/o timeout"
    if isinstance(root, ConnectionRefusedError) or getattr(root, "errno", None) == errno.ECONNREFUSED:
        return "connect: connection refused"
    if isinstance(root, OSError) and root.strerror:
        return root.strerror.lower()
    return f"{type(root).__name__}: {root}"


class ApiFailure(Exception):
    """A failed API call, reduced to what callers need. `code` 0: no HTTP answer at all."""

    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message


class ApiCaller:
    """Runs the synchronous `kubernetes` client's calls in a few threads of our own, each
    bounded by `timeout` (the request's own timeout, and a slightly longer wait for it).

    Failures leave as `ApiFailure`: the library's exception is dropped inside the thread,
    with the HTTP response (and socket) its traceback would keep alive. `aclose()` waits for
    calls still running (bounded by their timeout), then closes the connection pool.
    """

    def __init__(self, configuration: kube.Configuration, *, timeout: float, workers: int = 2,
                 user_agent: str = "konnectivity-py", name: str = "kube-api") -> None:
        import urllib3
        from kubernetes import client as kube

        configuration.connection_pool_maxsize = workers
        configuration.retries = urllib3.Retry(total=0, redirect=0)  # our loops retry, with back-off
        self.timeout = timeout
        self.api_client = kube.ApiClient(configuration)
        self.api_client.user_agent = user_agent
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)

    async def call(self, method: Callable[..., Any], *args: Any, deadline: float | None = None, **kwargs: Any) -> Any:
        """`method(*args, **kwargs)` in a worker thread, within `deadline` (default: `timeout`) seconds."""
        bound = self.timeout if deadline is None else deadline
        kwargs["_request_timeout"] = bound
        loop = asyncio.get_running_loop()
        job = functools.partial(_call_blocking, method, args, kwargs)
        try:
            async with asyncio.timeout(bound + 1):
                return await loop.run_in_executor(self._executor, job)
        except TimeoutError:
            raise ApiFailure(0, "", "i/o timeout") from None

    async def aclose(self) -> None:
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)
        self.api_client.close()  # type: ignore[no-untyped-call]


def _call_blocking(method: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    from kubernetes import client as kube

    try:
        return method(*args, **kwargs)
    except kube.ApiException as exc:
        failure = ApiFailure(*api_status(exc))
    except Exception as exc:  # the HTTP stack's errors, translated once, here
        failure = ApiFailure(0, "", transport_error_text(exc))
    raise failure


def micro_time(moment: dt.datetime) -> dt.datetime:
    """A time the client serializes as kube-apiserver's MicroTime expects it.

    The client writes `isoformat()`, which drops the fraction when it is zero; MicroTime
    parsing requires exactly six fractional digits, so such a time would be refused."""
    return moment.replace(microsecond=1) if moment.microsecond == 0 else moment


def lease_view(lease: Any) -> leases.LeaseView:
    """The decision fields of a `V1Lease` as the client returned it."""
    meta, spec = lease.metadata, lease.spec
    return leases.LeaseView(
        name=meta.name or "",
        resource_version=meta.resource_version or "",
        holder=(spec.holder_identity or "") if spec else "",
        duration_seconds=spec.lease_duration_seconds if spec else None,
        renew_time=spec.renew_time if spec else None,
        acquire_time=spec.acquire_time if spec else None,
    )
