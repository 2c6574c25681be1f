"""Routing snapshots (`FleetView`) of the live registry.

Capacity comes from the engine model: `CostModel.capacity_tokens_per_s` for the engine's GPU, model and
TP degree, divided by the smallest such figure among engines of the same model, so the slowest known
engine of a model has capacity 1.0. Engines whose GPU or model the catalog does not know get 1.0.
"""

from __future__ import annotations

from collections.abc import Collection

from fleetserve.fleet.registry import EngineRegistry, EngineState
from fleetserve.model.catalog import Catalog, UnknownEntry, default_catalog
from fleetserve.model.cost import CostModel
from fleetserve.routing import EngineView, FleetView


def absolute_capacity(gpu: str | None, model: str, tp: int, catalog: Catalog) -> float | None:
    """Reference tokens/s of this engine, or None when the catalog lacks its GPU or model."""
    if gpu is None:
        return None
    try:
        return CostModel(catalog.gpu(gpu), catalog.model(model), tp=tp).capacity_tokens_per_s
    except UnknownEntry:
        return None


class ViewBuilder:
    def __init__(self, registry: EngineRegistry, catalog: Catalog | None = None) -> None:
        self._registry = registry
        self._catalog = catalog or default_catalog()
        self._absolute: dict[str, float | None] = {}
        self._relative_version = -1

    def build(self, exclude: Collection[str] = ()) -> FleetView:
        """A snapshot of every engine except `exclude` (engines a retry already tried)."""
        self.refresh_capacities()
        return FleetView(
            {
                engine.engine_id: self.engine_view(engine)
                for engine in self._registry.engines()
                if engine.engine_id not in exclude
            }
        )

    def engine_view(self, engine: EngineState) -> EngineView:
        metrics = engine.metrics
        return EngineView(
            engine_id=engine.engine_id,
            model=engine.model,
            gpu=engine.gpu,
            tp=engine.tp,
            adapters=engine.adapters,
            healthy=engine.health.routable,
            ready=engine.health.ready,
            in_flight=engine.in_flight,
            running=(metrics.running or 0) if metrics else 0,
            waiting=(metrics.waiting or 0) if metrics else 0,
            kv_usage=(metrics.kv_usage or 0.0) if metrics else 0.0,
            capacity=engine.capacity,
            max_loras=(metrics.max_loras if metrics and metrics.max_loras is not None else engine.max_loras),
            num_gpu_blocks=(metrics.num_gpu_blocks or 0) if metrics else 0,
            block_size=(metrics.block_size if metrics and metrics.block_size else engine.block_size),
        )

    def refresh_capacities(self) -> None:
        """Recompute relative capacities when engines come or go (the smallest of a model may change)."""
        if self._relative_version == self._registry.version:
            return
        engines = self._registry.engines()
        for engine in engines:
            if engine.engine_id not in self._absolute:
                self._absolute[engine.engine_id] = absolute_capacity(
                    engine.gpu, engine.model, engine.tp, self._catalog
                )
        smallest: dict[str, float] = {}
        for engine in engines:
            absolute = self._absolute[engine.engine_id]
            if absolute is not None:
                smallest[engine.model] = min(absolute, smallest.get(engine.model, absolute))
        for engine in engines:
            absolute = self._absolute[engine.engine_id]
            engine.capacity = 1.0 if absolute is None else absolute / smallest[engine.model]
        self._relative_version = self._registry.version
