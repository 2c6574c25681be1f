"""How long `fleetserve sim capacity` takes, against another checkout of fleetserve, side by side.

    python benchmarks/capacity_search.py --baseline OLD_CHECKOUT [--policies least_request,prefix_aware]

The workload is the multi-tenant, multi-turn one the README uses, made with `fleetserve workload gen`
(about 3,000 requests, 2,048-token system prompts per tenant), on the 16 engines of
`examples/hetero-fleet.yaml`. Each policy's capacity search runs once with this checkout's code and once
with the baseline's (its `src/` put first on PYTHONPATH), alternating, `--repeats` times; the medians of
the wall times, the capacities and the number of probes are printed and appended to docs/benchmarks.md.
It also times single probes at 2x and 4x the capacity found, with and without stopping a probe once the
target is out of reach (this checkout's `SimOptions.give_up_below`), in this process; and, when the
shared data is there, a search that cannot succeed (the raw Mooncake conversation trace, half of whose
prompts exceed llama-3-8b's context) with both checkouts, the baseline's cut off at `--unreachable-limit`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import cpu_model, record, shared_trace

ROOT = Path(__file__).resolve().parent.parent
FLEETSERVE = Path(sys.executable).with_name("fleetserve")
FLEET = ROOT / "examples" / "hetero-fleet.yaml"
WORKLOAD = " ".join(
    [
        "--rate 5 --duration 1000 --sessions 4 --tenants 8",
        "--system-prompt 2048 --max-input 6144 --max-output 1024",
    ]
)


def search(trace: Path, policy: str, src: Path | None) -> tuple[float, dict]:
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = str(src)
    argv = [str(FLEETSERVE), "sim", "capacity", "-c", str(FLEET), "--trace", str(trace), "--policy", policy]
    started = time.perf_counter()
    done = subprocess.run([*argv, "--json", "--quiet"], capture_output=True, text=True, env=env, check=False)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{done.stderr}")
    return elapsed, json.loads(done.stdout.strip().splitlines()[-1])


def unreachable_row(baseline: Path, limit_s: float) -> list[str]:
    """Wall time of the capacity search on the raw Mooncake trace, baseline (cut at `limit_s`) and this."""
    trace = shared_trace("mooncake_conversation.jsonl")
    if not trace.is_file():
        return []
    cells = []
    for src in (baseline / "src", None):
        env = dict(os.environ, **({"PYTHONPATH": str(src)} if src is not None else {}))
        argv = [str(FLEETSERVE), "sim", "capacity", "-c", str(FLEET), "--trace", str(trace), "--quiet"]
        started = time.perf_counter()
        try:
            done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=limit_s, check=False)
        except subprocess.TimeoutExpired:
            cells.append(f"over {limit_s:.0f} s (stopped)")
            continue
        elapsed = time.perf_counter() - started
        outcome = "says no rate can meet it" if "at any rate" in done.stderr else f"exit {done.returncode}"
        cells.append(f"{elapsed:.1f} s, {outcome}")
    return [
        "",
        "| capacity search on the raw Mooncake trace (53.7% at best) | baseline | this checkout |",
        "|---|---|---|",
        f"| prefix_aware default policy, target 90% | {cells[0]} | {cells[1]} |",
    ]


def overload_rows(trace_path: Path, capacity_rps: float) -> list[str]:
    from fleetserve.config import load_fleet
    from fleetserve.sim import SimOptions, simulate
    from fleetserve.sim.simulator import rate_of
    from fleetserve.workload import read_trace
    from fleetserve.workload.transform import scale_rate

    trace, config = read_trace(trace_path), load_fleet(FLEET)
    rows = []
    for factor in (2, 4):
        scaled = scale_rate(trace, factor * capacity_rps / rate_of(trace))
        seconds = []
        for options in (SimOptions(), SimOptions(give_up_below=0.9)):
            started = time.perf_counter()
            simulate(config, scaled, "prefix_aware", 0, options=options)
            seconds.append(time.perf_counter() - started)
        rows.append(
            f"| {factor}x capacity | {seconds[0]:.2f} s | {seconds[1]:.2f} s |"
            f" {seconds[0] / seconds[1]:.1f}x |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--baseline", type=Path, required=True, help="Checkout of the code to compare with.")
    parser.add_argument("--policies", default="least_request,prefix_aware")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--unreachable-limit", type=float, default=360.0, help="Seconds the baseline gets.")
    parser.add_argument("--no-append", action="store_true", help="Do not append to docs/benchmarks.md.")
    args = parser.parse_args()
    trace = Path(tempfile.mkdtemp(prefix="fleetserve-capacity-")) / "chat.jsonl"
    subprocess.run(
        [str(FLEETSERVE), "workload", "gen", *WORKLOAD.split(), "-o", str(trace)],
        check=True,
        capture_output=True,
    )
    requests = sum(1 for _ in trace.open())
    rows = []
    for policy in args.policies.split(","):
        times: dict[str, list[float]] = {"baseline": [], "this": []}
        results: dict[str, dict] = {}
        for _ in range(args.repeats):
            for label, src in (("baseline", args.baseline / "src"), ("this", None)):
                elapsed, result = search(trace, policy, src)
                times[label].append(elapsed)
                results[label] = result
                print(
                    f"{policy} {label}: {elapsed:.1f} s, capacity {result['capacity_rps']:.2f} req/s",
                    flush=True,
                )
        base, this = statistics.median(times["baseline"]), statistics.median(times["this"])
        results_capacity = results["this"]["capacity_rps"]
        rows.append(
            f"| {policy} | {base:.1f} s ({len(results['baseline']['probes'])} probes,"
            f" {results['baseline']['capacity_rps']:.2f} req/s) | {this:.1f} s"
            f" ({len(results['this']['probes'])} probes, {results['this']['capacity_rps']:.2f} req/s) |"
            f" {base / this:.1f}x |"
        )
    rows += [
        "",
        "| probe (prefix_aware) | whole run | stopped once out of reach | speed-up |",
        "|---|---|---|---|",
    ]
    rows += overload_rows(trace, results_capacity)
    rows += unreachable_row(args.baseline, args.unreachable_limit)
    text = "\n".join(
        [
            f"## Capacity search speed ({datetime.date.today().isoformat()})",
            "",
            f"`python benchmarks/capacity_search.py --baseline OLD --repeats {args.repeats}`"
            f" on {cpu_model()}:"
            f" `fleetserve sim capacity` on `workload gen {WORKLOAD}` ({requests} requests),"
            " examples/hetero-fleet.yaml (16 engines), medians of wall time.",
            "",
            "| policy | baseline | this checkout | speed-up |",
            "|---|---|---|---|",
            *rows,
            "",
        ]
    )
    print(text)
    if not args.no_append:
        record(text)


if __name__ == "__main__":
    main()
