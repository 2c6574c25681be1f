"""`planned`: serve a GPU-mix plan's routing table (Mélange's `x_ij`, which the anchors throw away).

`fleetserve plan` writes, per (input, output) length bucket, the request rate it planned for each GPU
type (`routes`). A request's bucket comes from its prompt length and its `max_tokens` (the client's
bound on the output, as Mélange assumes the output length known; a request without one is routed by
its prompt length's row of the table). Within the bucket, GPU types take turns in proportion to the
planned rates (smooth weighted round robin, so the shares hold exactly and without drawing), and within
a type the least-loaded engine wins. When every engine of the chosen type is saturated (the predicted
TTFT breaks `ttft_slo_ms`, or, without a prediction, requests queue inside the engine), the request
spills over to the next type: the bucket's other planned types by planned rate, then every other type
by its profiled capacity for the bucket.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

from fleetserve.autoscale.mix import DEFAULT_INPUT_EDGES, DEFAULT_OUTPUT_EDGES, LengthBuckets, option_name
from fleetserve.errors import InputError
from fleetserve.routing.base import Decision, EngineView, FleetView, Policy, RequestInfo, require_candidates
from fleetserve.routing.shared import least_loaded


class PlannedPolicy(Policy):
    """Route by a plan's bucket table; see the module docstring. `routes` and `capacities` map a bucket
    key (`in:128-512,out:32-128`) to GPU type (`l4`, `h100-80g`, `h100-80g-tp2`) to requests/s."""

    name = "planned"

    def __init__(
        self,
        *,
        routes: Mapping[str, Mapping[str, float]] | None = None,
        capacities: Mapping[str, Mapping[str, float]] | None = None,
        input_edges: list[int] | None = None,
        output_edges: list[int] | None = None,
        ttft_slo_ms: float | None = None,
        seed: int | None = None,
    ) -> None:
        self.buckets = LengthBuckets(
            tuple(DEFAULT_INPUT_EDGES if input_edges is None else input_edges),
            tuple(DEFAULT_OUTPUT_EDGES if output_edges is None else output_edges),
        )
        if ttft_slo_ms is not None and ttft_slo_ms <= 0:
            raise InputError(f"ttft_slo_ms must be > 0, got {ttft_slo_ms}")
        self.ttft_slo_ms = ttft_slo_ms
        self.routes = _rates("routes", routes or {})
        self.capacities = _rates("capacities", capacities or {})
        self._turns: dict[str, dict[str, float]] = {}  # bucket key -> type -> smooth WRR credit
        self._rng = random.Random(seed)

    def set_routes(self, routes: Mapping[str, Mapping[str, float]]) -> None:
        """A new plan's table (the `planned` autoscaler's, re-planned over recent traffic)."""
        self.routes = _rates("routes", routes)
        self._turns.clear()

    def choose(self, request: RequestInfo, view: FleetView, now: float) -> Decision:
        candidates = require_candidates(request, view)
        by_type: dict[str, list[EngineView]] = {}
        for engine in candidates:
            by_type.setdefault(option_name(engine.gpu or "unknown", engine.tp), []).append(engine)
        key, planned = self._planned_rates(request)
        weights = {name: rate for name, rate in planned.items() if rate > 0 and name in by_type}
        if not weights:
            return Decision(least_loaded(candidates, self._rng).engine_id, "unplanned")
        first = self._take_turn(key, weights)
        capacity = self.capacities.get(key, {})
        order = [first]
        order += sorted((n for n in weights if n != first), key=lambda n: -weights[n])
        order += sorted((n for n in by_type if n not in weights), key=lambda n: -capacity.get(n, 0.0))
        for position, name in enumerate(order):
            engine = least_loaded(by_type[name], self._rng)
            if not self._saturated(engine, request):
                return Decision(engine.engine_id, "planned" if position == 0 else "spill_over")
        return Decision(least_loaded(by_type[first], self._rng).engine_id, "all_saturated")

    def _planned_rates(self, request: RequestInfo) -> tuple[str, dict[str, float]]:
        """The request's bucket key and the rates planned for it; without a known output (or for a
        bucket the plan never saw), the sum over the prompt length's row."""
        if request.max_output_tokens > 0:
            key = self.buckets.bucket_of(request.prompt_len, request.max_output_tokens).key
            if key in self.routes:
                return key, self.routes[key]
        row = self.buckets.input_bucket_keys(request.prompt_len)
        summed: dict[str, float] = {}
        for bucket in row:
            for name, rate in self.routes.get(bucket, {}).items():
                summed[name] = summed.get(name, 0.0) + rate
        return self.buckets.row_key(request.prompt_len), summed

    def _take_turn(self, key: str, weights: Mapping[str, float]) -> str:
        credit = self._turns.setdefault(key, {})
        total = sum(weights.values())
        for name, weight in weights.items():
            credit[name] = credit.get(name, 0.0) + weight
        chosen = max(weights, key=lambda name: credit[name])
        credit[chosen] -= total
        return chosen

    def _saturated(self, engine: EngineView, request: RequestInfo) -> bool:
        slo_ms = request.ttft_slo_ms if request.ttft_slo_ms is not None else self.ttft_slo_ms
        if engine.predictor is not None and slo_ms is not None:
            return engine.predictor(request.prompt_len, 0) * 1000.0 > slo_ms
        return engine.waiting > 0


def _rates(name: str, table: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    if not isinstance(table, Mapping):
        raise InputError(f"{name} must map a bucket key to GPU type to requests/s")
    checked: dict[str, dict[str, float]] = {}
    for key, row in table.items():
        if not isinstance(row, Mapping):
            raise InputError(f"{name}[{key!r}] must map GPU type to requests/s, got {row!r}")
        for gpu, rate in row.items():
            if not isinstance(rate, int | float) or rate < 0:
                raise InputError(f"{name}[{key!r}][{gpu!r}] must be a rate >= 0, got {rate!r}")
        checked[str(key)] = {str(gpu): float(rate) for gpu, rate in row.items()}
    return checked
