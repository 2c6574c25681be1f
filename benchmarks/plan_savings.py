"""What the GPU-mix planner saves: `fleetserve plan` on Azure's conversation and code traces, and on the
two mixed with long documents, at a few arrival rates. The plan's $/hour against the cheapest
homogeneous fleet that meets the same SLO target; both are checked in the simulator (the plan replays
the trace with its `planned` routing, each homogeneous fleet with least_request at the fewest replicas
that pass). Then the integer program's solve time with 3 and with 6 GPU types.

    python benchmarks/plan_savings.py                 # ~10 min the first time; profiles are cached
    python benchmarks/plan_savings.py --rates 20 --no-write
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from common import publish, section_head, shared_trace
from fleetserve.config import FleetConfig
from fleetserve.sim.planner import PlanOptions, PlanResult, plan_fleet
from fleetserve.sim.profiles import ProfileStore, default_profile_dir
from fleetserve.sim.simulator import rate_of
from fleetserve.workload import TraceRequest, read_trace
from fleetserve.workload.generators import UniformLengths, WorkloadSpec, generate
from fleetserve.workload.transform import scale_rate

MODEL = "llama-3-8b"
SLO = {"ttft_ms": 1000, "tpot_ms": 100}
MELANGE_GPUS = ("a10g", "a100-80g", "h100-80g")  # the GPU types of Mélange's evaluation
SIX_GPUS = ("a10g", "l4", "l40s", "a100-80g", "h100-80g", "h200")
DOCUMENT_SHARE = 0.15  # of the mixed trace's requests


def fleet(gpus: tuple[str, ...]) -> FleetConfig:
    return FleetConfig.model_validate(
        {"engines": [{"name": gpu, "model": MODEL, "gpu": gpu} for gpu in gpus], "slo": SLO}
    )


def at_rate(trace: list[TraceRequest], rate: float) -> list[TraceRequest]:
    return scale_rate(trace, rate / rate_of(trace))


def mixed(conv: list[TraceRequest], code: list[TraceRequest], seed: int) -> list[TraceRequest]:
    """Conversation and code interleaved at equal rates, plus long documents (3-7k-token prompts,
    50-300-token answers) as `DOCUMENT_SHARE` of all requests."""
    rate = rate_of(conv)
    share = (1 - DOCUMENT_SHARE) / 2
    count = int(len(conv) * DOCUMENT_SHARE / share)
    documents = generate(
        WorkloadSpec(rate * DOCUMENT_SHARE / share, num_requests=count,
                     input_lengths=UniformLengths(3000, 7000), output_lengths=UniformLengths(50, 300),
                     seed=seed)
    )  # fmt: skip
    merged = conv + at_rate(code[: len(conv)], rate) + documents
    return sorted(merged, key=lambda r: r.timestamp_ms)


def describe(result: PlanResult) -> dict:
    plan = result.to_json()
    best = min(
        ((gpu, b) for gpu, b in plan["baselines"].items() if b.get("meets_target")),
        key=lambda item: item[1]["usd_per_hour"],
        default=None,
    )
    return plan | {"best": best}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rates", default="10,40,100", help="Comma-separated mean arrival rates (req/s).")
    parser.add_argument("--requests", type=int, default=6000, help="Requests of each trace planned for.")
    parser.add_argument("--target", type=float, default=0.9)
    parser.add_argument("--profiles", type=Path, default=default_profile_dir())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-write", action="store_true", help="Print only; leave docs/benchmarks.md alone.")
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",") if r.strip()]
    conv = read_trace(shared_trace("azure_llm_2023_conv.csv"), "auto")[: args.requests]
    code = read_trace(shared_trace("azure_llm_2023_code.csv"), "auto")[: args.requests]
    workloads = {"conversation": conv, "code": code, "mixed + documents": mixed(conv, code, args.seed)}
    store = ProfileStore(args.profiles)
    options = PlanOptions(target=args.target, seed=args.seed)
    rows = []
    for name, trace in workloads.items():
        for rate in rates:
            started = time.perf_counter()
            result = plan_fleet(fleet(MELANGE_GPUS), at_rate(trace, rate), options=options, store=store,
                                clock=time.perf_counter)  # fmt: skip
            rows.append((name, rate, describe(result), time.perf_counter() - started))
            print(f"{name} at {rate:g} req/s: done in {rows[-1][3]:.0f} s", flush=True)
    solve_times = {}
    for gpus in (MELANGE_GPUS, SIX_GPUS):
        result = plan_fleet(fleet(gpus), at_rate(workloads["mixed + documents"], max(rates)),
                            options=dataclasses.replace(options, baselines=False, max_rounds=0), store=store,
                            clock=time.perf_counter)  # fmt: skip
        solve_times[len(gpus)] = (result.solve_s, len(result.demand), result.mix.usd_per_hour)

    lines = section_head(
        "GPU-mix planner: savings against the best homogeneous fleet (twin)", "plan_savings.py"
    )
    lines += [
        f"- model {MODEL}; SLO {SLO['ttft_ms']} ms TTFT, {SLO['tpot_ms']} ms TPOT, target {args.target:.0%};"
        f" GPU types {', '.join(MELANGE_GPUS)} (Mélange's); the first {args.requests} requests of each Azure"
        f" 2023 trace, rescaled to each rate; the mixed trace is conversation + code at equal rates plus"
        f" {DOCUMENT_SHARE:.0%} long documents (3-7k-token prompts)",
        "- plan: profiles per length bucket, Mélange's integer program (slice factor 4), then replays that"
        " add (where the engines missed the SLO) and trim (dearest type first) capacity; baselines: each"
        " GPU type alone, least_request, the fewest replicas meeting the target in the twin",
        "",
        "| trace | rate | plan | $/h | SLO | best homogeneous | $/h | SLO | savings | solver | wall |",
        "| --- | ---: | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, rate, plan, wall in rows:
        replicas = " + ".join(f"{n} {gpu}" for gpu, n in plan["replicas"].items())
        best = plan["best"]
        homogeneous = f"{best[1]['replicas']} {best[0]}" if best else "none meets it"
        savings = plan["savings_vs_best_homogeneous"]
        lines.append(
            f"| {name} | {rate:g} | {replicas} | {plan['usd_per_hour']:.2f} | {plan['slo_attainment']:.3f}"
            f" | {homogeneous} | {best[1]['usd_per_hour'] if best else 0:.2f}"
            f" | {best[1]['slo_attainment'] if best else 0:.3f}"
            f" | {'-' if savings is None else f'{savings:.1%}'} | {plan['solve_s']:.2f} s | {wall:.0f} s |"
        )
    lines.append("")
    for types, (seconds, buckets, usd) in solve_times.items():
        lines.append(
            f"- solve time with {types} GPU types ({buckets} buckets, mixed trace at {max(rates):g} req/s):"
            f" {seconds:.3f} s (mix ${usd:.2f}/h before replays)"
        )
    publish("\n".join(lines) + "\n", not args.no_write)


if __name__ == "__main__":
    main()
