"""The migration controller on the live fleet: the same `fleetserve.migration.MigrationController` the
simulator runs, fed by the engines' own load snapshots, with the gateway carrying each moved request's
client stream from one engine to the other.

Every `migration.interval_s` the loop reads `GET /fleetserve/load` of each engine that serves the
migration API (emulated engines; an engine that answers 404 there, as vLLM and llama.cpp do, is not
asked again), marks as movable the decoding requests whose stream this gateway relays and could
resume, and asks the controller for moves. A move with KV
follows the engine model's staged copy: the request keeps decoding on its engine for the copy's early
stages (`copy_s - downtime_s`, in the engine's time scale), then the source exports it (its stream
there sends what it made and ends), the last stage's `downtime_s` passes, and the proxy opens the
continuation on the destination with `x-fleetserve-import` (the tokens it has left and how it ends;
`kv`: the context arrives computed). A move by recompute exports at once and the destination
prefills the context. A request that finished or failed meanwhile is abandoned; a destination that
refuses makes the proxy resume the stream on another engine, as after a failure.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
import orjson

from fleetserve.config import MigrationConfig
from fleetserve.fleet.registry import EngineRegistry
from fleetserve.fleet.state import EngineState
from fleetserve.gateway.metrics import GatewayMetrics
from fleetserve.migration import EngineLoad, Move
from fleetserve.model.capacity import engine_cost
from fleetserve.model.catalog import Catalog

log = logging.getLogger(__name__)

IMPORT_HEADER = "x-fleetserve-import"


@dataclass(slots=True)
class PendingMove:
    """A move the proxy is to carry out on a stream: set on the stream before its engine exports it."""

    move: Move
    destination: EngineState
    kv: bool
    downtime_s: float  # wall seconds between the export and the continuation's start
    # the source's export answer (None: it refused, the request goes on where it is)
    exported: asyncio.Future[dict[str, Any] | None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    # set by the proxy: "moved", "abandoned" or "failed"
    outcome: asyncio.Future[str] = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    def import_header(self, exported: dict[str, Any]) -> dict[str, str]:
        fields = {
            "output_left": exported["output_left"],
            "finish_reason": exported["finish_reason"],
            "kv": self.kv,
        }
        return {IMPORT_HEADER: orjson.dumps(fields).decode()}

    def end(self, outcome: str) -> None:
        if not self.outcome.done():
            self.outcome.set_result(outcome)


class MovableStream(Protocol):
    """What the registry needs of a relayed stream: a slot for the move to carry out."""

    move: PendingMove | None


class MovableStreams:
    """The streams the gateway relays and could carry to another engine, by request id."""

    def __init__(self) -> None:
        self._streams: dict[str, tuple[str, MovableStream]] = {}

    def add(self, request_id: str, engine_id: str, stream: MovableStream) -> None:
        self._streams[request_id] = (engine_id, stream)

    def remove(self, request_id: str) -> None:
        self._streams.pop(request_id, None)

    def on(self, request_id: str, engine_id: str) -> MovableStream | None:
        """The stream of `request_id` if it is relayed from `engine_id` now."""
        entry = self._streams.get(request_id)
        return entry[1] if entry is not None and entry[0] == engine_id else None


class LiveMigration:
    def __init__(
        self,
        settings: MigrationConfig,
        registry: EngineRegistry,
        session: Callable[[], aiohttp.ClientSession],
        catalog: Catalog,
        metrics: GatewayMetrics,
        streams: MovableStreams,
        *,
        timeout_s: float,
    ) -> None:
        controller = settings.controller()
        assert controller is not None, "migration policy none runs no loop"
        self.controller = controller
        self._settings = settings
        self._registry = registry
        self._session = session
        self._catalog = catalog
        self._metrics = metrics
        self._streams = streams
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._carrying: set[asyncio.Task[None]] = set()
        self._without_api: set[str] = set()  # URLs that answered 404 to /fleetserve/load

    async def run(self) -> None:
        try:
            while True:
                await asyncio.sleep(self._settings.interval_s)
                await self.look()
        finally:
            for task in list(self._carrying):
                task.cancel()

    async def look(self) -> list[Move]:
        """One round: the engines' loads, the controller's moves, each move started. Returns them."""
        engines = [
            engine
            for engine in self._registry.engines()
            if engine.url not in self._without_api and (engine.health.routable or engine.draining)
        ]
        loads = [load for load in await asyncio.gather(*map(self._load, engines)) if load is not None]
        moves = self.controller.decide(loads)
        for move in moves:
            source, destination = self._registry.get(move.source), self._registry.get(move.destination)
            stream = self._streams.on(move.request_id, move.source)
            if source is None or destination is None or stream is None:
                continue
            self.controller.started(move)
            task = asyncio.get_running_loop().create_task(self._carry(move, source, destination, stream))
            self._carrying.add(task)
            task.add_done_callback(self._carrying.discard)
        return moves

    async def _load(self, engine: EngineState) -> EngineLoad | None:
        spec = engine.spec
        cost = engine_cost(spec.gpu, spec.model, spec.tp, self._catalog)
        if cost is None:
            return None
        try:
            async with self._session().get(engine.url + "/fleetserve/load", timeout=self._timeout) as answer:
                if answer.status == 404:
                    self._without_api.add(engine.url)
                    log.info("engine %s serves no migration API: requests on it stay there", engine.engine_id)
                if answer.status != 200:
                    return None
                wire = await answer.json(loads=orjson.loads)
            return EngineLoad.from_wire(
                engine.engine_id,
                engine.model,
                cost,
                wire,
                draining=engine.draining,
                movable=lambda request_id: self._streams.on(request_id, engine.engine_id) is not None,
            )
        except (aiohttp.ClientError, TimeoutError, ValueError) as error:
            log.debug("no load from engine %s: %r", engine.engine_id, error)
            return None

    async def _carry(
        self, move: Move, source: EngineState, destination: EngineState, stream: MovableStream
    ) -> None:
        scale = source.spec.time_scale
        copy = move.copy
        downtime = 0.0 if copy is None else copy.downtime_s * scale
        pending = PendingMove(move, destination, copy is not None, downtime)
        outcome = "abandoned"
        try:
            if copy is not None:  # the early stages copy while the request decodes on
                await asyncio.sleep((copy.copy_s - copy.downtime_s) * scale)
            if self._streams.on(move.request_id, move.source) is not stream or stream.move is not None:
                return
            stream.move = pending
            exported = await self._export(source, move.request_id)
            if exported is None:
                stream.move = None
            pending.exported.set_result(exported)
            if exported is not None:
                outcome = await pending.outcome
        finally:
            if not pending.exported.done():
                pending.exported.set_result(None)
            if stream.move is pending and not pending.outcome.done():
                stream.move = None
            self.controller.ended(move.request_id)
            self._metrics.migrations.labels(move.reason, outcome).inc()

    async def _export(self, source: EngineState, request_id: str) -> dict[str, Any] | None:
        url = source.url + "/fleetserve/export"
        try:
            async with self._session().post(
                url, data=orjson.dumps({"request_id": request_id}), timeout=self._timeout
            ) as answer:
                if answer.status != 200:
                    return None  # it finished or was preempted meanwhile: it stays
                exported: dict[str, Any] = await answer.json(loads=orjson.loads)
                return exported
        except (aiohttp.ClientError, TimeoutError, ValueError) as error:
            log.info("export of %s from %s failed: %r", request_id, source.engine_id, error)
            return None
