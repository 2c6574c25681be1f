"""Prefix index at fleet scale: 1 M blocks across 64 engines.

Measures the memory the index takes (tracemalloc and the process RSS delta; target < 500 MB) and the
lookup of an 8k-token prompt (target median < 200 µs), split into hashing the prompt's blocks
(`hash_prompt_blocks`, the engine model's chained hash) and walking the index, and both together.
Prints the figures and appends a section to docs/benchmarks.md.

    python benchmarks/prefix_index.py [--blocks 1000000] [--engines 64] [--lookups 300]
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import random
import statistics
import subprocess
import time
import tracemalloc
from pathlib import Path

from fleetserve.model.kvcache import hash_prompt_blocks
from fleetserve.routing.prefix_index import PrefixIndex

DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
BLOCK_SIZE = 16
PROMPT_TOKENS = 8192


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def prompt_chains(blocks: int, engines: int, rng: random.Random) -> list[tuple[str, list[int]]]:
    """Prompts as block-hash chains of 1..512 blocks (up to 8k tokens), a fifth of them also cached on a
    second engine, until `blocks` distinct blocks exist: the shape of a fleet's prefix caches."""
    chains = []
    made = 0
    while made < blocks:
        length = min(rng.randint(1, PROMPT_TOKENS // BLOCK_SIZE), blocks - made)
        chain = [rng.getrandbits(64) for _ in range(length)]
        made += length
        chains.append((f"engine-{rng.randrange(engines)}", chain))
        if rng.random() < 0.2:
            chains.append((f"engine-{rng.randrange(engines)}", chain))
    return chains


def build(chains: list[tuple[str, list[int]]], blocks: int) -> PrefixIndex:
    index = PrefixIndex(max_entries=blocks, max_bytes=2**40, ttl_s=1e9)  # nothing expires mid-build
    for engine, chain in chains:
        index.add(chain, engine, 0.0)
    return index


def median_us(samples: list[float]) -> float:
    return statistics.median(samples) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=1_000_000)
    parser.add_argument("--engines", type=int, default=64)
    parser.add_argument("--lookups", type=int, default=300)
    parser.add_argument("--no-docs", action="store_true", help="print only, do not append to the docs")
    args = parser.parse_args()
    rng = random.Random(1)
    chains = prompt_chains(args.blocks, args.engines, rng)

    gc.collect()
    rss_before = rss_bytes()
    started = time.perf_counter()
    index = build(chains, args.blocks)
    build_s = time.perf_counter() - started
    gc.collect()
    rss_delta = rss_bytes() - rss_before

    del index
    gc.collect()
    tracemalloc.start()
    index = build(chains, args.blocks)
    traced, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    stats = index.stats()

    # 8k-token prompts: the first 7.5k tokens are a cached chain's (a long shared prefix held by one or
    # two engines), so the walk goes deep before it stops, as a real cache hit does
    full = [chain for _, chain in chains if len(chain) >= PROMPT_TOKENS // BLOCK_SIZE - 32]
    hashing, walking, together = [], [], []
    for i in range(args.lookups):
        tokens = [rng.randrange(32_000) for _ in range(PROMPT_TOKENS)]
        start = time.perf_counter()
        hashes = hash_prompt_blocks(tokens, BLOCK_SIZE)
        hashed = time.perf_counter()
        cached = full[i % len(full)]
        hashes[: len(cached)] = cached[: len(hashes)]
        walk_start = time.perf_counter()
        matched = index.match(hashes)
        walked = time.perf_counter()
        hashing.append(hashed - start)
        walking.append(walked - walk_start)
        together.append((hashed - start) + (walked - walk_start))
        assert matched, "a cached prefix must match"

    figures = {
        "entries": stats.entries,
        "engines": stats.engines,
        "build_s": build_s,
        "tracemalloc_mb": traced / 2**20,
        "rss_delta_mb": rss_delta / 2**20,
        "hash_us": median_us(hashing),
        "walk_us": median_us(walking),
        "total_us": median_us(together),
        "walk_p99_us": sorted(walking)[int(0.99 * len(walking))] * 1e6,
    }
    report(args, figures)


def report(args: argparse.Namespace, figures: dict[str, float]) -> None:
    lines = [
        f"## Prefix index: {args.blocks:,} blocks across {args.engines} engines",
        "",
        f"- date: {subprocess.run(['date', '-u'], capture_output=True, text=True).stdout.strip()}",
        f"- machine: {os.cpu_count()} cores (nproc), {cpu_model()}, Python {platform.python_version()}",
        f"- command: `python benchmarks/prefix_index.py --blocks {args.blocks} --engines {args.engines} "
        f"--lookups {args.lookups}`",
        f"- index: {figures['entries']:,.0f} entries, {figures['engines']:.0f} engines, built in "
        f"{figures['build_s']:.1f} s; lookups of {PROMPT_TOKENS}-token prompts ({PROMPT_TOKENS // BLOCK_SIZE}"
        " blocks) whose first ~7.5k tokens are cached; medians",
        "",
        "| measure | value | target |",
        "|---|---|---|",
        f"| memory, tracemalloc | {figures['tracemalloc_mb']:.0f} MB | < 500 MB |",
        f"| memory, RSS delta | {figures['rss_delta_mb']:.0f} MB | < 500 MB |",
        f"| hash 8k-token prompt (`hash_prompt_blocks`) | {figures['hash_us']:.0f} µs | |",
        f"| index walk (`PrefixIndex.match`) | {figures['walk_us']:.0f} µs "
        f"(p99 {figures['walk_p99_us']:.0f}) | |",
        f"| hash + walk | {figures['total_us']:.0f} µs | < 200 µs |",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_docs:
        with DOCS.open("a") as docs:
            docs.write("\n" + text)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    main()
