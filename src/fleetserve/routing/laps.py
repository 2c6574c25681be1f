"""LAPS at the cluster level: length-aware lanes of engines (LAPS: length-aware prefill scheduling).

Short prompts (at most `threshold` tokens) go to the short lane, longer ones to the long lane, so a chat
turn never queues behind a 30 000-token document. The candidate engines of each model are split once, by
capacity: engines join the short lane, fastest first, until it holds `short_fraction` of the capacity
(every lane keeps at least one engine). Within a lane the least loaded engine (normalised by capacity)
wins.

The split follows the traffic: a lane's backlog is the prompt tokens the router has in flight on its
engines (dispatched, not finished) per unit of the lane's capacity. When one lane's backlog is below half
the other's, at most once every `rebalance_interval_s`, the idle lane gives the busy one its engine with
the least backlog. Engines that join later go to the lane furthest below its capacity target.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Literal

from fleetserve.errors import InputError
from fleetserve.routing.base import Decision, EngineView, FleetView, Policy, RequestInfo, require_candidates
from fleetserve.routing.prefix import prompt_tokens
from fleetserve.routing.shared import least_loaded

Lane = Literal["short", "long"]


@dataclass(slots=True)
class _Lanes:
    """The lane split of one model's engines."""

    lane_of: dict[str, Lane] = field(default_factory=dict)
    last_move: float = -math.inf


class LAPSPolicy(Policy):
    name = "laps"

    def __init__(
        self,
        *,
        threshold: int = 256,
        short_fraction: float = 0.5,
        rebalance_interval_s: float = 5.0,
        rebalance_ratio: float = 2.0,
        seed: int | None = None,
    ) -> None:
        """`rebalance_ratio` 2 means: move an engine when one lane's backlog exceeds twice the other's."""
        if threshold < 1:
            raise InputError(f"threshold must be >= 1 token, got {threshold}")
        if not 0.0 < short_fraction < 1.0:
            raise InputError(f"short_fraction must be strictly between 0 and 1, got {short_fraction}")
        if rebalance_interval_s < 0 or rebalance_ratio <= 1.0:
            raise InputError("rebalance_interval_s must be >= 0 and rebalance_ratio > 1")
        self.threshold = threshold
        self.short_fraction = short_fraction
        self.rebalance_interval_s = rebalance_interval_s
        self.rebalance_ratio = rebalance_ratio
        self._rng = random.Random(seed)
        self._lanes: dict[str, _Lanes] = {}  # model -> its split
        self._backlog: dict[str, int] = {}  # engine -> prompt tokens in flight
        self._outstanding: dict[str, tuple[str, int]] = {}  # request -> (engine, prompt tokens)

    def choose(self, request: RequestInfo, view: FleetView, now: float) -> Decision:
        candidates = require_candidates(request, view)
        lanes = self._lanes.setdefault(request.model, _Lanes())
        self._assign_new(lanes, candidates)
        self._rebalance(lanes, candidates, now)
        lane: Lane = "short" if prompt_tokens(request) <= self.threshold else "long"
        members = [engine for engine in candidates if lanes.lane_of[engine.engine_id] == lane]
        # a lane whose engines are all down borrows the other lane's rather than failing the request
        pool = members or candidates
        best = least_loaded(pool, self._rng)
        return Decision(best.engine_id, f"{lane}_lane" if members else f"{lane}_lane_borrowed")

    def lanes(self, model: str) -> dict[str, Lane]:
        """The current lane of each engine of `model` (a copy)."""
        lanes = self._lanes.get(model)
        return dict(lanes.lane_of) if lanes else {}

    def _assign_new(self, lanes: _Lanes, candidates: list[EngineView]) -> None:
        new = [engine for engine in candidates if engine.engine_id not in lanes.lane_of]
        if not new:
            return
        capacity = {engine.engine_id: engine.capacity for engine in candidates}
        short_capacity = sum(c for e, c in capacity.items() if lanes.lane_of.get(e) == "short")
        long_capacity = sum(c for e, c in capacity.items() if lanes.lane_of.get(e) == "long")
        for engine in sorted(new, key=lambda e: (-e.capacity, e.engine_id)):
            total = short_capacity + long_capacity + engine.capacity
            # the lane further below its target share takes the engine; an empty lane always does
            short_deficit = self.short_fraction * total - short_capacity
            long_deficit = (1.0 - self.short_fraction) * total - long_capacity
            if short_capacity == 0 and long_capacity > 0:
                lane: Lane = "short"
            elif long_capacity == 0 and short_capacity > 0:
                lane = "long"
            else:
                lane = "short" if short_deficit >= long_deficit else "long"
            lanes.lane_of[engine.engine_id] = lane
            if lane == "short":
                short_capacity += engine.capacity
            else:
                long_capacity += engine.capacity

    def _rebalance(self, lanes: _Lanes, candidates: list[EngineView], now: float) -> None:
        if now - lanes.last_move < self.rebalance_interval_s:
            return
        by_lane: dict[Lane, list[EngineView]] = {"short": [], "long": []}
        for engine in candidates:
            by_lane[lanes.lane_of[engine.engine_id]].append(engine)
        backlog = {lane: self._lane_backlog(engines) for lane, engines in by_lane.items()}
        for donor, taker in (("short", "long"), ("long", "short")):
            if len(by_lane[donor]) > 1 and backlog[taker] > self.rebalance_ratio * backlog[donor]:
                moved = min(by_lane[donor], key=lambda e: (self._backlog.get(e.engine_id, 0), e.engine_id))
                lanes.lane_of[moved.engine_id] = taker
                lanes.last_move = now
                return

    def _lane_backlog(self, engines: list[EngineView]) -> float:
        capacity = sum(engine.capacity for engine in engines)
        if capacity <= 0:
            return 0.0
        return sum(self._backlog.get(engine.engine_id, 0) for engine in engines) / capacity

    def on_dispatch(self, request: RequestInfo, engine_id: str, now: float) -> None:
        self._release(request.request_id)  # a retry moves the request
        tokens = prompt_tokens(request)
        self._outstanding[request.request_id] = (engine_id, tokens)
        self._backlog[engine_id] = self._backlog.get(engine_id, 0) + tokens

    def on_finish(self, request: RequestInfo, engine_id: str, now: float) -> None:
        self._release(request.request_id)

    def _release(self, request_id: str) -> None:
        entry = self._outstanding.pop(request_id, None)
        if entry is not None:
            engine_id, tokens = entry
            self._backlog[engine_id] -= tokens
