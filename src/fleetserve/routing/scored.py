"""llm-d's way of routing: a weighted sum of named scorers, each mapping every candidate to [0, 1] with
higher better, and the highest total wins (ties at random).

    router:
      policy: scored
      params: {scorers: {queue: 2, kv: 2, prefix: 3, lora: 1}}

The scorers:
- queue: (max - load) / (max - min) over the candidates' normalised loads (1 for all when equal);
- kv: 1 - KV-cache usage;
- prefix: the fraction of the request's prompt blocks the engine holds (precise index when the view has
  one, else learned from this router's dispatches);
- lora: the LoRA-affinity score of `fleetserve.routing.slo.AdapterResidency` (1 / 0.8 / 0.6 / 0);
- predicted_ttft: (max - ttft) / (max - min) over the predictions of `TTFTEstimator` (engines without a
  predictor score 0).

The decision's reason names the scorer that separated the winner from the runner-up the most
("scored_prefix", "scored_queue", ...), so the route metric shows which signal is steering traffic.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence

from fleetserve.errors import InputError
from fleetserve.routing.base import Decision, EngineView, FleetView, Policy, RequestInfo, require_candidates
from fleetserve.routing.cache_aware import DEFAULT_MAX_BLOCKS, DEFAULT_MAX_BYTES, DEFAULT_TTL_S
from fleetserve.routing.prefix import request_block_hashes
from fleetserve.routing.shared import AdapterResidency, TTFTEstimator, break_tie, idle_instead

DEFAULT_WEIGHTS: dict[str, float] = {"queue": 2.0, "kv": 2.0, "prefix": 3.0, "lora": 1.0}


def spread_score(values: Sequence[float | None]) -> list[float]:
    """Lower is better: the lowest value scores 1, the highest 0, linearly between; None scores 0."""
    known = [v for v in values if v is not None]
    if not known:
        return [0.0] * len(values)
    low, high = min(known), max(known)
    if high == low:
        return [0.0 if v is None else 1.0 for v in values]
    return [0.0 if v is None else (high - v) / (high - low) for v in values]


class ScoredPolicy(Policy):
    name = "scored"

    def __init__(
        self,
        *,
        scorers: Mapping[str, float] | None = None,
        max_tree_size: int = DEFAULT_MAX_BLOCKS,
        max_bytes: int = DEFAULT_MAX_BYTES,
        ttl_s: float = DEFAULT_TTL_S,
        seed: int | None = None,
    ) -> None:
        weights = dict(DEFAULT_WEIGHTS if scorers is None else scorers)
        unknown = sorted(set(weights) - set(SCORERS))
        if unknown:
            raise InputError(f"unknown scorer {', '.join(unknown)}; valid scorers: {', '.join(SCORERS)}")
        if any(weight < 0 for weight in weights.values()) or not any(weights.values()):
            raise InputError("scorer weights must be >= 0 and at least one must be > 0")
        self.weights = {name: float(weight) for name, weight in weights.items() if weight > 0}
        self.estimator = TTFTEstimator(max_entries=max_tree_size, max_bytes=max_bytes, ttl_s=ttl_s)
        self.residency = AdapterResidency()
        self._rng = random.Random(seed)

    def scores(
        self, request: RequestInfo, view: FleetView, candidates: list[EngineView], now: float
    ) -> dict[str, list[float]]:
        """Each weighted scorer's score of each candidate, in candidate order (unweighted)."""
        # always match: it fixes the prefix mode and block size that on_dispatch records with
        cached = self.estimator.cached_tokens(request, view, candidates, now)
        return {name: SCORERS[name](self, request, candidates, cached) for name in self.weights}

    def choose(self, request: RequestInfo, view: FleetView, now: float) -> Decision:
        candidates = require_candidates(request, view)
        by_scorer = self.scores(request, view, candidates, now)
        totals = [
            sum(self.weights[name] * scores[i] for name, scores in by_scorer.items())
            for i in range(len(candidates))
        ]
        top = max(totals)
        best = break_tie(
            [engine for engine, total in zip(candidates, totals, strict=True) if total == top], self._rng
        )
        idle = idle_instead(best, candidates, self._rng)
        if idle is not None:
            return Decision(idle.engine_id, "idle_engine")
        winner = candidates.index(best)
        return Decision(candidates[winner].engine_id, self._reason(by_scorer, totals, winner))

    def _reason(self, by_scorer: dict[str, list[float]], totals: list[float], winner: int) -> str:
        others = [i for i in range(len(totals)) if i != winner]
        if not others:
            return "only_candidate"
        runner_up = max(others, key=lambda i: totals[i])
        if totals[runner_up] == totals[winner]:
            return "scored_tie"
        margins = {
            name: self.weights[name] * (scores[winner] - scores[runner_up])
            for name, scores in by_scorer.items()
        }
        return f"scored_{max(margins, key=margins.__getitem__)}"

    def on_dispatch(self, request: RequestInfo, engine_id: str, now: float) -> None:
        self.estimator.dispatched(request, engine_id, now)
        self.residency.dispatched(request, engine_id)

    def on_first_token(self, request: RequestInfo, engine_id: str, now: float) -> None:
        self.residency.first_token(request)

    def on_finish(self, request: RequestInfo, engine_id: str, now: float) -> None:
        self.residency.first_token(request)  # a request that failed before its first token


Scorer = Callable[[ScoredPolicy, RequestInfo, list[EngineView], Mapping[str, int]], list[float]]


def _queue(policy: ScoredPolicy, request: RequestInfo, engines: list[EngineView], cached: Mapping[str, int]):
    return spread_score([engine.normalized_load for engine in engines])


def _kv(policy: ScoredPolicy, request: RequestInfo, engines: list[EngineView], cached: Mapping[str, int]):
    return [min(1.0, max(0.0, 1.0 - engine.kv_usage)) for engine in engines]


def _prefix(policy: ScoredPolicy, request: RequestInfo, engines: list[EngineView], cached: Mapping[str, int]):
    block_size = policy.estimator.prefixes.block_size
    blocks = len(request_block_hashes(request, block_size))
    if not blocks:
        return [0.0] * len(engines)
    # cached tokens are capped one short of the prompt; a whole-block prompt still scores 1 when all match
    return [min(1.0, -(-cached.get(engine.engine_id, 0) // block_size) / blocks) for engine in engines]


def _lora(policy: ScoredPolicy, request: RequestInfo, engines: list[EngineView], cached: Mapping[str, int]):
    return [policy.residency.score(engine, request.adapter) for engine in engines]


def _predicted_ttft(
    policy: ScoredPolicy, request: RequestInfo, engines: list[EngineView], cached: Mapping[str, int]
):
    predicted = policy.estimator.predict(request, engines, cached)
    return spread_score([predicted[engine.engine_id] for engine in engines])


SCORERS: dict[str, Scorer] = {
    "queue": _queue,
    "kv": _kv,
    "prefix": _prefix,
    "lora": _lora,
    "predicted_ttft": _predicted_ttft,
}
