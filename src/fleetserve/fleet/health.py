"""The probing loop that drives each engine's health state machine (`fleet/state.py`'s `EngineHealth`,
where the states and transitions are described)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Literal

import aiohttp
import orjson

from fleetserve.fleet.registry import EngineRegistry
from fleetserve.fleet.state import EngineState, ModelEntry

log = logging.getLogger(__name__)


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
