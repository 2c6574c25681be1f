"""Quota counts and VTC service shared by every gateway replica through Redis.

Counting is one atomic Lua script per step (reserve, refund, finish), every key of a tenant hash-tagged
with `{tenant}` so that Redis Cluster keeps them in one slot. The decision stays in the pure core
(`fleetserve.tenants.quota.check`): the script counts first and returns the counts, the gateway decides,
and a refused reservation is taken back, so two replicas racing for the last unit both see each other.

Redis unreachable: the ledger falls back to counting in memory (limits per replica), says so in the
log and in `fleetserve_quota_shared`, probes Redis every second, and when it answers again adds what was
counted locally meanwhile to the shared counts. With `fail_closed` it refuses instead. In-flight counts
expire `in_flight_ttl_s` after a tenant's last request, so a replica that dies holding some does not
hold them for ever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from fleetserve.config import RedisConfig
from fleetserve.errors import FleetserveError
from fleetserve.gateway.metrics import GatewayMetrics
from fleetserve.tenants import MemoryLedger, Usage
from fleetserve.tenants.quota import WINDOW_S, window_of
from fleetserve.tenants.vtc import FairQueueStage

log = logging.getLogger(__name__)

REDIS_DOWN = (RedisError, OSError, TimeoutError)
PROBE_INTERVAL_S = 1.0

# KEYS: requests prev, requests cur, tokens prev, tokens cur, in flight
# ARGV: prompt tokens, window ttl, in-flight ttl
RESERVE = """
local rc = redis.call('INCR', KEYS[2])
redis.call('EXPIRE', KEYS[2], ARGV[2])
local tc = redis.call('INCRBY', KEYS[4], ARGV[1])
redis.call('EXPIRE', KEYS[4], ARGV[2])
local inf = redis.call('INCR', KEYS[5])
redis.call('EXPIRE', KEYS[5], ARGV[3])
local rp = tonumber(redis.call('GET', KEYS[1]) or '0')
local tp = tonumber(redis.call('GET', KEYS[3]) or '0')
return {rp, rc, tp, tc, inf}
"""
# KEYS: requests of the reservation's minute, its tokens, in flight; ARGV: prompt tokens
REFUND = """
redis.call('DECR', KEYS[1])
redis.call('DECRBY', KEYS[2], ARGV[1])
if tonumber(redis.call('GET', KEYS[3]) or '0') > 0 then redis.call('DECR', KEYS[3]) end
return 1
"""
# KEYS: tokens of the current minute, in flight; ARGV: output tokens, window ttl
FINISH = """
if tonumber(ARGV[1]) > 0 then
  redis.call('INCRBY', KEYS[1], ARGV[1])
  redis.call('EXPIRE', KEYS[1], ARGV[2])
end
if tonumber(redis.call('GET', KEYS[2]) or '0') > 0 then redis.call('DECR', KEYS[2]) end
return 1
"""
# KEYS: requests and tokens of a minute; ARGV: requests, tokens, window ttl
ADD = """
redis.call('INCRBY', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('INCRBY', KEYS[2], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[3])
return 1
"""
# KEYS: the VTC service hash; ARGV: tenant, amount, tenant, amount, ...; returns the whole hash
SHARE_SERVICE = """
for i = 1, #ARGV, 2 do redis.call('HINCRBYFLOAT', KEYS[1], ARGV[i], ARGV[i + 1]) end
return redis.call('HGETALL', KEYS[1])
"""


def keys_hash(prefix: str) -> str:
    """The Redis hash of API keys kept outside the fleet file: SHA-256 hex digest -> tenant name."""
    return f"{prefix}:keys"


@dataclass(frozen=True, slots=True)
class Reservation:
    """A request's place in its tenant's counts, and which ledger holds it."""

    usage: Usage
    shared: bool


class QuotaStoreDown(FleetserveError):
    """Redis is unreachable and the fleet file says to refuse rather than count per replica."""


class SharedLedger:
    """The gateway's ledger: Redis when configured and reachable, this process's memory otherwise."""

    def __init__(self, config: RedisConfig | None, metrics: GatewayMetrics, in_flight_ttl_s: float) -> None:
        self._config = config
        self._prefix = config.key_prefix if config is not None else "fleetserve"
        self._metrics = metrics
        self.local = MemoryLedger()
        self._ttl = int(3 * WINDOW_S)
        self._in_flight_ttl = max(int(in_flight_ttl_s), 1)
        self._client: aioredis.Redis | None = None
        self._scripts: dict[str, Any] = {}
        self.shared = False
        self._probe: asyncio.Task[None] | None = None

    @property
    def client(self) -> aioredis.Redis | None:
        return self._client if self.shared else None

    async def start(self) -> None:
        config = self._config
        if config is None:
            self._metrics.quota_shared.set(0)
            return
        self._client = aioredis.Redis.from_url(
            config.url.get_secret_value(),
            socket_timeout=config.timeout_s,
            socket_connect_timeout=config.timeout_s,
            decode_responses=False,
        )
        client = self._client
        self._scripts = {
            name: client.register_script(source)
            for name, source in (
                ("reserve", RESERVE),
                ("refund", REFUND),
                ("finish", FINISH),
                ("add", ADD),
                ("share", SHARE_SERVICE),
            )
        }
        try:
            await client.ping()
        except REDIS_DOWN as exc:
            self._went_down(exc)
        else:
            self.shared = True
            self._metrics.quota_shared.set(1)
            log.info("quotas and VTC counters are shared through Redis")

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
        if self._client is not None:
            await self._client.aclose()

    def _key(self, tenant: str, kind: str) -> str:
        return f"{self._prefix}:{{{tenant}}}:{kind}"

    def _went_down(self, exc: BaseException) -> None:
        if self._config is None:
            return
        was_shared = self.shared
        self.shared = False
        self._metrics.quota_shared.set(0)
        if was_shared or self._probe is None:
            how = (
                "refusing requests of tenants with limits"
                if self._config.fail_closed
                else ("enforcing limits per replica")
            )
            log.warning("Redis is unreachable (%s): %s until it answers again", type(exc).__name__, how)
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._until_back())

    async def _until_back(self) -> None:
        assert self._client is not None
        while True:
            await asyncio.sleep(PROBE_INTERVAL_S)
            try:
                await self._client.ping()
                await self._resynchronise()
            except REDIS_DOWN:
                continue
            self.shared = True
            self._metrics.quota_shared.set(1)
            log.warning("Redis answers again: quotas are shared again")
            return

    async def _resynchronise(self) -> None:
        """Add what this replica counted while Redis was away to the shared counts."""
        for tenant, window, requests, tokens in self.local.rate_counts(time.time()):
            keys = [self._key(tenant, f"r:{window}"), self._key(tenant, f"t:{window}")]
            await self._scripts["add"](keys=keys, args=[requests, tokens, self._ttl])
        self.local.forget_rates()

    async def reserve(self, tenant: str, tokens: int, now: float) -> Reservation:
        if self.shared:
            window = window_of(now)
            keys = [
                self._key(tenant, f"r:{window - 1}"),
                self._key(tenant, f"r:{window}"),
                self._key(tenant, f"t:{window - 1}"),
                self._key(tenant, f"t:{window}"),
                self._key(tenant, "inflight"),
            ]
            try:
                counts = await self._scripts["reserve"](
                    keys=keys, args=[tokens, self._ttl, self._in_flight_ttl]
                )
            except REDIS_DOWN as exc:
                self._went_down(exc)
            else:
                return Reservation(Usage(window, *(int(value) for value in counts)), True)
        if self._config is not None and self._config.fail_closed:
            raise QuotaStoreDown
        return Reservation(self.local.reserve(tenant, tokens, now), False)

    async def refund(self, tenant: str, reservation: Reservation, tokens: int) -> None:
        if not reservation.shared:
            self.local.refund(tenant, reservation.usage, tokens)
            return
        window = reservation.usage.window
        keys = [
            self._key(tenant, f"r:{window}"),
            self._key(tenant, f"t:{window}"),
            self._key(tenant, "inflight"),
        ]
        await self._shared_call("refund", keys, [tokens])

    async def finish(self, tenant: str, reservation: Reservation, output_tokens: int, now: float) -> None:
        """The request has ended: it leaves the in-flight count and its output tokens are charged."""
        if not reservation.shared:
            self.local.release(tenant)
            self.local.charge(tenant, output_tokens, now)
            return
        keys = [self._key(tenant, f"t:{window_of(now)}"), self._key(tenant, "inflight")]
        if not await self._shared_call("finish", keys, [output_tokens, self._ttl]):
            self.local.charge(tenant, output_tokens, now)  # added to the shared counts once Redis is back

    async def _shared_call(self, script: str, keys: list[str], args: list[Any]) -> bool:
        try:
            await self._scripts[script](keys=keys, args=args)
        except REDIS_DOWN as exc:
            self._went_down(exc)
            return False
        return True

    async def shared_keys(self) -> dict[str, str] | None:
        """The API keys kept in Redis (`PREFIX:keys`: digest -> tenant name); None while Redis is away."""
        client = self.client
        if client is None:
            return None
        try:
            raw = await client.hgetall(keys_hash(self._prefix))
        except REDIS_DOWN as exc:
            self._went_down(exc)
            return None
        return {digest.decode(): name.decode() for digest, name in raw.items()}

    async def share_service(self, taken: dict[str, float]) -> dict[str, float] | None:
        """Add this replica's VTC service to the shared totals; the totals, or None while Redis is away."""
        client = self.client
        if client is None:
            return None
        args: list[Any] = []
        for tenant, amount in taken.items():
            args += [tenant, repr(amount)]
        try:
            flat = await self._scripts["share"](keys=[f"{self._prefix}:vtc-service"], args=args)
        except REDIS_DOWN as exc:
            self._went_down(exc)
            return None
        return {flat[i].decode(): float(flat[i + 1]) for i in range(0, len(flat), 2)}


class ServiceSync:
    """Keeps a replica's VTC counters following every replica's service: every `interval_s` it adds
    what the stage charged here to Redis and absorbs what the others added. A counter is at most one
    interval (plus a Redis round trip) behind the fleet's, so a tenant can take up to one interval's worth
    of extra service on each replica before the others see it; the VTC bound between backlogged tenants
    grows by that much."""

    def __init__(self, stage: FairQueueStage, ledger: SharedLedger, interval_s: float) -> None:
        self._stage = stage
        self._ledger = ledger
        self._interval_s = interval_s
        self._pending: dict[str, float] = {}
        self._seen: dict[str, float] | None = None  # the totals at the last sync

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            await self.sync_once()

    async def sync_once(self) -> None:
        for tenant, amount in self._stage.take_service().items():
            self._pending[tenant] = self._pending.get(tenant, 0.0) + amount
        totals = await self._ledger.share_service(self._pending)
        if totals is None:
            return
        mine, self._pending = self._pending, {}
        seen = self._seen
        self._seen = totals
        if seen is None:  # the first sync: earlier history (other runs') is not this run's service
            return
        remote = {
            tenant: max(total - seen.get(tenant, 0.0) - mine.get(tenant, 0.0), 0.0)
            for tenant, total in totals.items()
        }
        self._stage.absorb(remote)
