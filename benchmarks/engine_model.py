"""How fast the engine model runs: stepwise iterations, skip-ahead decode iterations, whole requests.

    python benchmarks/engine_model.py [--repeats 5] [--no-append]

Prints three medians and appends a section to docs/benchmarks.md:
- stepwise iterations/s with 256 sequences decoding (every token reported, as the emulator runs it);
- decode iterations/s advanced in skip-ahead mode (64 sequences with staggered lengths, quiet outputs);
- requests/s through one engine driven like the simulator drives it (Poisson arrivals, advance() between
  arrivals, quiet outputs): the figure that bounds a fleet simulation's speed.
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import time
from pathlib import Path

from common import cpu_model
from fleetserve.model.engine import EngineModel
from fleetserve.model.types import EngineRequest

GPU, MODEL = "h100-80g", "llama-3-8b"
DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def stepwise_iterations_per_s(iterations: int = 2000) -> float:
    engine = EngineModel.build(GPU, MODEL)
    for index in range(256):
        engine.add_request(EngineRequest(f"r{index}", [index] * 128, 6000, 0.0), 0.0)
    # get every sequence past its prefill first
    while engine.metrics.num_running < 256 or engine.scheduler.prefilling:
        engine.step(engine.next_event_time())
    started = time.perf_counter()
    for _ in range(iterations):
        engine.step(engine.next_event_time())
    return iterations / (time.perf_counter() - started)


def skip_ahead_iterations_per_s() -> float:
    engine = EngineModel.build(GPU, MODEL, report_every_token=False)
    rng = random.Random(0)
    for index in range(64):
        prompt = [rng.randrange(32000) for _ in range(256)]
        engine.add_request(EngineRequest(f"r{index}", prompt, rng.randint(1000, 6000), 0.0), 0.0)
    started = time.perf_counter()
    result = engine.advance(1e9)
    return result.iterations / (time.perf_counter() - started)


def requests_per_s(count: int = 20_000) -> float:
    engine = EngineModel.build(GPU, MODEL, report_every_token=False, enable_kv_events=False)
    rng = random.Random(1)
    prefixes = [[rng.randrange(32000) for _ in range(512)] for _ in range(8)]
    requests, now = [], 0.0
    for index in range(count):
        now += rng.expovariate(12.0)  # about 12 requests/s keeps ~60 sequences running on one H100
        prompt = prefixes[rng.randrange(8)] + [rng.randrange(32000) for _ in range(rng.randint(16, 512))]
        requests.append(EngineRequest(f"r{index}", prompt, rng.randint(16, 512), now))
    started = time.perf_counter()
    finished = 0
    for request in requests:
        finished += sum(out.finished for out in engine.advance(request.arrival_time).outputs)
        engine.add_request(request, request.arrival_time)
    finished += sum(out.finished for out in engine.advance(1e12).outputs)
    elapsed = time.perf_counter() - started
    assert finished == count, (finished, count)
    return count / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-append", action="store_true", help="print only, leave docs/benchmarks.md alone")
    args = parser.parse_args()
    figures = {
        "stepwise iterations/s, 256 sequences decoding (every token reported)": stepwise_iterations_per_s,
        "skip-ahead decode iterations/s, 64 sequences (quiet outputs)": skip_ahead_iterations_per_s,
        "requests/s through one engine, simulator-style (advance between arrivals)": requests_per_s,
    }
    results = {}
    for name, measure in figures.items():
        results[name] = statistics.median(measure() for _ in range(args.repeats))
        print(f"{name}: {results[name]:,.0f}")
    if args.no_append:
        return
    date = subprocess.run(["date", "-u"], capture_output=True, text=True, check=True).stdout.strip()
    nproc = subprocess.run(["nproc"], capture_output=True, text=True, check=True).stdout.strip()
    lines = [
        "",
        f"## Engine model speed ({date})",
        "",
        f"Machine: {nproc} cores, {cpu_model()}. Engine: {MODEL} on one {GPU}, default engine args.",
        f"Command: `python benchmarks/engine_model.py --repeats {args.repeats}` (medians of {args.repeats}).",
        "",
        "| measure | median |",
        "|---|---|",
        *(f"| {name} | {value:,.0f} |" for name, value in results.items()),
        "",
    ]
    DOCS.parent.mkdir(parents=True, exist_ok=True)
    with DOCS.open("a") as handle:
        if handle.tell() == 0:
            handle.write("# Benchmarks\n\nEach section is appended by the script named in it.\n")
        handle.write("\n".join(lines))


if __name__ == "__main__":
    main()
