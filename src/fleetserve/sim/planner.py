"""The GPU-mix planner: the cheapest fleet of the allowed GPU types that meets the SLO target on a
trace, checked in the simulator before it is answered.

1. The trace is cut into length buckets (`LengthBuckets`); each bucket's demand is its mean rate.
2. Each allowed GPU type gets a profile per bucket (`profiles.py`, cached on disk).
3. `solve_mix` (Mélange's integer program, pure) picks replica counts and the routes.
4. The planned fleet, routed by the `planned` policy with those routes, replays the trace. While its
   SLO attainment is under the target, replicas are added to the GPU type whose engines missed the SLO
   most, in proportion to the shortfall, and the replay runs again (at most `max_rounds` times).
5. Baselines: each GPU type alone, with the fleet file's routing policy, at the fewest replicas that
   meet the target in the simulator (a search that starts at the profiles' estimate).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fleetserve.autoscale.mix import (
    Bucket,
    GpuOption,
    LengthBuckets,
    MixPlan,
    NoFeasibleMix,
    option_name,
    replicas_for,
    solve_mix,
)
from fleetserve.config import EngineGroup, FleetConfig, RouterConfig
from fleetserve.model.catalog import Catalog, UnknownEntry, default_catalog
from fleetserve.sim.errors import SimInputError
from fleetserve.sim.profiles import ProfileRequest, ProfileStore, profile_capacities
from fleetserve.sim.simulator import SimOptions, rate_of, simulate
from fleetserve.workload import TraceRequest
from fleetserve.workload.transform import scale_rate

MAX_BASELINE_REPLICAS = 256


@dataclass(frozen=True)
class PlanOptions:
    target: float = 0.9
    slice_factor: int = 4
    buckets: LengthBuckets = field(default_factory=LengthBuckets)
    max_rounds: int = 8  # replays that may add capacity after the first
    seed: int = 0
    baselines: bool = True


@dataclass
class Replay:
    """One simulated check of a fleet."""

    replicas: dict[str, int]
    slo_attainment: float
    usd_per_hour: float
    config: FleetConfig = field(repr=False)
    summary: dict[str, Any] = field(repr=False)


@dataclass
class PlanResult:
    config: FleetConfig  # the planned fleet file
    mix: MixPlan  # the integer program's answer, before capacity was added
    replays: list[Replay]  # the planned fleet's replays, the last one is the answer
    demand: dict[str, float]
    capacities: dict[str, dict[str, float]]
    baselines: dict[str, dict[str, Any]]
    solve_s: float
    profiles_measured: int
    profiles_cached: int
    notes: list[str]
    target: float

    @property
    def final(self) -> Replay:
        return self.replays[-1]

    def savings_vs_best_homogeneous(self) -> float | None:
        costs = [b["usd_per_hour"] for b in self.baselines.values() if b.get("meets_target")]
        if not costs:
            return None
        return 1.0 - self.final.usd_per_hour / min(costs)

    def to_json(self) -> dict[str, Any]:
        final = self.final
        return {
            "replicas": {name: n for name, n in final.replicas.items() if n},
            "usd_per_hour": round(final.usd_per_hour, 4),
            "slo_attainment": final.slo_attainment,
            "meets_target": final.slo_attainment >= self.target,
            "target": self.target,
            "solver": {
                "replicas": {name: n for name, n in self.mix.replicas.items() if n},
                "usd_per_hour": round(self.mix.usd_per_hour, 4),
                "utilisation": {name: round(u, 3) for name, u in self.mix.utilisation.items() if u},
            },
            "adjustments": [
                {"replicas": r.replicas, "slo_attainment": r.slo_attainment, "usd_per_hour": r.usd_per_hour}
                for r in self.replays
            ],
            "baselines": self.baselines,
            "savings_vs_best_homogeneous": self.savings_vs_best_homogeneous(),
            "routes": self.mix.routes,
            "demand_rps": self.demand,
            "capacities_rps": self.capacities,
            "solve_s": self.solve_s,
            "profiles": {"measured": self.profiles_measured, "cached": self.profiles_cached},
            "ttft_ms": final.summary.get("ttft_ms"),
            "tpot_ms": final.summary.get("tpot_ms"),
            "notes": self.notes,
        }


def allowed_groups(config: FleetConfig, gpus: Sequence[str] | None, catalog: Catalog) -> list[EngineGroup]:
    """The fleet file's groups that name a GPU, one per GPU type and TP degree; with `gpus`, one per
    named GPU (a GPU no group names gets a copy of the first group on that GPU)."""
    groups = [group for group in config.engines if group.gpu is not None]
    if not groups:
        raise SimInputError("the plan needs engine groups that name a gpu (emulated engines)")
    models = {group.model for group in groups}
    if len(models) > 1:
        raise SimInputError(f"the plan sizes a fleet of one model; the fleet file has {sorted(models)}")
    chosen: dict[str, EngineGroup] = {}
    if gpus:
        for gpu in gpus:
            try:
                spec = catalog.gpu(gpu)
            except UnknownEntry as exc:
                raise SimInputError(f"--gpus: {exc}") from None
            same = next((g for g in groups if catalog.gpu(g.gpu or "").name == spec.name), None)
            group = same or groups[0].model_copy(update={"name": spec.name, "gpu": spec.name, "port": None})
            chosen.setdefault(option_name(spec.name, group.tp), group)
    else:
        for group in groups:
            name = _option_of(group, catalog)
            if name in chosen:
                raise SimInputError(
                    f"engine groups {chosen[name].name} and {group.name} are both {name}: the plan needs"
                    " one group per GPU type and TP degree"
                )
            chosen[name] = group
    return [group.model_copy(update={"autoscale": None}) for group in chosen.values()]


def bucket_demand(trace: Sequence[TraceRequest], buckets: LengthBuckets) -> dict[Bucket, float]:
    """Each bucket the trace has requests in -> their mean rate (requests/s) over the trace's span."""
    span_s = len(trace) / rate_of(trace)
    counts: dict[Bucket, int] = {}
    for request in trace:
        bucket = buckets.bucket_of(request.input_length, request.output_length)
        counts[bucket] = counts.get(bucket, 0) + 1
    return {bucket: n / span_s for bucket, n in sorted(counts.items(), key=lambda item: item[0].key)}


def plan_fleet(
    config: FleetConfig,
    trace: Sequence[TraceRequest],
    *,
    gpus: Sequence[str] | None = None,
    rate_rps: float | None = None,
    options: PlanOptions | None = None,
    store: ProfileStore | None = None,
    clock: Callable[[], float],
    on_step: Callable[[str], None] | None = None,
) -> PlanResult:
    """Plan, verify and (bounded) repair a fleet for `trace`; `clock` times the solver."""
    options = options or PlanOptions()
    store = store or ProfileStore(None)
    catalog = default_catalog()
    say = on_step or (lambda _: None)
    base_rate = rate_of(trace)
    if not math.isfinite(base_rate):
        raise SimInputError("the plan needs a trace with at least two distinct arrival times")
    if rate_rps is not None:
        trace = scale_rate(trace, rate_rps / base_rate)
    groups = allowed_groups(config, gpus, catalog)
    by_bucket = bucket_demand(trace, options.buckets)
    demand = {bucket.key: rate for bucket, rate in by_bucket.items()}
    say(f"{len(trace)} requests at {rate_of(trace):.2f} req/s in {len(demand)} length buckets")

    requests = [
        ProfileRequest(group, bucket, config.slo, options.target) for group in groups for bucket in by_bucket
    ]
    cached_before = store.hits

    def measured(request: ProfileRequest, value: float, cached: bool) -> None:
        if not cached:
            say(f"profiled {request.option} on {request.bucket.key}: {value:.3f} req/s")

    capacities = profile_capacities(requests, store, catalog, measured)
    notes: list[str] = []
    demand = _servable(demand, capacities, len(trace) / rate_of(trace), options.target, notes)
    by_name = {_option_of(g, catalog): g for g in groups}
    gpu_options = [
        GpuOption(name, catalog.gpu(group.gpu or "").usd_per_hour * group.tp, capacities.get(name, {}))
        for name, group in by_name.items()
    ]
    started = clock()
    mix = solve_mix(demand, gpu_options, slice_factor=options.slice_factor)
    solve_s = clock() - started
    say(f"solved in {solve_s:.2f} s: {_counts(mix.replicas)} at ${mix.usd_per_hour:.2f}/h")

    def replay_of(counts: dict[str, int]) -> Replay:
        planned = planned_config(config, by_name, counts, mix, capacities, options)
        return _replay(planned, trace, options.seed, catalog)

    def serves_every_bucket(counts: dict[str, int]) -> bool:
        return all(any(counts.get(n) and capacities[n].get(key) for n in by_name) for key in demand)

    replays = _repair(replay_of, dict(mix.replicas), options, notes, say)
    if replays[-1].slo_attainment >= options.target:
        replays += _trim(replay_of, serves_every_bucket, replays[-1], by_name, catalog, options, notes, say)
    baselines: dict[str, dict[str, Any]] = {}
    if options.baselines:
        homogeneous: list[Replay] = []
        for name, group in by_name.items():
            baselines[name], passing = _baseline(
                config, group, gpu_options, demand, trace, options, catalog, say
            )
            homogeneous += [passing] if passing is not None else []
        cheapest = min(homogeneous, key=lambda r: r.usd_per_hour, default=None)
        final = replays[-1]
        if cheapest is not None and (
            final.slo_attainment < options.target or cheapest.usd_per_hour < final.usd_per_hour
        ):
            notes.append(
                f"one GPU type alone ({_counts(cheapest.replicas)}, ${cheapest.usd_per_hour:.2f}/h) met the"
                f" target for less than the mix (${final.usd_per_hour:.2f}/h, {final.slo_attainment:.1%}):"
                " the answer is that fleet"
            )
            replays.append(cheapest)
    return PlanResult(
        replays[-1].config, mix, replays, demand, capacities, baselines, solve_s,
        profiles_measured=store.measured, profiles_cached=store.hits - cached_before, notes=notes,
        target=options.target,
    )  # fmt: skip


def _repair(
    replay_of: Callable[[dict[str, int]], Replay],
    replicas: dict[str, int],
    options: PlanOptions,
    notes: list[str],
    say: Callable[[str], None],
) -> list[Replay]:
    """Replay the plan; while it misses the target, add replicas where the engines missed the SLO most."""
    replays: list[Replay] = []
    for round_ in range(options.max_rounds + 1):
        replay = replay_of(replicas)
        replays.append(replay)
        say(f"replay {round_ + 1}: {_counts(replicas)} meets the SLO for {replay.slo_attainment:.1%}")
        if replay.slo_attainment >= options.target:
            break
        short = _shortest_option(replay, replicas, options.target)
        if short is None or round_ == options.max_rounds:
            notes.append(
                f"the plan reaches {replay.slo_attainment:.1%} after {round_ + 1} replays, below the target"
                f" {options.target:.0%}"
            )
            break
        name, added = short
        replicas = replicas | {name: replicas[name] + added}
        notes.append(
            f"replay {round_ + 1} met the SLO for {replay.slo_attainment:.1%}: added {added} x {name},"
            " whose engines missed it most"
        )
    return replays


def _trim(
    replay_of: Callable[[dict[str, int]], Replay],
    allowed: Callable[[dict[str, int]], bool],
    passing: Replay,
    groups: dict[str, EngineGroup],
    catalog: Catalog,
    options: PlanOptions,
    notes: list[str],
    say: Callable[[str], None],
) -> list[Replay]:
    """Take replicas away, the most expensive type first, while the replay still meets the target (the
    profiles and the repair both round up), never below a fleet that still serves every bucket; at most
    2 x `max_rounds` replays. The replays that kept the target."""
    price = {name: catalog.gpu(group.gpu or "").usd_per_hour * group.tp for name, group in groups.items()}
    kept: list[Replay] = []
    current = passing
    budget = 2 * options.max_rounds
    progress = True
    while progress and budget > 0:
        progress = False
        for name in sorted((n for n, c in current.replicas.items() if c), key=lambda n: -price[n]):
            count = current.replicas.get(name, 0)
            # the whole type first (its routes go to the others), then one replica
            for removed in dict.fromkeys((count, 1)):
                fewer = current.replicas | {name: count - removed}
                if budget <= 0 or not count or not allowed(fewer):
                    continue
                trial = replay_of(fewer)
                budget -= 1
                if trial.slo_attainment >= options.target:
                    say(f"trimmed {removed} x {name}: {_counts(fewer)} meets the SLO for"
                        f" {trial.slo_attainment:.1%}")  # fmt: skip
                    kept_at = f"{trial.slo_attainment:.1%}"
                    notes.append(f"removed {removed} x {name}: the replay still met the SLO for {kept_at}")
                    kept.append(trial)
                    current = trial
                    progress = True
                    break
    return kept


def _servable(
    demand: dict[str, float],
    capacities: dict[str, dict[str, float]],
    span_s: float,
    target: float,
    notes: list[str],
) -> dict[str, float]:
    """The buckets some allowed GPU type serves within the SLO. The others' requests miss it on any
    fleet of these types (a prompt too long for the model, or too long to prefill in time): they are
    left out of the program with a note, unless they alone put the target out of reach."""
    served = {k: r for k, r in demand.items() if any(c.get(k, 0.0) > 0 for c in capacities.values())}
    left = sorted(set(demand) - set(served))
    if not left:
        return demand
    share = sum(demand[k] for k in left) / sum(demand.values())
    summary = f"{round(sum(demand[k] for k in left) * span_s)} requests ({share:.2%}) in {', '.join(left)}"
    if share > 1 - target:
        raise NoFeasibleMix(
            f"no allowed GPU type serves {summary} within the SLO, which puts the target {target:.0%} out of"
            " reach: allow a faster GPU or a higher TP degree, loosen the SLO, or lower the target"
        )
    notes.append(f"no allowed GPU type serves {summary} within the SLO: they count as misses on every fleet")
    return served


def planned_config(
    config: FleetConfig,
    groups: dict[str, EngineGroup],
    replicas: dict[str, int],
    mix: MixPlan,
    capacities: dict[str, dict[str, float]],
    options: PlanOptions,
) -> FleetConfig:
    """The fleet file's settings with the planned engine groups and the `planned` routing policy."""
    engines = [
        group.model_copy(update={"replicas": replicas[name]})
        for name, group in groups.items()
        if replicas.get(name)
    ]
    router = RouterConfig(
        policy="planned",
        params={
            "routes": routes_for(replicas, mix, capacities),
            "capacities": {
                key: {name: capacities[name][key] for name in groups if capacities[name].get(key)}
                for key in mix.routes
            },
            "input_edges": list(options.buckets.input_edges),
            "output_edges": list(options.buckets.output_edges),
            "ttft_slo_ms": config.slo.ttft_ms,
        },
        allow_policy_header=config.router.allow_policy_header,
        debug_header=config.router.debug_header,
    )
    return config.model_copy(update={"engines": engines, "router": router})


def routes_for(
    replicas: dict[str, int], mix: MixPlan, capacities: dict[str, dict[str, float]]
) -> dict[str, dict[str, float]]:
    """The mix's routes for other replica counts (after a repair or a trim): each type's share of a
    bucket grows or shrinks with its replicas, so its load per replica stays as planned. A bucket left
    with none of its planned types goes to the remaining types that serve it, by capacity."""
    routes: dict[str, dict[str, float]] = {}
    for key, row in mix.routes.items():
        shares = {
            name: rate * replicas[name] / mix.replicas[name]
            for name, rate in row.items()
            if replicas.get(name) and mix.replicas.get(name)
        }
        if not shares:
            shares = {
                name: by_bucket.get(key, 0.0) * count
                for name, by_bucket in capacities.items()
                if (count := replicas.get(name, 0)) and by_bucket.get(key)
            }
        total = sum(shares.values())
        demand = sum(row.values())
        routes[key] = (
            {name: round(share / total * demand, 6) for name, share in shares.items()} if total else {}
        )
    return routes


def _replay(config: FleetConfig, trace: Sequence[TraceRequest], seed: int, catalog: Catalog) -> Replay:
    summary = simulate(config, trace, seed=seed, options=SimOptions(load_samples=0)).summary
    replicas: dict[str, int] = {}
    for group in config.engines:
        name = _option_of(group, catalog)
        replicas[name] = replicas.get(name, 0) + group.replicas
    return Replay(replicas, summary["slo_attainment"], summary["fleet"]["usd_per_hour"], config, summary)


def _shortest_option(replay: Replay, replicas: dict[str, int], target: float) -> tuple[str, int] | None:
    """The GPU type whose engines missed the SLO for the most requests, and how many replicas to add:
    its share of the fleet's shortfall, at least one."""
    misses: dict[str, float] = {}
    for engine in replay.summary["per_engine"].values():
        name = option_name(engine["gpu"], engine["tp"])
        misses[name] = misses.get(name, 0.0) + engine["requests"] * (1.0 - engine["slo_attainment"])
    if not misses or max(misses.values()) <= 0:
        return None
    name = max(misses, key=lambda n: misses[n])
    shortfall = target - replay.slo_attainment
    return name, max(1, math.ceil(replicas.get(name, 0) * shortfall))


def _baseline(
    config: FleetConfig,
    group: EngineGroup,
    gpu_options: list[GpuOption],
    demand: dict[str, float],
    trace: Sequence[TraceRequest],
    options: PlanOptions,
    catalog: Catalog,
    say: Callable[[str], None],
) -> tuple[dict[str, Any], Replay | None]:
    """The fewest replicas of one GPU type that meet the target in the simulator, and their replay."""
    name = _option_of(group, catalog)
    option = next(o for o in gpu_options if o.name == name)
    # buckets this type cannot serve in time miss the SLO here; the replay says whether the rest carry
    # the target anyway
    servable = {key: rate for key, rate in demand.items() if option.capacity_rps.get(key, 0.0) > 0}
    missed = 1.0 - sum(servable.values()) / sum(demand.values())
    if missed > 1.0 - options.target:
        return {
            "meets_target": False,
            "why": f"serves {missed:.1%} of the requests too slowly for the SLO at any load",
        }, None
    estimate = replicas_for(servable, option)
    # one GPU type has no plan to follow: the fleet file's policy routes it, unless that is `planned`
    homogeneous_router = (
        RouterConfig(policy="least_request") if config.router.policy == "planned" else config.router
    )
    results: dict[int, Replay] = {}

    def meets(count: int) -> bool:
        if count not in results:
            fleet = config.model_copy(
                update={
                    "engines": [group.model_copy(update={"replicas": count})],
                    "router": homogeneous_router,
                }
            )
            results[count] = _replay(fleet, trace, options.seed, catalog)
        return results[count].slo_attainment >= options.target

    fewest = fewest_passing(meets, max(1, estimate), MAX_BASELINE_REPLICAS)
    if fewest is None:
        best = max(results.values(), key=lambda r: r.slo_attainment)
        return {
            "meets_target": False,
            "why": f"{MAX_BASELINE_REPLICAS} replicas reach {best.slo_attainment:.1%}",
        }, None
    replay = results[fewest]
    say(f"baseline {name}: {fewest} replicas meet the SLO for {replay.slo_attainment:.1%}")
    return {
        "replicas": fewest,
        "usd_per_hour": round(replay.usd_per_hour, 4),
        "slo_attainment": replay.slo_attainment,
        "meets_target": True,
        "estimate": estimate,
        "policy": homogeneous_router.policy,
    }, replay


def fewest_passing(passes: Callable[[int], bool], start: int, most: int) -> int | None:
    """The smallest n in 1..most with passes(n), for a monotone `passes`: gallop from `start` down or
    up, then bisect. None when even `most` fails."""
    start = min(start, most)
    if passes(start):
        low, high, step = 0, start, 1  # low fails (0 replicas serve nothing), high passes
        while high - step >= 1:
            if not passes(high - step):
                low = high - step
                break
            high -= step
            step *= 2
    else:
        low, step = start, 1
        while True:
            high = min(most, low + step)
            if passes(high):
                break
            if high == most:
                return None
            low, step = high, step * 2
    while high - low > 1:
        middle = (low + high) // 2
        if passes(middle):
            high = middle
        else:
            low = middle
    return high


def _option_of(group: EngineGroup, catalog: Catalog) -> str:
    """The group's kind of replica as plans name it (the catalog's GPU name, so aliases agree)."""
    return option_name(catalog.gpu(group.gpu or "").name, group.tp)


def _counts(replicas: dict[str, int]) -> str:
    return ", ".join(f"{n} x {name}" for name, n in replicas.items() if n) or "nothing"
