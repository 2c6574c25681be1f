"""Cache-aware policies: send a request where its prompt prefix is already cached, unless load says no.

- `prefix_aware` follows SGLang's router `cache_aware` policy: shortest queue while the fleet is
  imbalanced, else the engine holding the longest prefix if it covers more than `cache_threshold` of the
  prompt, else the engine holding the fewest blocks (the one with the most room to cache something new).
- `kv_cost` follows NVIDIA Dynamo's KV router: each engine's cost is
  `overlap_weight * prefill blocks it would still compute + decode blocks it would hold`, lowest wins, or
  softmax sampling over the costs with a temperature.

Both read who-holds-what from the fleet's precise index when there is one (KV events), else from their
own approximate index learned from their dispatches (see `fleetserve.routing.prefix`). Load is divided by
each engine's relative capacity, so an engine three times as fast counts as a third as loaded.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass

from fleetserve.errors import InputError
from fleetserve.routing.base import Decision, EngineView, FleetView, Policy, RequestInfo, require_candidates
from fleetserve.routing.prefix import PrefixMatcher, prompt_tokens
from fleetserve.routing.shared import break_tie, idle_instead

# The approximate index's default bounds: 1 M blocks (~16 M tokens at block size 16) is about SGLang's
# max_tree_size of 2**24 characters, and stays well under the 256 MB byte cap.
DEFAULT_MAX_BLOCKS = 1_000_000
DEFAULT_MAX_BYTES = 256 * 2**20
DEFAULT_TTL_S = 600.0


class PrefixAwarePolicy(Policy):
    """SGLang's cache_aware routing over block hashes instead of characters, with bounded loads.

    Imbalanced means `max - min > balance_abs_threshold` and `max > min * balance_rel_threshold` over
    the candidates' normalised loads; the match rate is matched prefix tokens over prompt tokens.
    `cache_threshold` defaults to 0.3, the figure this project's design uses; SGLang's CLI default is 0.5.

    One departure from SGLang, for heterogeneous fleets: a cache hit or a new prefix may only go to an
    engine with room under a bounded load (consistent hashing with bounded loads, Mirrokni, Thorup and
    Zadimoghaddam, SODA 2018, weighted by capacity). With `m` requests outstanding in all, engine `e` may
    hold at most `ceil(load_bound * (m + 1) * capacity_e / total capacity)`. SGLang's imbalance test is in
    absolute request counts (64): on a fleet of H100s and L4s it never fired while every session of a
    tenant stuck to the L4 that first saw the tenant's system prompt, and three of four H100s sat idle.
    The bound spreads a hot prefix to the next engine once its holders have their share, and keeps
    affinity wherever there is room. `load_bound: 0` turns it off (SGLang's behaviour).
    """

    name = "prefix_aware"

    def __init__(
        self,
        *,
        cache_threshold: float = 0.3,
        balance_abs_threshold: float = 64,
        balance_rel_threshold: float = 1.5,
        load_bound: float = 1.25,
        max_tree_size: int = DEFAULT_MAX_BLOCKS,
        max_bytes: int = DEFAULT_MAX_BYTES,
        ttl_s: float = DEFAULT_TTL_S,
        seed: int | None = None,
    ) -> None:
        if not 0.0 <= cache_threshold <= 1.0:
            raise InputError(f"cache_threshold must be within 0..1, got {cache_threshold}")
        if balance_abs_threshold < 0 or balance_rel_threshold < 1.0:
            raise InputError("balance_abs_threshold must be >= 0 and balance_rel_threshold >= 1")
        if load_bound != 0 and load_bound < 1.0:
            raise InputError(f"load_bound must be 0 (off) or at least 1, got {load_bound}")
        self.cache_threshold = cache_threshold
        self.balance_abs_threshold = balance_abs_threshold
        self.balance_rel_threshold = balance_rel_threshold
        self.load_bound = load_bound
        self.prefixes = PrefixMatcher(max_entries=max_tree_size, max_bytes=max_bytes, ttl_s=ttl_s)
        self._rng = random.Random(seed)

    def choose(self, request: RequestInfo, view: FleetView, now: float) -> Decision:
        candidates = require_candidates(request, view)
        # match even when the load decides: it fixes the index mode and block size on_dispatch records with
        _, matched = self.prefixes.match(request, view, candidates, now)
        if len(candidates) == 1:
            return Decision(candidates[0].engine_id, "only_candidate")
        loads = [engine.normalized_load for engine in candidates]
        low, high = min(loads), max(loads)
        if high - low > self.balance_abs_threshold and high > low * self.balance_rel_threshold:
            tied = [engine for engine, load in zip(candidates, loads, strict=True) if load == low]
            return Decision(self._pick(tied).engine_id, "imbalanced")

        roomy = self._with_room(candidates)
        best_blocks = max((matched.get(engine.engine_id, 0) for engine in candidates), default=0)
        tokens = prompt_tokens(request)
        match_rate = best_blocks * self.prefixes.block_size / tokens if tokens else 0.0
        if match_rate > self.cache_threshold:
            holders = [engine for engine in roomy if matched.get(engine.engine_id, 0) == best_blocks]
            if holders:
                # SGLang keeps one tree node per worker set; among equal holders the least loaded is fair
                least = min(engine.normalized_load for engine in holders)
                holder = self._pick([e for e in holders if e.normalized_load == least])
                idle = idle_instead(holder, candidates, self._rng)
                return (
                    Decision(holder.engine_id, "cache_hit")
                    if idle is None
                    else Decision(idle.engine_id, "idle_engine")
                )
        # a new prefix goes to the least loaded engine with room, the fastest of those, and among engines
        # alike in both to the smallest tree (SGLang's rule): at low load the fastest idle engine, not
        # whichever small GPU has cached the least
        least = min(engine.normalized_load for engine in roomy)
        lightest = [engine for engine in roomy if engine.normalized_load == least]
        fastest = max(engine.capacity for engine in lightest)
        quickest = [engine for engine in lightest if engine.capacity == fastest]
        sizes = [self.prefixes.sent_blocks(engine.engine_id) for engine in quickest]
        tied = [engine for engine, size in zip(quickest, sizes, strict=True) if size == min(sizes)]
        reason = "smallest_tree" if match_rate <= self.cache_threshold else "holders_full"
        return Decision(self._pick(tied).engine_id, reason)

    def _with_room(self, candidates: list[EngineView]) -> list[EngineView]:
        """The candidates below their bounded load with this request counted (never empty: the slots add
        up to more than the outstanding requests)."""
        if not self.load_bound:
            return candidates
        outstanding = sum(engine.in_flight + engine.waiting for engine in candidates) + 1
        share = self.load_bound * outstanding / sum(engine.capacity for engine in candidates)
        roomy = [e for e in candidates if e.in_flight + e.waiting + 1 <= math.ceil(share * e.capacity)]
        return roomy or candidates

    def on_dispatch(self, request: RequestInfo, engine_id: str, now: float) -> None:
        # SGLang inserts the prompt into the chosen worker's tree whichever branch chose it
        self.prefixes.record(request, engine_id, now)

    def _pick(self, tied: list[EngineView]) -> EngineView:
        return break_tie(tied, self._rng)


@dataclass(slots=True)
class _Outstanding:
    """What one dispatched request adds to its engine's cost until it progresses."""

    engine_id: str
    prefill_tokens: int  # uncached prompt tokens still to compute; 0 once the first token arrived
    blocks: int  # KV blocks it holds while it decodes


class KVCostPolicy(Policy):
    """Dynamo's KV-router cost, per unit of engine capacity.

    For engine e and a request of `n` prompt tokens of which e caches `c` (in whole blocks):
    prefill_blocks = (outstanding prefill tokens on e + n - c) / block_size and
    decode_blocks = active blocks on e + ceil(n / block_size); cost = (overlap_weight * prefill_blocks +
    decode_blocks) / capacity. Outstanding prefill and active blocks are the router's own bookkeeping
    (on_dispatch / on_first_token / on_finish), which is exact and instant where scraped figures lag.
    With `temperature` 0 the lowest cost wins (ties: fewest cached blocks, then random); above 0 an engine
    is drawn with probability proportional to exp(-(cost - min) / ((max - min) * temperature)).
    """

    name = "kv_cost"

    def __init__(
        self,
        *,
        overlap_weight: float = 1.0,
        temperature: float = 0.0,
        max_tree_size: int = DEFAULT_MAX_BLOCKS,
        max_bytes: int = DEFAULT_MAX_BYTES,
        ttl_s: float = 120.0,  # Dynamo's approximate-mode expiry
        seed: int | None = None,
    ) -> None:
        if overlap_weight < 0 or temperature < 0:
            raise InputError("overlap_weight and temperature must be >= 0")
        self.overlap_weight = overlap_weight
        self.temperature = temperature
        self.prefixes = PrefixMatcher(max_entries=max_tree_size, max_bytes=max_bytes, ttl_s=ttl_s)
        self._rng = random.Random(seed)
        self._outstanding: dict[str, _Outstanding] = {}
        self._prefill_tokens: dict[str, int] = {}  # engine -> sum of its requests' outstanding prefill
        self._active_blocks: dict[str, int] = {}  # engine -> sum of its requests' blocks
        self._last_matched: tuple[str, Mapping[str, int]] = ("", {})

    def choose(self, request: RequestInfo, view: FleetView, now: float) -> Decision:
        candidates = require_candidates(request, view)
        _, matched = self.prefixes.match(request, view, candidates, now)
        self._last_matched = (request.request_id, matched)
        if len(candidates) == 1:
            return Decision(candidates[0].engine_id, "only_candidate")
        costs = self.costs(request, candidates, matched)
        if self.temperature > 0:
            return Decision(self._sample(candidates, costs).engine_id, "softmax_cost")
        low = min(costs)
        tied = [engine for engine, cost in zip(candidates, costs, strict=True) if cost == low]
        if len(tied) > 1:
            sizes = [self.prefixes.sent_blocks(engine.engine_id) / engine.capacity for engine in tied]
            tied = [engine for engine, size in zip(tied, sizes, strict=True) if size == min(sizes)]
        best = break_tie(tied, self._rng)
        idle = idle_instead(best, candidates, self._rng)
        return (
            Decision(best.engine_id, "lowest_cost")
            if idle is None
            else Decision(idle.engine_id, "idle_engine")
        )

    def costs(
        self, request: RequestInfo, candidates: list[EngineView], matched: Mapping[str, int]
    ) -> list[float]:
        block_size = self.prefixes.block_size
        tokens = prompt_tokens(request)
        request_blocks = -(-tokens // block_size)
        weight = self.overlap_weight
        prefill, active = self._prefill_tokens, self._active_blocks
        costs = []
        for engine in candidates:
            engine_id = engine.engine_id
            new_tokens = max(0, tokens - matched.get(engine_id, 0) * block_size)
            prefill_blocks = (prefill.get(engine_id, 0) + new_tokens) / block_size
            decode_blocks = active.get(engine_id, 0) + request_blocks
            costs.append((weight * prefill_blocks + decode_blocks) / engine.capacity)
        return costs

    def _sample(self, candidates: list[EngineView], costs: list[float]) -> EngineView:
        low, high = min(costs), max(costs)
        if high == low:
            return self._rng.choice(candidates)
        scale = (high - low) * self.temperature
        weights = [math.exp(-(cost - low) / scale) for cost in costs]
        return self._rng.choices(candidates, weights)[0]

    def on_dispatch(self, request: RequestInfo, engine_id: str, now: float) -> None:
        self.prefixes.record(request, engine_id, now)
        self._release(request.request_id)  # a retry moves the request: its first engine no longer counts
        request_id, matched = self._last_matched
        cached_blocks = matched.get(engine_id, 0) if request_id == request.request_id else 0
        block_size = self.prefixes.block_size
        tokens = prompt_tokens(request)
        entry = _Outstanding(engine_id, max(0, tokens - cached_blocks * block_size), -(-tokens // block_size))
        self._outstanding[request.request_id] = entry
        self._prefill_tokens[engine_id] = self._prefill_tokens.get(engine_id, 0) + entry.prefill_tokens
        self._active_blocks[engine_id] = self._active_blocks.get(engine_id, 0) + entry.blocks

    def on_first_token(self, request: RequestInfo, engine_id: str, now: float) -> None:
        entry = self._outstanding.get(request.request_id)
        if entry is not None and entry.prefill_tokens:
            self._prefill_tokens[entry.engine_id] -= entry.prefill_tokens
            entry.prefill_tokens = 0

    def on_finish(self, request: RequestInfo, engine_id: str, now: float) -> None:
        self._release(request.request_id)

    def _release(self, request_id: str) -> None:
        entry = self._outstanding.pop(request_id, None)
        if entry is None:
            return
        engine_id = entry.engine_id
        self._prefill_tokens[engine_id] -= entry.prefill_tokens
        self._active_blocks[engine_id] -= entry.blocks
