"""Relative capacity: how much faster one engine is than another of the same model, which is what lets
a policy compare the load of an H100 with that of an L4.

An engine's absolute capacity is `CostModel.capacity_tokens_per_s` for its GPU, model and TP degree;
its relative capacity divides that by the smallest absolute capacity among the engines of the same
model, so the slowest known engine of a model has 1.0. An engine the catalog cannot model gets 1.0.
The gateway (`fleet/view.py`) and the simulator (`sim/fleet.py`) both take capacities from here.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import TypeVar

from fleetserve.model.catalog import Catalog, UnknownEntry
from fleetserve.model.cost import CostModel, UnsupportedParallelism

K = TypeVar("K", bound=Hashable)


def engine_cost(gpu: str | None, model: str, tp: int, catalog: Catalog) -> CostModel | None:
    """The engine model's cost model of an engine, or None when the catalog lacks its GPU or model (or
    the model's heads do not divide by the TP degree)."""
    if gpu is None:
        return None
    try:
        return CostModel(catalog.gpu(gpu), catalog.model(model), tp=tp)
    except (UnknownEntry, UnsupportedParallelism):
        return None


def relative_capacities(engines: Mapping[K, tuple[str, float | None]]) -> dict[K, float]:
    """key -> relative capacity, for key -> (model, absolute capacity or None when unknown)."""
    smallest: dict[str, float] = {}
    for model, absolute in engines.values():
        if absolute is not None:
            smallest[model] = min(absolute, smallest.get(model, absolute))
    return {
        key: 1.0 if absolute is None else absolute / smallest[model]
        for key, (model, absolute) in engines.items()
    }
