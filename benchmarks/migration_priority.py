"""Migration that makes room for urgent requests, in the twin: batch work (priority 10, long prompts and
answers) and interactive requests (priority 0, short) on 2 x L4 + 1 x H100 (llama-3-8b) whose engines
schedule by priority. Without migration an urgent request that does not fit in an engine's free KV
waits for batch requests to finish; with it, the controller moves batch decodes out of its way (reason
`priority`) to engines with room. Figures: the interactive requests' p50/p99 TTFT, the batch requests'
p99 TTFT and TPOT, and the moves, for no migration and for each controller policy.

    python benchmarks/migration_priority.py              # ~1 min
    python benchmarks/migration_priority.py --no-write
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np

from common import publish, section_head
from fleetserve.config import FleetConfig
from fleetserve.sim import simulate
from fleetserve.workload import TraceRequest
from fleetserve.workload.generators import WorkloadSpec, ZipfLengths, generate

ENGINE_ARGS = {"scheduling_policy": "priority"}
FLEET = {
    "engines": [
        {"name": "h100", "gpu": "h100-80g", "model": "llama-3-8b", "replicas": 1, "engine_args": ENGINE_ARGS},
        {"name": "l4", "gpu": "l4", "model": "llama-3-8b", "replicas": 2, "engine_args": ENGINE_ARGS},
    ],
}
# (label, the fleet file's migration block)
MIGRATIONS = (
    ("none", {"policy": "none"}),
    ("drain_time, no room-making", {"policy": "drain_time", "make_room": False}),
    ("drain_time", {"policy": "drain_time"}),
    ("freeness", {"policy": "freeness"}),
)
URGENT, BATCH = 0, 10  # the engines' convention (vLLM's): lower is more urgent


def workload(rate: float, duration_s: float, seed: int) -> list[TraceRequest]:
    batch = generate(
        WorkloadSpec(
            rate * 0.7, duration_s=duration_s, seed=seed,
            input_lengths=ZipfLengths(3000), output_lengths=ZipfLengths(600),
            max_input_length=6000, max_output_length=2048,
        )
    )  # fmt: skip
    interactive = generate(
        WorkloadSpec(
            rate * 0.3, duration_s=duration_s, seed=seed + 1,
            input_lengths=ZipfLengths(400), output_lengths=ZipfLengths(100),
            max_input_length=2048, max_output_length=512,
        )
    )  # fmt: skip
    mixed = [dataclasses.replace(r, priority=BATCH) for r in batch]
    mixed += [dataclasses.replace(r, priority=URGENT) for r in interactive]
    return sorted(mixed, key=lambda request: request.timestamp_ms)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=float, default=6.0)
    parser.add_argument("--duration", type=float, default=300.0)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--routing", default="round_robin", help="The routing policy (default round_robin).")
    parser.add_argument("--no-write", action="store_true", help="Print only; leave docs/benchmarks.md alone.")
    args = parser.parse_args()
    trace = workload(args.rate, args.duration, args.seed)
    urgent = np.array([request.priority == URGENT for request in trace])
    rows = []
    for migration, block in MIGRATIONS:
        document = {**FLEET, "router": {"policy": args.routing}, "migration": block}
        result = simulate(FleetConfig.model_validate(document), trace, seed=args.seed)
        arrays = result.requests
        done = arrays.completed
        ttft = (arrays.first_token - arrays.arrival) * 1000.0
        decode = np.maximum(arrays.output_tokens - 1, 1)
        tpot = (arrays.finish - arrays.first_token) / decode * 1000.0
        moves = result.summary.get("migrations", {}).get("by_reason", {})
        rows.append(
            (
                migration,
                np.percentile(ttft[done & urgent], 50),
                np.percentile(ttft[done & urgent], 99),
                np.percentile(ttft[done & ~urgent], 99),
                np.percentile(tpot[done & ~urgent], 99),
                int(done.sum()),
                moves,
            )
        )
    base = rows[0][2]
    lines = section_head(
        "Migration that makes room for urgent requests (twin, 2 x L4 + 1 x H100)", "migration_priority.py"
    )
    lines += [
        f"- trace: {args.rate:g} req/s for {args.duration:g} s: 70% batch (priority {BATCH}, prompts"
        f" zipf:3000, answers zipf:600), 30% interactive (priority {URGENT}, zipf:400 / zipf:100);"
        f" engines schedule by priority; {args.routing} routing; {len(trace)} requests",
        "",
        "| migration | interactive p50 TTFT (ms) | interactive p99 TTFT (ms) | batch p99 TTFT (ms)"
        " | batch p99 TPOT (ms) | completed | moves by reason | interactive p99 vs none |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for migration, p50, p99, batch_ttft, batch_tpot, completed, moves in rows:
        reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(moves.items())) or "-"
        lines.append(
            f"| {migration} | {p50:,.0f} | {p99:,.0f} | {batch_ttft:,.0f} | {batch_tpot:,.0f} | {completed}"
            f" | {reasons} | {base / p99:.2f}x |"
        )
    publish("\n".join(lines) + "\n", not args.no_write)


if __name__ == "__main__":
    main()
