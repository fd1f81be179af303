"""Counting proxy servers from their Leases (`--count-server-leases`).

SHELL. The reference reads the Leases from an informer (list + watch, resync 10 s); this
agent lists them every `lease_list_interval` seconds (default 5 s, `--lease-list-interval`)
instead, which costs one small LIST per interval and needs only the `list` verb. The
Leases last listed are kept, and validity is judged when the count is asked for, so a
Lease that expires between two lists stops counting at once. A failed list keeps the
previous Leases (the previous count; initially none, i.e. 1), logs why and is counted in
`..._agent_lease_lists_total` with the API's status code and reason.

The decisions (validity, zero -> 1, `--server-count-source`) are `proxy_common.leases`'s.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Callable

from proxy_agent.config import AgentConfig
from proxy_agent.metrics import AgentMetrics
from proxy_common import kube, leases
from proxy_common.kube import ApiFailure

log = logging.getLogger("proxy_agent.leases")

USER_AGENT = "konnectivity-py-proxy-agent"


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class LeaseCounter:
    def __init__(
        self,
        caller: kube.ApiCaller,
        config: AgentConfig,
        metrics: AgentMetrics,
        *,
        clock: Callable[[], dt.datetime] = utc_now,
    ) -> None:
        from kubernetes import client as k8s

        self.caller = caller
        self.api = k8s.CoordinationV1Api(caller.api_client)
        self.namespace = config.lease_namespace
        self.selector = config.lease_label_selector
        self.interval = config.lease_list_interval
        self.metrics = metrics
        self.clock = clock
        self.leases: list[leases.LeaseView] = []
        self.lists = 0
        self._last_logged: int | None = None

    def count(self) -> int:
        """Valid Leases now, among those last listed (0 when none or never listed)."""
        return leases.count_valid(self.leases, self.clock())

    async def run(self) -> None:
        """List every `interval` seconds until cancelled."""
        while True:
            await self.list_once()
            await asyncio.sleep(self.interval)

    async def list_once(self) -> bool:
        started = time.monotonic()
        try:
            listed = await self.caller.call(self.api.list_namespaced_lease, self.namespace, label_selector=self.selector)
        except ApiFailure as exc:
            self._observe(exc.code, exc.reason, time.monotonic() - started)
            log.warning("cannot list server leases, keeping the last count namespace=%s selector=%s code=%d "
                        "error=%s count=%d", self.namespace, self.selector, exc.code, exc.message, self.count())
            return False
        self._observe(200, "", time.monotonic() - started)
        self.leases = [kube.lease_view(item) for item in listed.items or ()]
        self.lists += 1
        count = self.count()
        if count != self._last_logged:
            log.info("server leases counted namespace=%s selector=%s valid=%d listed=%d",
                     self.namespace, self.selector, count, len(self.leases))
            self._last_logged = count
        return True

    def _observe(self, code: int, reason: str, seconds: float) -> None:
        if code:  # only API answers have a status code to count; transport failures are logged
            self.metrics.lease_list_latency.labels(str(code)).observe(seconds)
            self.metrics.lease_lists.labels(str(code), reason).inc()

    async def aclose(self) -> None:
        await self.caller.aclose()


def build(config: AgentConfig, metrics: AgentMetrics) -> LeaseCounter:
    """The counter for `--count-server-leases`; raises ConfigError when the API config is unusable."""
    configuration = kube.load_client_configuration(config.kubeconfig)
    caller = kube.ApiCaller(configuration, timeout=config.lease_api_timeout, user_agent=USER_AGENT, name="lease")
    return LeaseCounter(caller, config, metrics)
