"""Load-balancing policies that look only at load: no prefix, adapter or SLO awareness."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from fleetserve.routing.base import Decision, EngineView, FleetView, Policy, RequestInfo, require_candidates
from fleetserve.routing.shared import break_tie, least_loaded


class RandomPolicy(Policy):
    name = "random"

    def __init__(self, *, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    def choose(self, request: RequestInfo, view: FleetView, now: float) -> Decision:
        candidates = require_candidates(request, view)
        return Decision(self._rng.choice(candidates).engine_id, "random")


class RoundRobinPolicy(Policy):
    """Cycles through the candidates of each model separately, so one model's traffic does not skew
    the rotation of another's."""

    name = "round_robin"

    def __init__(self) -> None:
        self._next: dict[tuple[str, str | None], int] = {}

    def choose(self, request: RequestInfo, view: FleetView, now: float) -> Decision:
        candidates = require_candidates(request, view)
        key = (request.model, request.adapter)
        turn = self._next.get(key, 0)
        self._next[key] = turn + 1
        return Decision(candidates[turn % len(candidates)].engine_id, "round_robin")


class LeastRequestPolicy(Policy):
    """The engine with the least outstanding work per unit of capacity: an H100 with three times an L4's
    capacity takes three times the requests before it looks as loaded. Ties go to the fastest engine."""

    name = "least_request"

    def __init__(self, *, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    def choose(self, request: RequestInfo, view: FleetView, now: float) -> Decision:
        return Decision(least_loaded(require_candidates(request, view), self._rng).engine_id, "least_request")


class LeastKVPolicy(Policy):
    """The engine with the lowest reported KV-cache usage; ties go to the lower normalised load."""

    name = "least_kv"

    def __init__(self, *, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    def choose(self, request: RequestInfo, view: FleetView, now: float) -> Decision:
        candidates = require_candidates(request, view)
        best = _lowest(candidates, lambda e: (e.kv_usage, e.normalized_load), self._rng)
        return Decision(best.engine_id, "least_kv")


class PowerOfTwoPolicy(Policy):
    """Sample two distinct candidates, keep the less loaded (normalised by capacity). Nearly as good as
    least_request, and robust to stale load figures because it does not herd onto one engine."""

    name = "power_of_two"

    def __init__(self, *, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    def choose(self, request: RequestInfo, view: FleetView, now: float) -> Decision:
        candidates = require_candidates(request, view)
        if len(candidates) == 1:
            return Decision(candidates[0].engine_id, "only_candidate")
        first, second = self._rng.sample(candidates, 2)
        if first.normalized_load == second.normalized_load:
            best = first if first.capacity >= second.capacity else second
        else:
            best = second if second.normalized_load < first.normalized_load else first
        return Decision(best.engine_id, "power_of_two")


def _lowest(candidates: list[EngineView], key: Callable[[EngineView], Any], rng: random.Random) -> EngineView:
    scores = [key(engine) for engine in candidates]
    low = min(scores)
    return break_tie([engine for engine, score in zip(candidates, scores, strict=True) if score == low], rng)
