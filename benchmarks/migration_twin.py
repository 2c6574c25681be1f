"""Migration in the twin: 4 x H100 + 4 x A100 + 8 x L4 (llama-3-8b) on a bursty multi-tenant trace.

For two routing policies (least_request, which weighs engines by capacity, and round_robin, which does
not), p99 TTFT and TPOT without migration, with Llumnix's freeness metric, and with `drain_time` (the
engine model's predicted time to drain, moves only when the request finishes sooner elsewhere). The
trace: `fleetserve workload gen` gamma arrivals (burstiness 0.2), 4 tenants (zipf 1), prompts
zipf:2048, answers zipf:800.

    python benchmarks/migration_twin.py              # ~2 min
    python benchmarks/migration_twin.py --duration 120 --no-write
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from common import publish, section_head

FLEETSERVE = Path(sys.executable).with_name("fleetserve")
FLEET = {
    "engines": [
        {"name": "h100", "gpu": "h100-80g", "model": "llama-3-8b", "replicas": 4},
        {"name": "a100", "gpu": "a100-80g", "model": "llama-3-8b", "replicas": 4},
        {"name": "l4", "gpu": "l4", "model": "llama-3-8b", "replicas": 8},
    ],
    "slo": {"ttft_ms": 2000, "tpot_ms": 100},
}
MIGRATIONS = ("none", "freeness", "drain_time")


def run(fleet: Path, trace: Path, policy: str, migration: str, out: Path) -> dict:
    argv = [str(FLEETSERVE), "sim", "-c", str(fleet), "--trace", str(trace), "--policy", policy]
    argv += ["--migration", migration, "--json", str(out), "-q"]
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--duration", type=float, default=300.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-write", action="store_true", help="Print only; leave docs/benchmarks.md alone.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        fleet, trace = work / "fleet.yaml", work / "trace.jsonl"
        fleet.write_text(yaml.safe_dump(FLEET))
        generate = [str(FLEETSERVE), "workload", "gen", "--rate", str(args.rate), "--burstiness", "0.2"]
        generate += ["--duration", str(args.duration), "--tenants", "4", "--tenant-zipf", "1.0"]
        generate += ["--input", "zipf:2048", "--output", "zipf:800", "--max-input", "8192"]
        generate += ["--max-output", "4096", "--seed", str(args.seed), "-o", str(trace)]
        subprocess.run(generate, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        results = {
            (policy, migration): run(fleet, trace, policy, migration, work / f"{policy}-{migration}.json")
            for policy in ("least_request", "round_robin")
            for migration in MIGRATIONS
        }
    lines = section_head("Migration in the twin (4 x H100 + 4 x A100 + 8 x L4)", "migration_twin.py")
    lines += [
        f"- trace: {args.rate:g} req/s for {args.duration:g} s, gamma burstiness 0.2, 4 tenants, prompts"
        " zipf:2048, answers zipf:800 (`fleetserve workload gen`); SLO 2 s TTFT, 100 ms TPOT",
        "",
        "| routing | migration | p99 TTFT (ms) | p99 TPOT (ms) | SLO attainment | moves | KV moved (GB)"
        " | p99 downtime (ms) | p99 TTFT vs none |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for (policy, migration), summary in results.items():
        base = results[(policy, "none")]["ttft_ms"]["p99"]
        moves = summary.get("migrations", {}).get("count", 0)
        downtime = summary.get("migration_downtime_ms", {}).get("p99", 0.0)
        lines.append(
            f"| {policy} | {migration} | {summary['ttft_ms']['p99']:,.0f} | {summary['tpot_ms']['p99']:,.0f}"
            f" | {summary['slo_attainment']:.3f} | {moves} | {summary.get('migrated_kv_gb', 0.0):.1f}"
            f" | {downtime:.1f} | {base / summary['ttft_ms']['p99']:.2f}x |"
        )
    publish("\n".join(lines) + "\n", not args.no_write)


if __name__ == "__main__":
    main()
