"""The highest arrival rate a fleet sustains under a policy: bisection on the trace's rate.

The trace keeps its shape (its burstiness, lengths and prefixes); only its timestamps are divided by the
rate scale. SLO attainment is assumed to fall as the rate rises, which holds for any fleet that does not
shed load cleverly; the probes are reported so a non-monotone curve is visible.

Two things keep the search short. The first probe runs the whole trace, and if requests fail there for
reasons no rate changes (a prompt longer than the model's context, a model no engine serves) so that
the target is out of reach at every rate, the search stops and says why (`UnreachableTarget`). Every
later probe stops as soon as enough requests have missed the SLO that the target cannot be met: a probe
far past capacity costs a fraction of a full run.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fleetserve.config import FleetConfig
from fleetserve.sim.errors import SimInputError
from fleetserve.sim.metrics import FAILURE_REASONS, LOAD_INDEPENDENT_FAILURES
from fleetserve.sim.simulator import SimOptions, rate_of, simulate
from fleetserve.workload import TraceRequest
from fleetserve.workload.transform import scale_rate


@dataclass(frozen=True)
class Probe:
    rate_rps: float
    slo_attainment: float
    summary: dict[str, Any] = field(repr=False, compare=False)

    @property
    def stopped_early(self) -> bool:
        return bool(self.summary.get("stopped_early"))


class UnreachableTarget(SimInputError):
    """Requests fail whatever the rate, so many that no rate meets the target."""


def load_independent_failures(summary: dict[str, Any]) -> dict[str, int]:
    return {reason: n for reason, n in summary["failures"].items() if reason in LOAD_INDEPENDENT_FAILURES}


def _unreachable(summary: dict[str, Any], target: float) -> UnreachableTarget | None:
    static = load_independent_failures(summary)
    total = summary["requests"]
    best = 1.0 - sum(static.values()) / total if total else 0.0
    if best >= target:
        return None
    reasons = "; ".join(
        f"{n} x {reason}: {FAILURE_REASONS.get(reason, reason)}" for reason, n in static.items()
    )
    return UnreachableTarget(
        f"SLO attainment can reach at most {best:.1%} at any rate, below the target {target:.0%}:"
        f" {sum(static.values())} of {total} requests fail whatever the load ({reasons}). Serve the model"
        " with a longer context (max_context in the catalog, or a model that has one), or cut the prompts:"
        " fleetserve workload convert TRACE --max-input N -o cut.jsonl"
    )


@dataclass(frozen=True)
class CapacityResult:
    capacity_rps: float  # 0.0 when even the lowest probed rate misses the target
    slo_attainment: float  # at capacity_rps
    target: float
    bounded: bool  # False when the highest probed rate still met the target
    probes: list[Probe]

    def to_json(self) -> dict[str, Any]:
        at_capacity = next((p.summary for p in self.probes if p.rate_rps == self.capacity_rps), {})
        return {
            "capacity_rps": self.capacity_rps,
            "slo_attainment": self.slo_attainment,
            "target": self.target,
            "bounded": self.bounded,
            "policy": at_capacity.get("policy"),
            "offered_rps": at_capacity.get("offered_rps"),
            "achieved_rps": at_capacity.get("achieved_rps"),
            "goodput_rps": at_capacity.get("goodput_rps"),
            "rate_windows": at_capacity.get("rate_windows"),
            "ttft_ms": at_capacity.get("ttft_ms"),
            "tpot_ms": at_capacity.get("tpot_ms"),
            "cost_per_million_tokens_usd": at_capacity.get("cost_per_million_tokens_usd"),
            "probes": [
                {"rate_rps": p.rate_rps, "slo_attainment": p.slo_attainment, "stopped_early": p.stopped_early}
                for p in self.probes
            ],
        }


def find_capacity(
    config: FleetConfig,
    trace: Sequence[TraceRequest],
    policy: str | None = None,
    *,
    target: float = 0.9,
    seed: int = 0,
    params: dict[str, Any] | None = None,
    options: SimOptions | None = None,
    tolerance: float = 0.02,
    max_probes: int = 20,
    on_probe: Callable[[Probe], None] | None = None,
) -> CapacityResult:
    """Bracket the capacity by doubling or halving from the trace's own rate, then bisect (geometrically)
    until the bracket is within `tolerance` (relative) or `max_probes` simulations have run."""
    if not 0 < target <= 1:
        raise SimInputError(f"target SLO attainment must be in (0, 1], got {target}")
    base_rate = rate_of(trace)
    if not math.isfinite(base_rate):
        raise SimInputError("capacity search needs a trace with at least two distinct arrival times")
    probes: list[Probe] = []
    full = options or SimOptions()
    hasty = dataclasses.replace(full, give_up_below=target)

    def probe(rate: float) -> bool:
        scaled = scale_rate(trace, rate / base_rate)
        first = not probes
        run_options = full if first else hasty
        summary = simulate(config, scaled, policy, seed, params=params, options=run_options).summary
        result = Probe(rate, summary["slo_attainment"], summary)
        probes.append(result)
        if on_probe is not None:
            on_probe(result)
        if first and (unreachable := _unreachable(summary, target)) is not None:
            raise unreachable
        return result.slo_attainment >= target

    low, high = bracket_rate(probe, base_rate, tolerance=tolerance, max_probes=max_probes)
    if low is None:
        return CapacityResult(0.0, 0.0, target, True, probes)
    attained = next(p.slo_attainment for p in probes if p.rate_rps == low)
    return CapacityResult(low, attained, target, high is not None, probes)


def bracket_rate(
    passes: Callable[[float], bool],
    start: float,
    *,
    tolerance: float,
    max_probes: int,
    lowest: float = 0.0,
    highest: float = math.inf,
) -> tuple[float | None, float | None]:
    """(the highest rate known to pass, the lowest known to fail) for a `passes` that holds below some
    rate: doubling or halving from `start` (never beyond `lowest`..`highest`), then geometric bisection
    until the two are within `tolerance` (relative) or `passes` has run `max_probes` times. None where
    no probe passed (or failed)."""
    low: float | None = None
    high: float | None = None
    probes = 0
    rate = start
    while probes < max_probes and (low is None or high is None):
        probes += 1
        if passes(rate):
            low = rate
            if rate >= highest:
                break
            rate = min(highest, rate * 2.0)
        else:
            high = rate
            if rate <= lowest:
                break
            rate = max(lowest, rate / 2.0)
    while low is not None and high is not None and high / low - 1 > tolerance and probes < max_probes:
        probes += 1
        middle = math.sqrt(low * high)
        if passes(middle):
            low = middle
        else:
            high = middle
    return low, high
