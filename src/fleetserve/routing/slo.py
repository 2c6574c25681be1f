"""Policies that route on what a request needs: its latency objective, its session, its LoRA adapter.

- `slo_aware` predicts the time to first token on every candidate and takes the lowest; optionally it
  refuses (429) a request that no engine can serve within its TTFT objective, instead of letting it
  queue and miss anyway.
- `session` keeps a conversation on one engine with consistent hashing, so its growing prompt keeps
  hitting the same prefix cache, and fails over to the next engine on the ring when that one is down.
- `lora_affinity` scores engines as llm-d's LoRA-affinity scorer does: the adapter resident 1.0, a free
  adapter slot 0.8, the adapter loading 0.6, otherwise 0; ties go to the less loaded engine.
"""

from __future__ import annotations

import math
import random
from collections import OrderedDict

from fleetserve.errors import InputError
from fleetserve.routing.base import (
    Decision,
    EngineView,
    FleetView,
    Policy,
    RejectRequest,
    RequestInfo,
    require_candidates,
)
from fleetserve.routing.cache_aware import DEFAULT_MAX_BLOCKS, DEFAULT_MAX_BYTES, DEFAULT_TTL_S
from fleetserve.routing.dualmap import HashRing, stable_hash
from fleetserve.routing.shared import (
    SCORE_FREE_SLOT,
    SCORE_LOADING,
    SCORE_RESIDENT,
    AdapterResidency,
    TTFTEstimator,
    break_tie,
    least_loaded,
)


class SLOAwarePolicy(Policy):
    """Lowest predicted TTFT (see `TTFTEstimator`); engines without a predictor rank after all others,
    by normalised load. `ttft_slo_ms` is the objective of requests that carry none (the gateway passes
    the fleet's). With `reject_when_unmeetable`, a request whose best prediction breaks its objective
    is refused with 429, which tells a client to back off or try another region."""

    name = "slo_aware"

    def __init__(
        self,
        *,
        ttft_slo_ms: float | None = None,
        reject_when_unmeetable: bool = False,
        max_tree_size: int = DEFAULT_MAX_BLOCKS,
        max_bytes: int = DEFAULT_MAX_BYTES,
        ttl_s: float = DEFAULT_TTL_S,
        seed: int | None = None,
    ) -> None:
        if ttft_slo_ms is not None and ttft_slo_ms <= 0:
            raise InputError(f"ttft_slo_ms must be > 0, got {ttft_slo_ms}")
        self.ttft_slo_ms = ttft_slo_ms
        self.reject_when_unmeetable = reject_when_unmeetable
        self.estimator = TTFTEstimator(max_entries=max_tree_size, max_bytes=max_bytes, ttl_s=ttl_s)
        self._rng = random.Random(seed)

    def choose(self, request: RequestInfo, view: FleetView, now: float) -> Decision:
        candidates = require_candidates(request, view)
        cached = self.estimator.cached_tokens(request, view, candidates, now)
        predicted = self.estimator.predict(request, candidates, cached)

        def rank(engine: EngineView) -> tuple[float, float]:
            seconds = predicted[engine.engine_id]
            return (math.inf if seconds is None else seconds, engine.normalized_load)

        best_rank = min(rank(engine) for engine in candidates)
        best = break_tie([engine for engine in candidates if rank(engine) == best_rank], self._rng)
        best_s = predicted[best.engine_id]
        if best_s is None:
            return Decision(best.engine_id, "no_prediction")
        slo_ms = request.ttft_slo_ms if request.ttft_slo_ms is not None else self.ttft_slo_ms
        if slo_ms is not None and best_s * 1000.0 > slo_ms:
            if self.reject_when_unmeetable:
                raise RejectRequest(
                    429,
                    f"no engine can meet the time-to-first-token objective of {slo_ms:.0f} ms "
                    f"(best prediction {best_s * 1000.0:.0f} ms on {best.engine_id}); retry later",
                )
            return Decision(best.engine_id, "slo_unmeetable")
        return Decision(best.engine_id, "lowest_ttft")

    def on_dispatch(self, request: RequestInfo, engine_id: str, now: float) -> None:
        self.estimator.dispatched(request, engine_id, now)


# ---- sessions ----------------------------------------------------------------------------------------


class SessionPolicy(Policy):
    """Consistent hashing of the session key onto a ring of the model's engines, `virtual_nodes` points
    each. The ring holds every engine that serves the request, healthy or not, so a session moves only
    while its engine is down (to the next engine clockwise that can take it) and comes back after.
    Adding or removing an engine remaps only the sessions on its arcs. Requests without a session go to
    the least loaded candidate."""

    name = "session"

    def __init__(self, *, virtual_nodes: int = 100, seed: int | None = None) -> None:
        if virtual_nodes < 1:
            raise InputError(f"virtual_nodes must be >= 1, got {virtual_nodes}")
        self.virtual_nodes = virtual_nodes
        self._rng = random.Random(seed)
        self._rings: OrderedDict[frozenset[str], HashRing] = OrderedDict()

    def choose(self, request: RequestInfo, view: FleetView, now: float) -> Decision:
        candidates = require_candidates(request, view)
        if request.session is None:
            return Decision(least_loaded(candidates, self._rng).engine_id, "no_session")
        members = frozenset(e.engine_id for e in view.engines.values() if e.serves(request))
        routable = {engine.engine_id for engine in candidates}
        owners = enumerate(self._ring(members).walk(stable_hash(request.session)))
        # every candidate is a ring member, so the walk always reaches one
        position, engine_id = next((p, e) for p, e in owners if e in routable)
        return Decision(engine_id, "session_owner" if position == 0 else "session_failover")

    def _ring(self, members: frozenset[str]) -> HashRing:
        ring = self._rings.get(members)
        if ring is None:
            ring = HashRing(members, "session", self.virtual_nodes)
            self._rings[members] = ring
            if len(self._rings) > 32:  # engine sets differ per model and adapter; keep the recent ones
                self._rings.popitem(last=False)
        else:
            self._rings.move_to_end(members)
        return ring


# ---- LoRA affinity -------------------------------------------------------------------------------------


class LoraAffinityPolicy(Policy):
    """The highest LoRA-affinity score (see `AdapterResidency`); ties go to the lowest normalised load."""

    name = "lora_affinity"

    def __init__(self, *, seed: int | None = None) -> None:
        self.residency = AdapterResidency()
        self._rng = random.Random(seed)

    def choose(self, request: RequestInfo, view: FleetView, now: float) -> Decision:
        candidates = require_candidates(request, view)
        scores = [self.residency.score(engine, request.adapter) for engine in candidates]
        top = max(scores)
        best = least_loaded([e for e, s in zip(candidates, scores, strict=True) if s == top], self._rng)
        return Decision(best.engine_id, _LORA_REASONS[top])

    def on_dispatch(self, request: RequestInfo, engine_id: str, now: float) -> None:
        self.residency.dispatched(request, engine_id)

    def on_first_token(self, request: RequestInfo, engine_id: str, now: float) -> None:
        self.residency.first_token(request)

    def on_finish(self, request: RequestInfo, engine_id: str, now: float) -> None:
        self.residency.first_token(request)  # a request that failed before its first token


_LORA_REASONS = {
    SCORE_RESIDENT: "adapter_resident",
    SCORE_FREE_SLOT: "adapter_free_slot",
    SCORE_LOADING: "adapter_loading",
    0.0: "adapter_evicting",
}
