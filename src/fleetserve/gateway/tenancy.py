"""The gateway's side of tenants: which tenant a request is (its bearer key), whether it may use the
model it names, and its quotas against the shared ledger, before the request enters the pipeline; and,
when it ends, what it used. The decisions are the pure core's (`fleetserve.tenants`); this module reads
headers and awaits Redis."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from fleetserve.config import FleetConfig
from fleetserve.gateway.dispatch import refusal_error
from fleetserve.gateway.metrics import GatewayMetrics
from fleetserve.gateway.redis_ledger import QuotaStoreDown, Reservation, ServiceSync, SharedLedger
from fleetserve.pipeline import Stage
from fleetserve.protocol.errors import APIError
from fleetserve.tenants import ANONYMOUS, Tenant, TenantDirectory, check, rate_limit_headers
from fleetserve.tenants.vtc import FairQueueStage

log = logging.getLogger(__name__)

# an in-flight count outlives the longest request by this much before Redis forgets it
WINDOW_MARGIN_S = 60.0


@dataclass(slots=True)
class Admitted:
    """A request the tenant checks let in: its tenant, its place in the quota counts (None for a tenant
    without limits), and the x-ratelimit-* headers its response carries."""

    tenant: Tenant
    reservation: Reservation | None = None
    headers: tuple[tuple[str, str], ...] = ()


class Tenancy:
    def __init__(
        self,
        config: FleetConfig,
        metrics: GatewayMetrics,
        stages: tuple[Stage, ...],
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.directory: TenantDirectory = config.tenant_directory()
        self._metrics = metrics
        self._clock = wall_clock
        self.ledger = SharedLedger(config.redis, metrics, config.gateway.total_timeout_s + WINDOW_MARGIN_S)
        self._fair = [stage for stage in stages if isinstance(stage, FairQueueStage)]
        self._sync_interval_s = config.redis.sync_interval_s if config.redis else None
        self._bounded = any(tenant.limits.bounded for tenant in self.directory)
        self._redis_configured = config.redis is not None
        self._tasks: list[asyncio.Task[None]] = []
        self._shared_keys: dict[str, str] = {}
        # output tokens are worth parsing out of answers only when something charges them
        self.counts_output = self._bounded or bool(self._fair)

    async def start(self) -> None:
        if self._bounded and not self._redis_configured:
            log.warning("tenant limits are enforced per gateway replica: configure `redis:` to share them")
        await self.ledger.start()
        if self._sync_interval_s is not None:
            await self._refresh_keys()
            self._tasks.append(asyncio.create_task(self._follow_keys(self._sync_interval_s)))
            for stage in self._fair:
                sync = ServiceSync(stage, self.ledger, self._sync_interval_s)
                self._tasks.append(asyncio.create_task(sync.run()))

    async def _follow_keys(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            await self._refresh_keys()

    async def _refresh_keys(self) -> None:
        """Keys added to (or removed from) Redis take effect within one sync interval; while Redis is
        away the last keys read stay in use."""
        digests = await self.ledger.shared_keys()
        if digests is None or digests == self._shared_keys:
            return
        self._shared_keys = digests
        ignored = self.directory.use_shared_keys(digests)
        if ignored:
            log.warning(
                "%d key(s) in Redis name no tenant of the fleet file (%s) or are not SHA-256 digests;"
                " ignored",
                len(ignored),
                ", ".join(sorted(set(ignored))[:5]),
            )

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        await self.ledger.close()

    def identify(self, authorization: bytes | None, claimed: str | None) -> tuple[Tenant, bool]:
        """The tenant of a request, and whether its Authorization header was a tenant's key (which then
        goes to no engine: it is fleetserve's key, not theirs); raises the 401 when a key is required
        and this one is not known. `claimed` (the x-fleetserve-tenant header) names the tenant only when
        keys are not required and the request carries no known key."""
        key = _bearer(authorization)
        found = self.directory.identify(key)
        if not isinstance(found, Tenant):
            self._metrics.tenant_refusals.labels(ANONYMOUS, found.reason).inc()
            raise refusal_error(found)
        if found.name != ANONYMOUS or self.directory.required:
            return found, key is not None
        return (self.directory.get(claimed) if claimed else found), False

    def authorise(self, tenant: Tenant, name: str) -> None:
        """Raises the 403 when `tenant` may not use model or adapter `name`."""
        refusal = self.directory.authorise(tenant, name)
        if refusal is not None:
            self._metrics.tenant_refusals.labels(tenant.name, refusal.reason).inc()
            raise refusal_error(refusal)

    async def admit(self, tenant: Tenant, prompt_tokens: int) -> Admitted:
        """Count the request in its tenant's quotas; raises the 429 when it is over one (or the 503 when
        Redis is away and the fleet file says to fail closed)."""
        if tenant.limits.bounded:
            now = self._clock()
            try:
                reservation = await self.ledger.reserve(tenant.name, prompt_tokens, now)
            except QuotaStoreDown:
                self._metrics.tenant_refusals.labels(tenant.name, "quota_store_down").inc()
                raise APIError(
                    503,
                    "quotas cannot be checked right now; retry shortly",
                    headers={"Retry-After": "1"},
                ) from None
            refusal = check(tenant, reservation.usage, prompt_tokens, now)
            if refusal is not None:
                await self.ledger.refund(tenant.name, reservation, prompt_tokens)
                self._metrics.tenant_refusals.labels(tenant.name, refusal.reason).inc()
                raise refusal_error(refusal)
            headers = rate_limit_headers(tenant.limits, reservation.usage, now)
            return Admitted(tenant, reservation, headers)
        return Admitted(tenant)

    async def finished(self, admitted: Admitted, output_tokens: int) -> None:
        if admitted.reservation is not None:
            await self.ledger.finish(admitted.tenant.name, admitted.reservation, output_tokens, self._clock())


def _bearer(value: bytes | None) -> str | None:
    if not value:
        return None
    text = value.decode("latin-1").strip()
    scheme, _, token = text.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None
