"""Autoscaling over a day, in the twin: a diurnal trace (peak-to-trough 6:1, gamma-bursty arrivals, a
day compressed into `--period` seconds) on llama-3-8b. For `kpa` and `apa` (AIBrix's semantics and
defaults; one autoscaled group of one GPU type, two targets), for `planned` (the GPU-mix planner over
the last 180 s of traffic sizes an L4, an A100 and an H100 group together, routed by the `planned`
policy) and for the cheapest static fleet that meets the same SLO target over the whole day (found by
search in the twin: the fewest replicas of each GPU type alone, and the mix `fleetserve plan` finds):
SLO attainment, GPU-hours, dollars, cold starts and scale events.

    python benchmarks/autoscale_day.py                  # ~6 min (profiles cached after the first run)
    python benchmarks/autoscale_day.py --period 1800 --no-write
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from common import publish, section_head
from fleetserve.autoscale.mix import LengthBuckets
from fleetserve.config import FleetConfig
from fleetserve.sim import SimOptions, simulate
from fleetserve.sim.planner import PlanOptions, bucket_demand, fewest_passing, plan_fleet
from fleetserve.sim.profiles import ProfileStore, default_profile_dir, planned_options
from fleetserve.workload import TraceRequest
from fleetserve.workload.generators import WorkloadSpec, ZipfLengths, generate

MODEL = "llama-3-8b"
GPUS = ("l4", "a100-80g", "h100-80g")
SLO = {"ttft_ms": 2000, "tpot_ms": 100}
MAX_REPLICAS = 40
AUTOSCALED_GPUS = ("l4", "a100-80g")
TARGETS = (8.0, 16.0)  # requests in flight per replica: AIBrix leaves the target to the user
HEADROOMS = (0.8, 0.9)  # planned: each replica planned at this fraction of its profiled rate


def fleet(gpu: str, replicas: int, autoscale: dict[str, Any] | None = None) -> FleetConfig:
    group: dict[str, Any] = {"name": gpu, "gpu": gpu, "model": MODEL, "replicas": replicas}
    if autoscale is not None:
        group["autoscale"] = autoscale
    return FleetConfig.model_validate({"engines": [group], "slo": SLO})


def cheapest_static(trace: list[TraceRequest], gpu: str, target: float) -> tuple[int, dict] | None:
    """The fewest replicas of `gpu` that meet `target` over the trace (None: not even MAX_REPLICAS)."""
    summaries: dict[int, dict] = {}

    def passes(replicas: int) -> bool:
        summaries[replicas] = simulate(fleet(gpu, replicas), trace).summary
        return summaries[replicas]["slo_attainment"] >= target

    fewest = fewest_passing(passes, 1, MAX_REPLICAS)
    return None if fewest is None else (fewest, summaries[fewest])


def planned_fleet(headroom: float) -> FleetConfig:
    """Every GPU type a planned group (from nothing but one A100), routed by the plan."""
    groups = [
        {
            "name": gpu, "gpu": gpu, "model": MODEL, "replicas": 1 if gpu == "a100-80g" else 0,
            "autoscale": {"policy": "planned", "min_replicas": 0, "max_replicas": MAX_REPLICAS,
                          "plan_headroom": headroom},
        }
        for gpu in GPUS
    ]  # fmt: skip
    return FleetConfig.model_validate({"engines": groups, "slo": SLO, "router": {"policy": "planned"}})


def planned_static(trace: list[TraceRequest], target: float, store: ProfileStore) -> tuple[str, dict]:
    """The static mix `fleetserve plan` finds for the whole day, replayed."""
    config = FleetConfig.model_validate(
        {"engines": [{"name": gpu, "gpu": gpu, "model": MODEL} for gpu in GPUS], "slo": SLO}
    )
    result = plan_fleet(
        config, trace, options=PlanOptions(target=target, baselines=False), store=store,
        clock=time.perf_counter,
    )  # fmt: skip
    mix = " + ".join(f"{count} x {name}" for name, count in result.to_json()["replicas"].items() if count)
    return f"static {mix} (fleetserve plan)", simulate(result.config, trace).summary


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=float, default=8.0, help="Mean requests per second over the day.")
    parser.add_argument("--period", type=float, default=3600.0, help="Seconds of the compressed day.")
    parser.add_argument("--target", type=float, default=0.9, help="SLO attainment to meet.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-write", action="store_true", help="Print only; leave docs/benchmarks.md alone.")
    args = parser.parse_args()
    trace = generate(
        WorkloadSpec(
            args.rate, duration_s=args.period, arrival="gamma", burstiness=0.5, diurnal=6.0,
            period_s=args.period, input_lengths=ZipfLengths(1024), output_lengths=ZipfLengths(256),
            max_input_length=6000, max_output_length=2048, seed=args.seed,
        )
    )  # fmt: skip
    rows = []
    statics = {gpu: cheapest_static(trace, gpu, args.target) for gpu in GPUS}
    for gpu, found in statics.items():
        if found is not None:
            replicas, summary = found
            rows.append((f"static {replicas} x {gpu}", summary))
    store = ProfileStore(default_profile_dir())
    rows.append(planned_static(trace, args.target, store))
    seen = bucket_demand(trace, LengthBuckets())
    for headroom in HEADROOMS:
        config = planned_fleet(headroom)
        options = SimOptions(planned_options=planned_options(config, seen, store))
        summary = simulate(config, trace, options=options).summary
        rows.append((f"planned on {' + '.join(GPUS)}, headroom {headroom:g}", summary))
    for gpu in AUTOSCALED_GPUS:
        for policy in ("kpa", "apa"):
            for target in TARGETS:
                autoscale = {
                    "policy": policy, "min_replicas": 1, "max_replicas": MAX_REPLICAS,
                    "metric": "in_flight", "target": target,
                }  # fmt: skip
                summary = simulate(fleet(gpu, 1, autoscale), trace).summary
                rows.append((f"{policy} on {gpu}, target {target:g}", summary))
    cheapest = min(
        (
            summary["cost_usd"]
            for label, summary in rows
            if label.startswith("static") and summary["slo_attainment"] >= args.target
        ),
        default=None,
    )
    lines = section_head("Autoscaling over a compressed day (twin, llama-3-8b)", "autoscale_day.py")
    lines += [
        f"- trace: {len(trace)} requests over {args.period:g} s, mean {args.rate:g} req/s, diurnal 6:1"
        " (trough at 0, peak at half the period), gamma burstiness 0.5, prompts zipf:1024, answers"
        f" zipf:256; SLO {SLO['ttft_ms']} ms TTFT, {SLO['tpot_ms']} ms TPOT, target {args.target:.0%}",
        "- autoscalers: kpa and apa on metric in_flight (requests in flight per replica), targets"
        f" {', '.join(f'{t:g}' for t in TARGETS)}, AIBrix's windows (stable 180 s, panic 60 s), scale-down"
        " cooldown 300 s, from 1 replica; planned: the GPU-mix planner over the last 180 s of traffic,"
        " re-planned every 180 s, from 1 A100; cold starts are the engine model's (weights over the GPU's"
        " weight-load bandwidth plus a fixed engine start)",
        "",
        "| fleet | SLO attainment | GPU-hours | dollars | vs cheapest static | cold starts | scale events |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, summary in rows:
        ratio = f"{summary['cost_usd'] / cheapest:.2f}x" if cheapest else "-"
        lines.append(
            f"| {label} | {summary['slo_attainment']:.3f} | {summary['gpu_hours']:.2f}"
            f" | {summary['cost_usd']:.2f} | {ratio} | {summary.get('cold_starts', 0)}"
            f" | {len(summary.get('scale_events', []))} |"
        )
    publish("\n".join(lines) + "\n", not args.no_write)


if __name__ == "__main__":
    main()
