"""Migration live and in the twin, side by side: one bursty trace through `fleetserve serve` over
emulated engines (the gateway's migration loop, KV moved by the engines' export/import) and through the
simulator with the same fleet file, with and without migration (`benchmarks/twin_check.py` runs both
sides and keeps them comparable: time scale, prompts, intervals).

The fleet is small enough for this 2-core machine to emulate in real time: round robin over 2 x L4 and
1 x H100 (llama-3-8b), so the L4s queue while the H100 has room. Figures per side: TTFT p50 / p99, TPOT
p50 and the moves carried out.

    python benchmarks/migration_live.py                  # ~3 min
    python benchmarks/migration_live.py --requests 60 --no-write
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from common import publish, section_head
from twin_check import Figures, TwinSettings, check_twin

MIGRATIONS = ("none", "drain_time")


def p99(figures: Figures) -> float:
    values = figures.ttft_by_request_ms
    return float(np.percentile(values[~np.isnan(values)], 99))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=150)
    parser.add_argument("--rate", type=float, default=30.0, help="Model-time requests per second.")
    parser.add_argument("--time-scale", type=float, default=2.0)
    parser.add_argument("--no-write", action="store_true", help="Print only; leave docs/benchmarks.md alone.")
    args = parser.parse_args()
    runs = {}
    for migration in MIGRATIONS:
        settings = TwinSettings(
            requests=args.requests,
            rate=args.rate,
            time_scale=args.time_scale,
            output_tokens=(60, 240),
            fleet=(("l4", "l4", 2), ("h100", "h100-80g", 1)),
            migration=(("policy", migration), ("interval_s", 0.25)),
        )
        with tempfile.TemporaryDirectory() as work:
            (runs[migration],) = check_twin(["round_robin"], settings, Path(work), progress=print)
    lines = section_head(
        "Migration live and in the twin (2 x L4 + 1 x H100, round robin)", "migration_live.py"
    )
    lines += [
        f"- trace: {args.requests} requests, Poisson at {args.rate:g} req/s (model time), prompts 256-1536"
        " tokens, 70% after one of 6 shared 512-token prefixes, answers 60-240 tokens"
        f" (`twin_check.make_trace`); engines at time scale {args.time_scale:g}, latencies in model time",
        "",
        "| migration | side | TTFT p50 (ms) | TTFT p99 (ms) | TPOT p50 (ms) | completed | moves |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for migration, run in runs.items():
        for side, figures, moves in (
            ("live", run.live, run.live_migrations),
            ("twin", run.sim, run.sim_migrations),
        ):
            lines.append(
                f"| {migration} | {side} | {figures.ttft_ms:,.0f} | {p99(figures):,.0f}"
                f" | {figures.tpot_ms:.1f} | {figures.completed}/{figures.requests} | {sum(moves.values())} |"
            )
    none, moved = runs["none"], runs["drain_time"]
    lines += [
        "",
        f"- p99 TTFT, drain_time against none: live {p99(none.live) / p99(moved.live):.2f}x, twin"
        f" {p99(none.sim) / p99(moved.sim):.2f}x",
    ]
    publish("\n".join(lines) + "\n", not args.no_write)


if __name__ == "__main__":
    main()
