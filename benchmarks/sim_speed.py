"""How fast the simulator replays a large trace on one core.

1,000,000 requests with the Azure LLM 2023 conversation trace's length mix (input and output lengths
sampled jointly from ../shared/data/traces/azure_llm_2023_conv.csv, Azure Public Dataset, CC-BY-4.0),
Poisson arrivals, on 64 heterogeneous engines serving llama-3-8b (16 H100, 24 A100, 24 L4), routed by
least_request. The rate is a fraction (--load) of the fleet's reference decode capacity divided by the mean
output length, which keeps every engine busy without overloading it.

    .venv/bin/python benchmarks/sim_speed.py                 # the full run, appended to docs/benchmarks.md
    .venv/bin/python benchmarks/sim_speed.py -n 50000 --profile   # where the time goes
"""

from __future__ import annotations

import argparse
import cProfile
import csv
import os
import platform
import pstats
import subprocess
import time
from pathlib import Path

import numpy as np

from common import shared_trace
from fleetserve.config import FleetConfig
from fleetserve.model.catalog import default_catalog
from fleetserve.model.cost import CostModel
from fleetserve.sim import SimOptions, simulate
from fleetserve.workload import TraceRequest

REPO = Path(__file__).resolve().parent.parent
AZURE_CONV = shared_trace("azure_llm_2023_conv.csv")
MODEL = "llama-3-8b"
FLEET_SHAPE = {"h100-80g": 16, "a100-80g": 24, "l4": 24}


def fleet_config(prefix_caching: bool) -> FleetConfig:
    args = {"enable_prefix_caching": prefix_caching}
    groups = [
        {"name": gpu.split("-")[0], "gpu": gpu, "model": MODEL, "replicas": replicas, "engine_args": args}
        for gpu, replicas in FLEET_SHAPE.items()
    ]
    return FleetConfig.model_validate({"engines": groups, "router": {"policy": "least_request"}})


def azure_lengths() -> np.ndarray:
    with open(AZURE_CONV, newline="") as handle:
        rows = [(int(r["ContextTokens"]), int(r["GeneratedTokens"])) for r in csv.DictReader(handle)]
    return np.array([row for row in rows if row[0] > 0 and row[1] > 0], dtype=np.int64)


def poisson_trace(count: int, rate: float, lengths: np.ndarray, seed: int) -> list[TraceRequest]:
    rng = np.random.default_rng(seed)
    times_ms = np.cumsum(rng.exponential(1000.0 / rate, count))
    picks = lengths[rng.integers(0, len(lengths), count)]
    return [
        TraceRequest(timestamp_ms=float(t), input_length=int(i), output_length=int(o))
        for t, (i, o) in zip(times_ms, picks, strict=True)
    ]


def fleet_rate(load: float, mean_output: float) -> float:
    catalog = default_catalog()
    tokens_per_s = sum(
        CostModel(catalog.gpu(gpu), catalog.model(MODEL)).capacity_tokens_per_s * replicas
        for gpu, replicas in FLEET_SHAPE.items()
    )
    return load * tokens_per_s / mean_output


def machine() -> str:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")
    return f"{os.cpu_count()} cores (nproc), {cpu}, Python {platform.python_version()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--requests", type=int, default=1_000_000)
    parser.add_argument("--load", type=float, default=0.5, help="Fraction of reference decode capacity.")
    parser.add_argument("--sync-interval", type=float, default=None, help="Default: the fleet file's.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-prefix-caching",
        action="store_true",
        help="Engines without prefix caching (the Azure trace has no shared prefixes to find anyway).",
    )
    parser.add_argument("--repeat", type=int, default=1, help="Runs; the figures are their medians.")
    parser.add_argument("--profile", action="store_true", help="cProfile one run; print the top 25.")
    parser.add_argument("--no-append", action="store_true", help="Do not append to docs/benchmarks.md.")
    parser.add_argument(
        "--note",
        action="append",
        default=[],
        help="A line to add to the appended section (e.g. the figure before a change); repeatable.",
    )
    args = parser.parse_args()

    lengths = azure_lengths()
    rate = fleet_rate(args.load, float(lengths[:, 1].mean()))
    trace = poisson_trace(args.requests, rate, lengths, args.seed)
    config = fleet_config(not args.no_prefix_caching)
    options = SimOptions(sync_interval_s=args.sync_interval)
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        simulate(config, trace, "least_request", args.seed, options=options)
        profiler.disable()
        stats = pstats.Stats(profiler)
        stats.sort_stats("tottime").print_stats(25)
        print_breakdown(stats)
        return
    walls, cpus = [], []
    for _ in range(args.repeat):
        started, started_cpu = time.perf_counter(), time.process_time()
        result = simulate(config, trace, "least_request", args.seed, options=options)
        walls.append(time.perf_counter() - started)
        cpus.append(time.process_time() - started_cpu)
    wall, cpu = float(np.median(walls)), float(np.median(cpus))
    s = result.summary
    utilization = np.median([engine["utilization"] for engine in s["per_engine"].values()])
    lines = [
        f"requests {s['requests']:,} at {rate:.1f} req/s on 64 engines ({s['duration_s']:.0f} s simulated)",
        f"wall {wall:.1f} s (CPU {cpu:.1f} s), median of {args.repeat} -> "
        f"{s['requests'] / wall:,.0f} simulated requests/s",
        f"SLO attainment {s['slo_attainment']:.1%}, median engine utilisation {utilization:.1%}, "
        f"TTFT p50 {s['ttft_ms']['p50']:.0f} ms p99 {s['ttft_ms']['p99']:.0f} ms, "
        f"TPOT p50 {s['tpot_ms']['p50']:.1f} ms, preemptions {s['preemptions']}, failed {s['failed']}",
    ]
    print("\n".join(lines))
    if not args.no_append:
        append_section(args, lines + args.note)


# (file suffix, function name) -> the part of the system the time belongs to; cumulative times, so
# these must not nest in one another
PARTS = {
    ("model/engine.py", "advance"): "engine model: advance",
    ("model/engine.py", "add_request"): "engine model: add_request",
    ("routing/simple.py", "choose"): "routing policy: choose",
    ("sim/prompts.py", "tokens"): "prompt tokens (workload)",
}


def print_breakdown(stats: pstats.Stats) -> None:
    """Share of the profiled time by part: engine model, policy, prompts, and the simulator's own loop."""
    total = stats.total_tt  # type: ignore[attr-defined]
    parts: dict[str, float] = {}
    for (filename, _, name), (_, _, _, cumulative, _) in stats.stats.items():  # type: ignore[attr-defined]
        for (suffix, function), part in PARTS.items():
            if name == function and filename.endswith(suffix):
                parts[part] = parts.get(part, 0.0) + cumulative
    parts["simulator loop and metrics (the rest)"] = total - sum(parts.values())
    print("where the time goes (cProfile, cumulative):")
    for part, seconds in sorted(parts.items(), key=lambda item: -item[1]):
        print(f"  {part:40s} {seconds:7.2f} s  {seconds / total:6.1%}")


def append_section(args: argparse.Namespace, lines: list[str]) -> None:
    date = subprocess.run(["date", "-u"], capture_output=True, text=True, check=True).stdout.strip()
    command = f".venv/bin/python benchmarks/sim_speed.py -n {args.requests} --load {args.load}"
    command += f" --repeat {args.repeat}"
    if args.sync_interval is not None:
        command += f" --sync-interval {args.sync_interval}"
    if args.no_prefix_caching:
        command += " --no-prefix-caching"
    section = (
        f"\n## Simulator speed ({date})\n\n"
        f"- machine: {machine()}\n- command: `{command}`\n"
        f"- workload: Azure LLM 2023 conversation length mix (Azure Public Dataset, CC-BY-4.0), Poisson "
        f"arrivals, llama-3-8b on 16 H100 + 24 A100 + 24 L4, least_request, one process\n"
        + "".join(f"- {line}\n" for line in lines)
    )
    docs = REPO / "docs" / "benchmarks.md"
    docs.parent.mkdir(exist_ok=True)
    if not docs.exists():
        docs.write_text("# Benchmarks\n\nEvery figure here is produced by the command shown with it.\n")
    with docs.open("a") as handle:
        handle.write(section)


if __name__ == "__main__":
    main()
