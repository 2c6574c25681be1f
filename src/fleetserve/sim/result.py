"""What a simulation run returns, and the JSON object every `sim` command writes.

The summary's keys are a stable interface (scripts and the twin check read them): requests, completed,
failed, failures, ttft_ms / tpot_ms / itl_ms / e2e_ms (p50, p90, p99, mean), slo_attainment,
offered_rps, achieved_rps, goodput_rps (each rate's window is in rate_windows), throughput_tok_s,
prefix_hit_rate, preemptions, cost_usd, cost_per_million_tokens_usd,
duration_s, wall_s, sim_requests_per_s, per_engine, policy, fleet, slo, latency_quantiles,
load_over_time.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fleetserve.config import FleetConfig
from fleetserve.control import EngineEvent
from fleetserve.sim.fleet import SimEngine, SimFleet
from fleetserve.sim.metrics import SLO, RequestArrays, RequestMetrics, latency_stats_ms
from fleetserve.tenants import ANONYMOUS, jain_index

QUANTILE_POINTS = 101  # 0%, 1%, ..., 100%: enough to draw a CDF in the report


@dataclass
class LoadSeries:
    """Per-engine in-flight requests, requests waiting in the engine's queue, and KV usage, sampled over
    simulated time. An engine that joined during the run has no samples before it joined and none
    after it left (None in the JSON)."""

    engine_ids: list[str]
    times: list[float] = field(default_factory=list)
    in_flight: list[list[int | None]] = field(default_factory=list)  # one row per sample
    waiting: list[list[int | None]] = field(default_factory=list)
    kv_usage: list[list[float | None]] = field(default_factory=list)

    def sample(self, now: float, engines: Sequence[SimEngine]) -> None:
        self.times.append(now)
        if all(engine.state is EngineEvent.READY for engine in engines):
            self.in_flight.append([engine.in_flight for engine in engines])
            self.waiting.append([engine.view.waiting for engine in engines])
            self.kv_usage.append([round(engine.view.kv_usage, 4) for engine in engines])
            return
        # a starting or gone engine serves nothing: None, so it does not count as idle
        present = [engine.state in (EngineEvent.READY, EngineEvent.DRAINING) for engine in engines]
        self.in_flight.append([e.in_flight if p else None for e, p in zip(engines, present, strict=True)])
        self.waiting.append([e.view.waiting if p else None for e, p in zip(engines, present, strict=True)])
        self.kv_usage.append(
            [round(e.view.kv_usage, 4) if p else None for e, p in zip(engines, present, strict=True)]
        )

    def idle_while_queued(self) -> int:
        """Samples in which one engine had nothing to do while another had requests waiting in its queue
        (engines of one model: the simulated fleets here serve one model per run)."""
        return sum(
            1
            for in_flight, waiting in zip(self.in_flight, self.waiting, strict=True)
            if 0 in in_flight and any(waiting)
        )

    def _per_engine(self, rows: list[list[Any]]) -> dict[str, list[Any]]:
        """engine id -> its column; rows sampled before an engine joined are shorter than the last."""
        return {
            eid: [row[i] if i < len(row) else None for row in rows] for i, eid in enumerate(self.engine_ids)
        }

    def to_json(self, start: float) -> dict[str, Any]:
        return {
            "t_s": [round(t - start, 4) for t in self.times],
            "in_flight": self._per_engine(self.in_flight),
            "waiting": self._per_engine(self.waiting),
            "idle_while_queued_samples": self.idle_while_queued(),
            "kv_usage": self._per_engine(self.kv_usage),
        }


def arrival_rate_over_time(arrival: np.ndarray, start: float, bins: int = 60) -> dict[str, list[float]]:
    """Arrivals per second in `bins` equal spans from the first arrival to the last (span midpoints in
    seconds after `start`)."""
    arrived = arrival[~np.isnan(arrival)]
    if not arrived.size:
        return {"t_s": [], "rps": []}
    counts, edges = np.histogram(arrived, bins=bins)
    width = max(float(edges[1] - edges[0]), 1e-9)
    middles = (edges[:-1] + edges[1:]) / 2 - start
    return {"t_s": [round(float(t), 3) for t in middles], "rps": [float(c) / width for c in counts]}


# what each rate of the summary counts, over which span of simulated time
RATE_WINDOWS = {
    "offered_rps": "arrivals / (last arrival - first arrival): the rate the trace asks for",
    "achieved_rps": "completed requests / duration_s (first arrival to last completion, the drain included)",
    "goodput_rps": "requests that met the SLO / duration_s (first arrival to last completion)",
    "throughput_tok_s": "output tokens of completed requests / duration_s",
}


@dataclass
class SimResult:
    """`summary` is the JSON object; `requests` holds per-request arrays (arrival, first token, finish in
    simulated seconds, token counts, engine index; NaN finish = failed) in the trace's arrival order,
    for scripts such as the twin check that want more than the summary."""

    summary: dict[str, Any]
    requests: RequestArrays

    def __getitem__(self, key: str) -> Any:
        return self.summary[key]


def build_result(
    *,
    config: FleetConfig,
    policy: str,
    fleet: SimFleet,
    metrics: RequestMetrics,
    slo: SLO,
    start: float,
    end: float,
    load: LoadSeries,
    wall_s: float,
    offered_rps: float,
    tenants: Sequence[str | None] = (),
    weights: Mapping[str, float] | None = None,
) -> SimResult:
    """`offered_rps` is the trace's arrival rate (requests over the first-to-last-arrival span);
    `tenants` names each trace request's tenant (None: anonymous), `weights` their VTC weights."""
    arrays = metrics.arrays()
    total = int(arrays.arrival.size)
    done = arrays.completed
    completed = int(done.sum())
    duration = max(end - start, 0.0)
    met = arrays.slo_met(slo)
    output_tokens = int(arrays.output_tokens[done].sum())
    prompt_tokens = int(arrays.prompt_tokens[done].sum())
    cached_tokens = int(arrays.cached_tokens[done].sum())
    alive = {engine.index: _alive_s(engine, start, end) for engine in fleet.engines}
    cost = sum(engine.usd_per_hour * alive[engine.index] for engine in fleet.engines) / 3600.0
    processed_tokens = prompt_tokens + output_tokens
    ttft, tpot, e2e = arrays.ttft(), arrays.tpot(), arrays.e2e()
    per_engine = {
        engine.engine_id: _engine_summary(engine, arrays, met, alive[engine.index], start)
        for engine in fleet.engines
    }
    summary: dict[str, Any] = {
        "policy": policy,
        "fleet": _fleet_summary(config, fleet),
        "slo": {"ttft_ms": config.slo.ttft_ms, "tpot_ms": config.slo.tpot_ms},
        "requests": total,
        "completed": completed,
        "failed": total - completed,
        "failures": dict(sorted(metrics.failures.items())),
        "duration_s": duration,
        "offered_rps": offered_rps if math.isfinite(offered_rps) else None,
        "achieved_rps": completed / duration if duration > 0 else 0.0,
        "ttft_ms": latency_stats_ms(ttft),
        "tpot_ms": latency_stats_ms(tpot),
        "itl_ms": metrics.itl.summary_ms(),
        "e2e_ms": latency_stats_ms(e2e),
        "slo_attainment": float(met.sum() / total) if total else 0.0,
        "goodput_rps": float(met.sum() / duration) if duration > 0 else 0.0,
        "throughput_tok_s": output_tokens / duration if duration > 0 else 0.0,
        "prefix_hit_rate": cached_tokens / prompt_tokens if prompt_tokens else 0.0,
        "preemptions": sum(engine.model.metrics.num_preemptions for engine in fleet.engines),
        "rate_windows": RATE_WINDOWS,
        "cost_usd": cost,
        # every engine for the time it was part of the fleet (replicas that came and went included)
        "engine_seconds": sum(alive.values()),
        "gpu_hours": sum(alive[engine.index] * engine.group.tp for engine in fleet.engines) / 3600.0,
        "cost_per_million_tokens_usd": cost / processed_tokens * 1e6 if processed_tokens else None,
        "wall_s": wall_s,
        "sim_requests_per_s": total / wall_s if wall_s > 0 else None,
        "per_engine": per_engine,
        "latency_quantiles": {
            "ttft_ms": _quantiles_ms(ttft),
            "e2e_ms": _quantiles_ms(e2e),
        },
        "load_over_time": load.to_json(start),
    }
    if any(tenant is not None for tenant in tenants):
        summary["per_tenant"], summary["jain_fairness"] = _tenant_summary(
            tenants, arrays, metrics.failure_reason, duration, weights or {}
        )
    return SimResult(summary, arrays)


# the failure reasons the gateway answers with 429: quotas and a fair-queue wait that ran out
TOO_MANY_REQUESTS = frozenset({"quota", "quota_too_large", "queue_timeout"})


def _tenant_summary(
    tenants: Sequence[str | None],
    arrays: RequestArrays,
    failure_reason: Mapping[int, str],
    duration: float,
    weights: Mapping[str, float],
) -> tuple[dict[str, Any], float]:
    """Per tenant: requests, what it got served, TTFT, its 429s and other failures; and Jain's index
    over the tenants' service (prompt tokens + 2 x output tokens, VTC's measure) divided by weight."""
    names = np.asarray([ANONYMOUS if tenant is None else tenant for tenant in tenants], dtype=object)
    done = arrays.completed
    ttft = arrays.first_token - arrays.arrival
    out: dict[str, Any] = {}
    service: list[float] = []
    for name in sorted(set(names.tolist())):
        mine = names == name
        served = mine & done
        prompt = int(arrays.prompt_tokens[served].sum())
        output = int(arrays.output_tokens[served].sum())
        reasons = Counter(failure_reason[i] for i in np.flatnonzero(mine).tolist() if i in failure_reason)
        tenant_service = prompt + 2 * output
        service.append(tenant_service / weights.get(name, 1.0))
        out[name] = {
            "requests": int(mine.sum()),
            "completed": int(served.sum()),
            "throughput_tok_s": output / duration if duration > 0 else 0.0,
            "service_tokens": tenant_service,
            "ttft_ms": latency_stats_ms(ttft[served]),
            "rejected_429": sum(count for reason, count in reasons.items() if reason in TOO_MANY_REQUESTS),
            "failures": dict(sorted(reasons.items())),
        }
    return out, jain_index(service)


def _alive_s(engine: SimEngine, start: float, end: float) -> float:
    """Seconds the engine was part of the fleet (paid for) during the run."""
    joined = start if engine.joined_at is None else engine.joined_at
    left = end if engine.left_at is None else engine.left_at
    return max(left - joined, 0.0)


def _engine_summary(
    engine: SimEngine, arrays: RequestArrays, met: np.ndarray, alive_s: float, start: float
) -> dict[str, Any]:
    """`alive_s`: the seconds it was part of the fleet, which its utilisation and cost are over; the
    times it joined and left are seconds after `start` (None: there from the start, or to the end)."""
    mine = arrays.engine == engine.index
    done = mine & arrays.completed
    prompt = int(arrays.prompt_tokens[done].sum())
    engine_metrics = engine.model.metrics
    return {
        "gpu": engine.group.gpu,
        "model": engine.group.model,
        "tp": engine.group.tp,
        "requests": engine.dispatched,
        "completed": int(done.sum()),
        "slo_attainment": float(met[mine].sum() / mine.sum()) if mine.any() else None,
        "utilization": engine.busy_time / alive_s if alive_s > 0 else 0.0,
        "output_tokens": int(arrays.output_tokens[done].sum()),
        "prefix_hit_rate": int(arrays.cached_tokens[done].sum()) / prompt if prompt else 0.0,
        "preemptions": engine_metrics.num_preemptions,
        "capacity": engine.view.capacity,
        "cost_usd": engine.usd_per_hour * alive_s / 3600.0,
        "joined_s": None if engine.joined_at is None else engine.joined_at - start,
        "left_s": None if engine.left_at is None else engine.left_at - start,
    }


def _fleet_summary(config: FleetConfig, fleet: SimFleet) -> dict[str, Any]:
    return {
        "engines": len(fleet.engines),
        "groups": [
            {"name": g.name, "model": g.model, "gpu": g.gpu, "tp": g.tp, "replicas": g.replicas}
            for g in config.engines
        ],
        "skipped": fleet.skipped,
        "usd_per_hour": sum(engine.usd_per_hour for engine in fleet.engines if engine.joined_at is None),
    }


def _quantiles_ms(seconds: np.ndarray) -> list[float]:
    if seconds.size == 0:
        return []
    return [round(float(v), 3) for v in np.quantile(seconds, np.linspace(0, 1, QUANTILE_POINTS)) * 1000.0]
