"""The server's Lease: published and renewed, expired ones culled, deleted on shutdown.

SHELL (`--enable-lease-controller`). Two loops in one owned task:

* renew: make sure `konnectivity-proxy-server-<server-id>` exists in `--lease-namespace`
  with the `--lease-label` labels, this server as holder and a 30 s duration, then refresh
  its `renewTime` every 15 s (+ up to 4 % jitter). While the API refuses or cannot be
  reached, retry with exponential back-off (0.2 s doubling, at most 7 s), as the
  reference's lease controller does, logging why.
* garbage collection: every 15 s list the Leases with those labels and delete each expired
  one with its resourceVersion as precondition (a Lease renewed in between survives),
  counted under the reference's metric names.

Every API call runs in a worker thread of `proxy_common.kube.ApiCaller`, bounded by
`lease_api_timeout`. `stop()` cancels the loops, then deletes the server's own Lease, so
agents counting Leases stop looking for it at once instead of after 30 s.
The decisions (names, labels, validity, what to cull) are `proxy_common.leases`'s.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import random
import time
from collections.abc import Callable
from typing import Any

from proxy_common import kube, leases
from proxy_common.kube import ApiFailure
from proxy_server.config import ServerConfig
from proxy_server.metrics import ServerMetrics

log = logging.getLogger("proxy_server.leases")

USER_AGENT = "konnectivity-py-proxy-server"
CREATE_RETRY_BASE = 0.1
SHUTDOWN_DELETE_SECONDS = 3.0  # the own Lease's deletion must not hold a stopping server for long


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class LeaseController:
    def __init__(
        self,
        caller: kube.ApiCaller,
        config: ServerConfig,
        metrics: ServerMetrics,
        *,
        clock: Callable[[], dt.datetime] = utc_now,
        rng: random.Random | None = None,
    ) -> None:
        from kubernetes import client as k8s

        self._k8s = k8s
        self.caller = caller
        self.api = k8s.CoordinationV1Api(caller.api_client)
        self.namespace = config.lease_namespace
        self.server_id = config.server_id
        self.name = leases.lease_name(config.server_id)
        self.labels = config.lease_labels()
        self.selector = leases.selector_of(self.labels)
        self.duration = config.lease_duration_seconds
        self.renew_interval = config.lease_renew_interval
        self.gc_interval = config.lease_gc_interval
        self.metrics = metrics
        self.clock = clock
        self._rng = rng or random.Random()
        self._latest: Any = None  # the Lease as last written, for the next renewal's resourceVersion
        self._task: asyncio.Task[None] | None = None
        self.renewals = 0

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"lease-controller {self.name}")
        log.info("lease controller started namespace=%s lease=%s labels=%s duration=%ss renew_every=%ss gc_every=%ss",
                 self.namespace, self.name, self.selector, self.duration, self.renew_interval, self.gc_interval)

    async def stop(self, *, delete_own: bool = True) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        try:
            if delete_own:
                await self._delete_own()
        finally:
            await self.caller.aclose()

    async def _run(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self._renew_loop(), name=f"lease-renew {self.name}")
            group.create_task(self._gc_loop(), name=f"lease-gc {self.namespace}")

    # -------------------------------------------------------------------- renew
    async def _renew_loop(self) -> None:
        failures = 0
        while True:
            try:
                await self.renew_once()
            except ApiFailure as exc:
                failures += 1
                delay = min(leases.create_retry_delay(failures, 2 * CREATE_RETRY_BASE), self.renew_interval)
                log.warning("cannot publish the server lease namespace=%s lease=%s code=%d error=%s retry_in=%.1fs",
                            self.namespace, self.name, exc.code, exc.message, delay)
            else:
                failures = 0
                delay = leases.renew_delay(self.renew_interval, self._rng.random())
            await asyncio.sleep(delay)

    async def renew_once(self) -> None:
        """Create the Lease if it is missing, else move its renewTime to now."""
        if self._latest is None:
            try:
                self._latest = await self.caller.call(self.api.read_namespaced_lease, self.name, self.namespace)
            except ApiFailure as exc:
                if exc.code != 404:
                    raise
                self._latest = await self.caller.call(self.api.create_namespaced_lease, self.namespace, self._new_lease())
                self.renewals += 1
                log.info("server lease created namespace=%s lease=%s", self.namespace, self.name)
                return
        lease = self._latest
        now = kube.micro_time(self.clock())
        if lease.spec is None:
            lease.spec = self._k8s.V1LeaseSpec()
        lease.metadata.labels = {**(lease.metadata.labels or {}), **self.labels}
        lease.spec.holder_identity = self.server_id
        lease.spec.lease_duration_seconds = self.duration
        lease.spec.renew_time = now
        if lease.spec.acquire_time is None:
            lease.spec.acquire_time = now
        try:
            self._latest = await self.caller.call(self.api.replace_namespaced_lease, self.name, self.namespace, lease)
        except ApiFailure as exc:
            self._latest = None  # conflict or gone: read (or create) it afresh next time
            if exc.code in (404, 409):
                await self.renew_once()
                return
            raise
        self.renewals += 1
        log.debug("server lease renewed namespace=%s lease=%s", self.namespace, self.name)

    def _new_lease(self) -> Any:
        k8s = self._k8s
        now = kube.micro_time(self.clock())
        return k8s.V1Lease(
            api_version="coordination.k8s.io/v1", kind="Lease",
            metadata=k8s.V1ObjectMeta(name=self.name, namespace=self.namespace, labels=dict(self.labels)),
            spec=k8s.V1LeaseSpec(holder_identity=self.server_id, lease_duration_seconds=self.duration,
                                 acquire_time=now, renew_time=now),
        )

    async def _delete_own(self) -> None:
        try:
            await self.caller.call(self.api.delete_namespaced_lease, self.name, self.namespace,
                                   deadline=min(SHUTDOWN_DELETE_SECONDS, self.caller.timeout))
        except ApiFailure as exc:
            if exc.code != 404:
                log.warning("cannot delete the server lease on shutdown namespace=%s lease=%s code=%d error=%s",
                            self.namespace, self.name, exc.code, exc.message)
                return
        log.info("server lease deleted namespace=%s lease=%s", self.namespace, self.name)

    # ----------------------------------------------------------------------- gc
    async def _gc_loop(self) -> None:
        while True:
            await self.collect_garbage()
            await asyncio.sleep(self.gc_interval)

    async def collect_garbage(self) -> int:
        """One GC round: list, delete the expired Leases. Returns how many were deleted."""
        started = time.monotonic()
        try:
            listed = await self.caller.call(self.api.list_namespaced_lease, self.namespace, label_selector=self.selector)
        except ApiFailure as exc:
            self._observe_list(exc.code, exc.reason, time.monotonic() - started)
            log.warning("cannot list server leases namespace=%s selector=%s code=%d error=%s",
                        self.namespace, self.selector, exc.code, exc.message)
            return 0
        self._observe_list(200, "", time.monotonic() - started)
        culled = 0
        for view in leases.to_cull([kube.lease_view(item) for item in listed.items or ()], self.clock()):
            if await self._delete_expired(view):
                culled += 1
        return culled

    async def _delete_expired(self, view: leases.LeaseView) -> bool:
        k8s = self._k8s
        options = k8s.V1DeleteOptions(preconditions=k8s.V1Preconditions(resource_version=view.resource_version))
        started = time.monotonic()
        try:
            await self.caller.call(self.api.delete_namespaced_lease, view.name, self.namespace, body=options)
        except ApiFailure as exc:
            self._observe_delete(exc.code, exc.reason, time.monotonic() - started)
            if exc.code == 404:
                log.info("expired server lease already deleted namespace=%s lease=%s", self.namespace, view.name)
            elif exc.code == 409:
                log.info("expired server lease was renewed meanwhile, kept namespace=%s lease=%s",
                         self.namespace, view.name)
            else:
                log.warning("cannot delete expired server lease namespace=%s lease=%s code=%d error=%s",
                            self.namespace, view.name, exc.code, exc.message)
            return False
        self._observe_delete(200, "", time.monotonic() - started)
        self.metrics.culled_leases.inc()
        log.info("expired server lease deleted namespace=%s lease=%s holder=%s", self.namespace, view.name, view.holder)
        return True

    def _observe_list(self, code: int, reason: str, seconds: float) -> None:
        if code:  # only API answers have a status code to count; transport failures are logged
            self.metrics.lease_list_latency.labels(str(code)).observe(seconds)
            self.metrics.lease_lists.labels(str(code), reason).inc()

    def _observe_delete(self, code: int, reason: str, seconds: float) -> None:
        if code:
            self.metrics.lease_delete_latency.labels(str(code)).observe(seconds)
            self.metrics.lease_deletes.labels(str(code), reason).inc()


def build(config: ServerConfig, metrics: ServerMetrics) -> LeaseController:
    """The controller for `--enable-lease-controller`; raises ConfigError when the API config is unusable."""
    configuration = kube.load_client_configuration(config.kubeconfig)
    caller = kube.ApiCaller(configuration, timeout=config.lease_api_timeout, user_agent=USER_AGENT, name="lease")
    return LeaseController(caller, config, metrics)
