"""How policies break ties and keep the fleet working: on a heterogeneous fleet, equally good engines are
not equally fast, and no engine should sit idle while another queues.

Among engines a policy scores the same, the one with the most capacity (the engine model's relative
throughput of its GPU, model and TP degree) wins: with an idle fleet a request goes to an idle H100, not
to an idle L4. Only engines that are alike in that too are drawn at random, from the policy's own seeded
`random.Random`, so runs stay reproducible.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from fleetserve.routing.base import EngineView


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
