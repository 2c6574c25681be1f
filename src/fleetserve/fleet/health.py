"""Engine health: a small state machine driven by probe and request outcomes, plus the probing loop.

    STARTING --probe ok--> HEALTHY --N consecutive failures--> EJECTED --eject time over--> HALF_OPEN
    HALF_OPEN --probe ok--> HEALTHY        HALF_OPEN --probe fails--> EJECTED (for twice as long, capped)

An engine gets traffic only when HEALTHY: a starting engine waits for its first good probe, and a
half-open engine must answer a probe before real requests go back to it. Probe failures and request
failures are counted separately, so a /health endpoint that answers while completions hang cannot keep
resetting the request failures that should eject the engine. Nothing here touches in-flight counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import aiohttp
import orjson

from fleetserve.fleet.registry import EngineRegistry, EngineState, ModelEntry

log = logging.getLogger(__name__)

MAX_EJECT_MULTIPLIER = 8


class HealthState(enum.Enum):
    STARTING = "starting"
    HEALTHY = "healthy"
    EJECTED = "ejected"
    HALF_OPEN = "half_open"


@dataclass
class EngineHealth:
    """Pure state: every transition takes `now` from the caller."""

    eject_after_failures: int
    eject_duration_s: float
    state: HealthState = HealthState.STARTING
    probe_failures: int = 0
    request_failures: int = 0
    ejections: int = 0
    ejected_until: float = 0.0

    @property
    def routable(self) -> bool:
        return self.state is HealthState.HEALTHY

    @property
    def ready(self) -> bool:
        """Has answered a probe at least once since it was added."""
        return self.state is not HealthState.STARTING

    def tick(self, now: float) -> None:
        if self.state is HealthState.EJECTED and now >= self.ejected_until:
            self.state = HealthState.HALF_OPEN

    def probe_succeeded(self, now: float) -> None:
        self.tick(now)
        self.probe_failures = 0
        if self.state in (HealthState.STARTING, HealthState.HALF_OPEN):
            self.state = HealthState.HEALTHY
            self.request_failures = 0

    def probe_failed(self, now: float) -> None:
        self.tick(now)
        if self.state is HealthState.STARTING:
            return  # still loading; not a fault
        if self.state is HealthState.HALF_OPEN:
            self._eject(now)
            return
        self.probe_failures += 1
        if self.state is HealthState.HEALTHY and self.probe_failures >= self.eject_after_failures:
            self._eject(now)

    def request_succeeded(self, now: float) -> None:
        self.request_failures = 0
        if self.state is HealthState.HEALTHY:
            self.ejections = 0

    def request_failed(self, now: float) -> None:
        self.tick(now)
        self.request_failures += 1
        if self.state is HealthState.HEALTHY and self.request_failures >= self.eject_after_failures:
            self._eject(now)

    def unreachable(self, now: float) -> None:
        """Nothing accepts connections at the engine's address: it is down, not slow. Eject at once
        (a starting engine is still loading, which is no fault)."""
        self.tick(now)
        if self.state in (HealthState.HEALTHY, HealthState.HALF_OPEN):
            self._eject(now)

    def _eject(self, now: float) -> None:
        self.ejections += 1
        multiplier = min(2 ** (self.ejections - 1), MAX_EJECT_MULTIPLIER)
        self.state = HealthState.EJECTED
        self.ejected_until = now + self.eject_duration_s * multiplier
        self.probe_failures = self.request_failures = 0


class HealthChecker:
    """Probes every engine each `interval_s`: GET /health, then GET /v1/models, which also tells which
    models and LoRA adapters the engine serves. Both must answer 200 for the probe to pass, except that a
    404 from /health (a server that has none, such as llama-cpp-python's) leaves the verdict to /v1/models."""

    def __init__(
        self,
        registry: EngineRegistry,
        session: aiohttp.ClientSession,
        interval_s: float,
        timeout_s: float,
        clock: Callable[[], float],
    ) -> None:
        self._registry = registry
        self._session = session
        self._interval_s = interval_s
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._clock = clock
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Probe now instead of at the next period (e.g. right after an engine was added)."""
        self._wake.set()

    async def run(self) -> None:
        while True:
            engines = self._registry.engines()
            if engines:
                await asyncio.gather(*(self.probe(engine) for engine in engines))
            self._wake.clear()
            # engines still starting are probed faster, so they take traffic soon after they are ready
            starting = any(not e.health.ready for e in self._registry.engines())
            period = min(self._interval_s, 0.1) if starting else self._interval_s
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=period)

    async def probe(self, engine: EngineState) -> None:
        entries = await self._fetch(engine)
        now = self._clock()
        before = engine.health.state
        if entries == "refused":
            engine.health.unreachable(now)
        elif entries is None:
            engine.health.probe_failed(now)
        else:
            engine.models = entries
            engine.health.probe_succeeded(now)
        if engine.health.state is not before:
            log.info("engine %s: %s -> %s", engine.engine_id, before.value, engine.health.state.value)
            self._registry.changed()

    async def _fetch(self, engine: EngineState) -> tuple[ModelEntry, ...] | Literal["refused"] | None:
        """The engine's model entries; None when a probe fails; "refused" when nothing listens."""
        try:
            async with self._session.get(engine.url + "/health", timeout=self._timeout) as response:
                # 404: a server without a health endpoint (llama-cpp-python's); /v1/models alone decides
                if response.status not in (200, 404):
                    return None
                await response.read()
            async with self._session.get(engine.url + "/v1/models", timeout=self._timeout) as response:
                if response.status != 200:
                    return None
                body = orjson.loads(await response.read())
        except aiohttp.ClientConnectorError as exc:
            log.debug("probe of %s refused: %r", engine.engine_id, exc)
            return "refused"
        except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError) as exc:
            log.debug("probe of %s failed: %r", engine.engine_id, exc)
            return None
        return parse_model_list(body)


def parse_model_list(body: object) -> tuple[ModelEntry, ...] | None:
    """Entries of an OpenAI `/v1/models` answer. vLLM lists each LoRA adapter as its own entry whose
    `parent` is the base model; some servers only set `root` to the base model's id instead."""
    if not isinstance(body, dict) or not isinstance(body.get("data"), list):
        return None
    items = [item for item in body["data"] if isinstance(item, dict) and isinstance(item.get("id"), str)]
    ids = {item["id"] for item in items}
    entries = []
    for item in items:
        parent = item.get("parent")
        root = item.get("root")
        if not isinstance(parent, str) or not parent:
            parent = root if isinstance(root, str) and root != item["id"] and root in ids else None
        entries.append(ModelEntry(item["id"], parent, item))
    return tuple(entries)
