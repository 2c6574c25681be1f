"""Cost of one routing decision, for every registered policy, at fleet scale.

64 engines of one model and a warm prefix index of 1 M blocks (handed to the policies as the fleet's
precise index, so the cache-aware ones walk it); requests are 2k-token prompts whose block hashes are
computed beforehand (hashing is measured by benchmarks/prefix_index.py), half of them sharing a cached
prefix. Each decision is timed alone; the policy's dispatch and finish hooks run untimed after it so its
bookkeeping stays at a steady state. Prints median and p99 µs per policy and appends them to
docs/benchmarks.md.

    python benchmarks/routing_decision.py [--decisions 3000] [--engines 64] [--blocks 1000000]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import subprocess
import time
from pathlib import Path

from common import cpu_model
from fleetserve.routing import POLICIES, EngineView, FleetView, RejectRequest, RequestInfo, make_policy
from fleetserve.routing.prefix_index import PrefixIndex

DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
BLOCK_SIZE = 16
PROMPT_BLOCKS = 128  # 2k tokens


def engines(count: int, rng: random.Random) -> dict[str, EngineView]:
    views = {}
    for i in range(count):
        engine_id = f"engine-{i}"
        views[engine_id] = EngineView(
            engine_id=engine_id,
            model="llama-3-8b",
            gpu="h100-80g" if i % 2 else "l4",
            adapters=frozenset({"adapter-a", "adapter-b"}) if i % 4 == 0 else frozenset(),
            in_flight=rng.randrange(0, 40),
            running=rng.randrange(0, 32),
            waiting=rng.randrange(0, 8),
            kv_usage=rng.random(),
            capacity=3.0 if i % 2 else 1.0,
            max_loras=4,
            num_gpu_blocks=30_000,
            block_size=BLOCK_SIZE,
            predictor=lambda prompt_len, cached: 0.05 + (prompt_len - cached) * 2e-5,
        )
    return views


def warm_index(blocks: int, engine_ids: list[str], rng: random.Random) -> tuple[PrefixIndex, list[list[int]]]:
    index = PrefixIndex(max_entries=blocks, max_bytes=2**40, ttl_s=1e9)  # nothing expires mid-run
    chains = []
    made = 0
    while made < blocks:
        chain = [rng.getrandbits(64) for _ in range(min(PROMPT_BLOCKS, blocks - made))]
        made += len(chain)
        index.add(chain, rng.choice(engine_ids), 0.0)
        chains.append(chain)
    return index, chains


def requests(count: int, chains: list[list[int]], rng: random.Random) -> list[RequestInfo]:
    made = []
    for i in range(count):
        if i % 2:
            hashes = [*rng.choice(chains)[: PROMPT_BLOCKS - 16], *(rng.getrandbits(64) for _ in range(16))]
        else:
            hashes = [rng.getrandbits(64) for _ in range(PROMPT_BLOCKS)]
        made.append(
            RequestInfo(
                request_id=str(i),
                model="llama-3-8b",
                prompt_len=PROMPT_BLOCKS * BLOCK_SIZE + 7,
                max_output_tokens=256,
                prompt_token_ids=None,
                block_hashes=hashes,
                tenant=f"tenant-{i % 8}",
                session=f"session-{i % 100}",
                ttft_slo_ms=1000.0,
                tpot_slo_ms=100.0,
                arrival_time=i * 0.01,
            )
        )
    return made


def measure(name: str, view: FleetView, batch: list[RequestInfo]) -> tuple[float, float, dict[str, int]]:
    policy = make_policy(name, {}, seed=1)
    timings = []
    reasons: dict[str, int] = {}
    for request in batch:
        now = request.arrival_time
        started = time.perf_counter()
        try:
            decision = policy.choose(request, view, now)
        except RejectRequest:
            timings.append(time.perf_counter() - started)
            reasons["rejected"] = reasons.get("rejected", 0) + 1
            continue
        timings.append(time.perf_counter() - started)
        reasons[decision.reason] = reasons.get(decision.reason, 0) + 1
        policy.on_dispatch(request, decision.engine_id, now)
        policy.on_first_token(request, decision.engine_id, now + 0.05)
        policy.on_finish(request, decision.engine_id, now + 0.5)
    timings.sort()
    return statistics.median(timings) * 1e6, timings[int(0.99 * len(timings))] * 1e6, reasons


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decisions", type=int, default=3000)
    parser.add_argument("--engines", type=int, default=64)
    parser.add_argument("--blocks", type=int, default=1_000_000)
    parser.add_argument("--no-docs", action="store_true", help="print only, do not append to the docs")
    args = parser.parse_args()
    rng = random.Random(7)
    views = engines(args.engines, rng)
    index, chains = warm_index(args.blocks, list(views), rng)
    view = FleetView(views, prefix_index=index)
    rows = []
    for name in sorted(POLICIES):
        # every policy sees the same requests, hashes already filled in, cache index warm
        batch = requests(args.decisions, chains, random.Random(11))
        try:
            median, p99, reasons = measure(name, view, batch)
        except Exception as error:  # a policy that cannot run here is reported, not hidden
            rows.append(f"| {name} | failed: {type(error).__name__}: {error} | | |")
            continue
        top = ", ".join(
            f"{reason} {count}" for reason, count in sorted(reasons.items(), key=lambda r: -r[1])[:3]
        )
        rows.append(f"| {name} | {median:.1f} | {p99:.1f} | {top} |")
    report(args, len(index), rows)


def report(args: argparse.Namespace, entries: int, rows: list[str]) -> None:
    lines = [
        f"## Routing decision cost: {args.engines} engines, warm index of {entries:,} blocks",
        "",
        f"- date: {subprocess.run(['date', '-u'], capture_output=True, text=True).stdout.strip()}",
        f"- machine: {os.cpu_count()} cores (nproc), {cpu_model()}, Python {platform.python_version()}",
        f"- command: `python benchmarks/routing_decision.py --decisions {args.decisions} "
        f"--engines {args.engines} --blocks {args.blocks}`",
        f"- {args.decisions} decisions per policy, default parameters; 2k-token prompts with precomputed "
        "block hashes (hashing excluded), half sharing a cached 1.75k-token prefix; `choose` alone is timed",
        "",
        "| policy | median µs | p99 µs | most frequent reasons |",
        "|---|---|---|---|",
        *rows,
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_docs:
        with DOCS.open("a") as docs:
            docs.write("\n" + text)


if __name__ == "__main__":
    main()
