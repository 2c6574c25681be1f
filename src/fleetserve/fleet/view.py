"""Routing snapshots (`FleetView`) of the live registry.

Each engine's `EngineView` lives as long as the engine (the request path counts in-flight requests on
it); `build` refreshes the rest of it from health, scrapes and the catalog before a decision. Relative
capacity comes from `fleetserve.model.capacity`, as in the simulator.

Engines the catalog knows also get a `predictor` (prompt_len, cached_tokens) -> TTFT seconds, which
SLO-aware policies compare with the request's TTFT objective. The live gateway cannot see inside an
engine's queue, so the estimate is deliberately simple:

    TTFT = prefill of the request's uncached tokens + queued_ahead * prefill of a typical prompt

where both prefills are `CostModel.iteration_time` of one chunk on an otherwise idle engine, and
`queued_ahead = max(scraped waiting, in_flight - scraped running)`: the scrape lags, while requests the
gateway dispatched beyond what the engine last reported running are queued there (or on their way).
It ignores the decode batch sharing each iteration (an emulated engine's `time_scale` stretches it like
every other duration); the simulator uses the engine model's own `predict_ttft`, which sees the queue
exactly.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from fleetserve.fleet.registry import EngineRegistry
from fleetserve.fleet.state import EngineState
from fleetserve.model.capacity import engine_cost, relative_capacities
from fleetserve.model.catalog import Catalog, default_catalog
from fleetserve.model.cost import CostModel
from fleetserve.routing import EngineView, FleetView
from fleetserve.routing.prefix_index import PrefixIndex

# The prompt length a request queued ahead is assumed to have: the demo and Azure conversation traces
# average 1-2k tokens, and vLLM's default chunk is larger, so one such prompt is about one iteration.
TYPICAL_QUEUED_PROMPT_TOKENS = 1024


@dataclass(frozen=True, slots=True)
class TTFTEstimate:
    """An engine view's `predictor`: see the module docstring for the formula and what it leaves out."""

    cost: CostModel
    typical_prefill_s: float
    queued_ahead: int
    time_scale: float = 1.0  # an emulated engine's --time-scale stretches every duration

    def __call__(self, prompt_len: int, cached_tokens: int = 0) -> float:
        cached = max(0, min(cached_tokens, prompt_len - 1))
        own = self.cost.iteration_time([(max(1, prompt_len - cached), cached)], [])
        return (own + self.queued_ahead * self.typical_prefill_s) * self.time_scale


@dataclass(frozen=True, slots=True)
class _EngineModel:
    cost: CostModel
    capacity: float
    typical_prefill_s: float


class ViewBuilder:
    def __init__(self, registry: EngineRegistry, catalog: Catalog | None = None) -> None:
        self._registry = registry
        self._catalog = catalog or default_catalog()
        # keyed by (gpu, model, tp), not engine id: an id removed and added again may be another engine
        self._models: dict[tuple[str | None, str, int], _EngineModel | None] = {}
        self._relative_version = -1
        # the fleet's precise prefix index (fed by engine KV events), handed to policies when set
        self.prefix_index: PrefixIndex | None = None

    def build(self, exclude: Collection[str] = ()) -> FleetView:
        """A snapshot of every engine except `exclude` (engines a retry already tried)."""
        self.refresh_capacities()
        return FleetView(
            {
                engine.engine_id: self.engine_view(engine)
                for engine in self._registry.engines()
                if engine.engine_id not in exclude
            },
            self.prefix_index,
        )

    def engine_view(self, engine: EngineState) -> EngineView:
        """The engine's view, refreshed from what the gateway knows now (in place: the request path
        counts in-flight requests on the same object)."""
        metrics = engine.metrics
        spec = engine.spec
        view = engine.view
        running = (metrics.running or 0) if metrics else 0
        waiting = (metrics.waiting or 0) if metrics else 0
        known = self._model_of(engine)
        predictor = None
        if known is not None:
            queued_ahead = max(waiting, engine.in_flight - running, 0)
            predictor = TTFTEstimate(known.cost, known.typical_prefill_s, queued_ahead, spec.time_scale)
        view.adapters = engine.adapters
        view.healthy = engine.health.routable
        view.ready = engine.health.ready and not engine.draining
        view.running = running
        view.waiting = waiting
        view.kv_usage = (metrics.kv_usage or 0.0) if metrics else 0.0
        view.capacity = engine.capacity
        view.max_loras = metrics.max_loras if metrics and metrics.max_loras is not None else spec.max_loras
        view.num_gpu_blocks = (metrics.num_gpu_blocks or 0) if metrics else 0
        view.block_size = metrics.block_size if metrics and metrics.block_size else spec.block_size
        view.predictor = predictor
        return view

    def refresh_capacities(self) -> None:
        """Recompute relative capacities when engines come or go (the smallest of a model may change)."""
        if self._relative_version == self._registry.version:
            return
        engines = self._registry.engines()
        absolute = {}
        for engine in engines:
            known = self._model_of(engine)
            absolute[engine.engine_id] = (engine.model, None if known is None else known.capacity)
        capacities = relative_capacities(absolute)
        for engine in engines:
            engine.capacity = capacities[engine.engine_id]
        self._relative_version = self._registry.version

    def _model_of(self, engine: EngineState) -> _EngineModel | None:
        spec = engine.spec
        key = (spec.gpu, spec.model, spec.tp)
        if key not in self._models:
            cost = engine_cost(spec.gpu, spec.model, spec.tp, self._catalog)
            self._models[key] = (
                None
                if cost is None
                else _EngineModel(
                    cost, cost.capacity_tokens_per_s, cost.prefill_time(TYPICAL_QUEUED_PROMPT_TOKENS)
                )
            )
        return self._models[key]
