"""What several policies share: how ties are broken and idle engines kept busy, the TTFT estimate, and
which LoRA adapters sit in each engine's GPU slots.

Ties and idleness: on a heterogeneous fleet, equally good engines are not equally fast, and no engine
should sit idle while another queues.

Among engines a policy scores the same, the one with the most capacity (the engine model's relative
throughput of its GPU, model and TP degree) wins: with an idle fleet a request goes to an idle H100, not
to an idle L4. Only engines that are alike in that too are drawn at random, from the policy's own seeded
`random.Random`, so runs stay reproducible.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Mapping, Sequence

from fleetserve.routing.base import EngineView, FleetView, RequestInfo
from fleetserve.routing.prefix import PrefixMatcher, prompt_tokens


def break_tie(tied: Sequence[EngineView], rng: random.Random) -> EngineView:
    if len(tied) == 1:
        return tied[0]
    fastest = max(engine.capacity for engine in tied)
    quickest = [engine for engine in tied if engine.capacity == fastest]
    return quickest[0] if len(quickest) == 1 else rng.choice(quickest)


def least_loaded(engines: Sequence[EngineView], rng: random.Random) -> EngineView:
    """The engine with the least outstanding work per unit of capacity; ties as `break_tie`.
    `normalized_load` is inlined: the simulator runs this for every request over every engine."""
    loads = [(engine.in_flight + engine.waiting) / engine.capacity for engine in engines]
    low = min(loads)
    if loads.count(low) == 1:
        return engines[loads.index(low)]
    return break_tie([engine for engine, load in zip(engines, loads, strict=True) if load == low], rng)


def idle_instead(
    chosen: EngineView, candidates: Sequence[EngineView], rng: random.Random
) -> EngineView | None:
    """The fastest idle candidate when `chosen` already has requests waiting in its queue: a cache hit
    is not worth queueing for while an engine has nothing to do. None when `chosen` does not queue or no
    candidate is idle."""
    if not chosen.waiting:
        return None
    idle = [engine for engine in candidates if not engine.in_flight and not engine.waiting]
    return break_tie(idle, rng) if idle else None


class TTFTEstimator:
    """Predicted TTFT of a request on each candidate engine, in seconds: the engine view's predictor
    (`EngineView.predictor`) given the request's prompt length and the tokens that engine holds in its
    prefix cache. An engine without a predictor gets no prediction (None).

    The queueing term: requests the router dispatched that the engine has not reported yet are counted
    where the router's exact `in_flight` meets the engine's lagging report, inside the predictor, not
    here. The simulator's predictor is the engine model itself, which holds every dispatched request the
    moment it is dispatched; the gateway's (`fleetserve.fleet.view.TTFTEstimate`) puts
    `max(waiting, in_flight - running)` prompts of a typical size ahead of this one. Adding
    `in_flight - running - waiting` again here would count those requests twice.

    Cached tokens come from the prefix index (`fleetserve.routing.prefix.PrefixMatcher`): the fleet's
    precise one when the view has it, else an approximate one learned from this router's dispatches.
    """

    def __init__(self, *, max_entries: int, max_bytes: int, ttl_s: float) -> None:
        self.prefixes = PrefixMatcher(max_entries=max_entries, max_bytes=max_bytes, ttl_s=ttl_s)

    def cached_tokens(
        self, request: RequestInfo, view: FleetView, candidates: Sequence[EngineView], now: float
    ) -> dict[str, int]:
        """Per candidate, how many prompt tokens it holds in its prefix cache (whole blocks)."""
        _, matched = self.prefixes.match(request, view, candidates, now)
        block_size = self.prefixes.block_size
        # the engine recomputes at least the last prompt token to produce the first output token
        ceiling = max(0, prompt_tokens(request) - 1)
        return {e.engine_id: min(ceiling, matched.get(e.engine_id, 0) * block_size) for e in candidates}

    def predict(
        self, request: RequestInfo, candidates: Sequence[EngineView], cached: Mapping[str, int]
    ) -> dict[str, float | None]:
        tokens = prompt_tokens(request)
        return {
            engine.engine_id: None
            if engine.predictor is None
            else engine.predictor(tokens, cached.get(engine.engine_id, 0))
            for engine in candidates
        }

    def dispatched(self, request: RequestInfo, engine_id: str, now: float) -> None:
        self.prefixes.record(request, engine_id, now)


SCORE_RESIDENT = 1.0
SCORE_FREE_SLOT = 0.8
SCORE_LOADING = 0.6


class AdapterResidency:
    """Which adapters sit in each engine's GPU slots, as far as the router can tell.

    `EngineView.adapters` lists the adapters an engine can serve (registered, in host memory); only
    `max_loras` of them are in GPU slots at once, and which ones the view does not say. The router knows
    what it sent: an adapter with requests in flight on an engine is resident (vLLM pins their slots); one
    sent there before stays resident until `max_loras` more recent adapters displaced it (slots are
    reused least recently used first); one whose first request there has not produced a token yet is
    loading.
    """

    def __init__(self) -> None:
        self._recent: dict[str, OrderedDict[str, None]] = {}  # engine -> adapters, most recent last
        self._loading: dict[tuple[str, str], int] = {}  # (engine, adapter) -> requests waiting on it
        self._waiting: dict[str, tuple[str, str]] = {}  # request -> its loading key

    def score(self, engine: EngineView, adapter: str | None) -> float:
        if adapter is None:
            return SCORE_RESIDENT  # the base model is always there
        recent = self._recent.get(engine.engine_id)
        resident = list(recent)[-engine.max_loras :] if recent and engine.max_loras > 0 else []
        if adapter in resident and not self._loading.get((engine.engine_id, adapter)):
            return SCORE_RESIDENT
        if self._loading.get((engine.engine_id, adapter)):
            return SCORE_LOADING
        if len(resident) < engine.max_loras:
            return SCORE_FREE_SLOT
        return 0.0

    def dispatched(self, request: RequestInfo, engine_id: str) -> None:
        adapter = request.adapter
        if adapter is None:
            return
        self.first_token(request)  # a retry moves the request
        recent = self._recent.setdefault(engine_id, OrderedDict())
        if adapter not in recent:
            key = (engine_id, adapter)
            self._loading[key] = self._loading.get(key, 0) + 1
            self._waiting[request.request_id] = key
        recent[adapter] = None
        recent.move_to_end(adapter)
        while len(recent) > 64:  # far more than any engine's slots; bounds the memory
            recent.popitem(last=False)

    def first_token(self, request: RequestInfo) -> None:
        key = self._waiting.pop(request.request_id, None)
        if key is not None:
            left = self._loading[key] - 1
            if left:
                self._loading[key] = left
            else:
                del self._loading[key]
