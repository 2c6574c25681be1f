"""Does the emulated engine deliver tokens when the engine model says it should?

A client sends one streaming request at a time (light load) to an emulator at time scale 1 and
timestamps every SSE chunk; the same request is run through a fresh engine model on a virtual clock to
get the predicted time to first token and inter-token latencies. The figures are the median relative
errors |measured - predicted| / predicted over all requests (per request: TTFT, and the median ITL).
The client's own overhead (HTTP round trip, parsing) is part of the measured error, as it would be for
any user of the emulator.

Usage: python benchmarks/emulator_fidelity.py [--requests 12] [--no-append]
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from fleetserve.model.engine import EngineModel
from fleetserve.model.types import EngineRequest

ROOT = Path(__file__).resolve().parent.parent
READY = re.compile(r"url=(\S+)")
MODEL = "llama-3-8b"
PROMPT_LENGTHS = (256, 1024, 3072)
OUTPUT_TOKENS = 48


@dataclass
class Timing:
    ttft: float
    itl: float  # median inter-token latency


def predicted(gpu: str, prompt: list[int]) -> Timing:
    engine = EngineModel.build(gpu, MODEL)
    engine.add_request(EngineRequest("probe", prompt, OUTPUT_TOKENS, 0.0), 0.0)
    times: list[float] = []
    while (when := engine.next_event_time()) is not None:
        for output in engine.step(when).outputs:
            times.append(output.last_token_time)
    return Timing(times[0], statistics.median(b - a for a, b in itertools.pairwise(times)))


def measured(client: httpx.Client, url: str, prompt: list[int]) -> Timing:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": OUTPUT_TOKENS, "ignore_eos": True, "stream": True}
    stamps: list[float] = []
    start = time.perf_counter()
    with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        for piece in response.iter_raw():
            now = time.perf_counter()
            stamps.extend([now] * piece.count(b'data: {"id"'))
    assert len(stamps) == OUTPUT_TOKENS, f"expected {OUTPUT_TOKENS} chunks, got {len(stamps)}"
    return Timing(stamps[0] - start, statistics.median(b - a for a, b in itertools.pairwise(stamps)))


def round_trip(client: httpx.Client, url: str) -> float:
    """The HTTP overhead any request pays on this machine: median of a few GET /health round trips."""
    samples = []
    for _ in range(3):
        start = time.perf_counter()
        client.get(f"{url}/health").raise_for_status()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def start_emulator(gpu: str) -> tuple[subprocess.Popen[str], str]:
    command = [sys.executable, "-c", "from fleetserve.cli import main; main()", "engine", "emulate"]
    command += ["--gpu", gpu, "--model", MODEL, "--port", "0"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert process.stdout is not None
    while True:
        line = process.stdout.readline()
        if not line:
            raise RuntimeError(f"emulator exited: {process.wait()}")
        if match := READY.search(line):
            return process, match.group(1)


def relative_error(measured_s: float, predicted_s: float) -> float:
    return abs(measured_s - predicted_s) / predicted_s


@dataclass
class Errors:
    ttft: list[float]
    ttft_without_http: list[float]
    itl: list[float]
    pairs: list[tuple[Timing, Timing]]


def run(gpu: str, requests: int) -> Errors:
    process, url = start_emulator(gpu)
    rng = random.Random(0)
    errors = Errors([], [], [], [])
    try:
        with httpx.Client(timeout=60) as client:
            measured(client, url, [rng.randrange(1000, 30000) for _ in range(64)])  # warm-up, not counted
            for index in range(requests):
                length = PROMPT_LENGTHS[index % len(PROMPT_LENGTHS)]
                # fresh random ids: no prefix-cache hit, so the prediction of an idle engine applies
                prompt = [rng.randrange(1000, 30000) for _ in range(length)]
                http_overhead = round_trip(client, url)
                got, want = measured(client, url, prompt), predicted(gpu, prompt)
                errors.ttft.append(relative_error(got.ttft, want.ttft))
                errors.ttft_without_http.append(relative_error(got.ttft - http_overhead, want.ttft))
                errors.itl.append(relative_error(got.itl, want.itl))
                errors.pairs.append((got, want))
    finally:
        process.terminate()
        process.wait(timeout=15)
    return errors


@dataclass
class Row:
    gpu: str
    ttft_error: float
    ttft_error_without_http: float
    itl_error: float
    ttft_ms: tuple[float, float]  # measured, predicted
    itl_ms: tuple[float, float]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=12, help="Measured requests per GPU type.")
    parser.add_argument("--gpus", default="h100-80g,l4", help="Comma-separated GPU catalog names.")
    parser.add_argument("--no-append", action="store_true", help="Do not append to docs/benchmarks.md.")
    args = parser.parse_args()
    rows = []
    for gpu in args.gpus.split(","):
        errors = run(gpu, args.requests)
        pairs = errors.pairs
        row = Row(
            gpu=gpu,
            ttft_error=statistics.median(errors.ttft),
            ttft_error_without_http=statistics.median(errors.ttft_without_http),
            itl_error=statistics.median(errors.itl),
            ttft_ms=(
                statistics.median(got.ttft for got, _ in pairs) * 1000,
                statistics.median(want.ttft for _, want in pairs) * 1000,
            ),
            itl_ms=(
                statistics.median(got.itl for got, _ in pairs) * 1000,
                statistics.median(want.itl for _, want in pairs) * 1000,
            ),
        )
        rows.append(row)
        print(
            f"{gpu}: median TTFT error {row.ttft_error:.1%} "
            f"({row.ttft_error_without_http:.1%} without the HTTP round trip; "
            f"measured {row.ttft_ms[0]:.1f} ms vs predicted {row.ttft_ms[1]:.1f} ms), "
            f"median ITL error {row.itl_error:.1%} (measured {row.itl_ms[0]:.2f} ms vs predicted "
            f"{row.itl_ms[1]:.2f} ms)"
        )
    if not args.no_append:
        append(args, rows)


def append(
    args: argparse.Namespace, rows: list[tuple[str, float, float, float, float, float, float]]
) -> None:
    cpu_model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "unknown",
    )
    date = subprocess.run(["date", "-u"], capture_output=True, text=True, check=True).stdout.strip()
    command = ("python benchmarks/emulator_fidelity.py " + " ".join(sys.argv[1:])).strip()
    table = "\n".join(
        f"| {row.gpu} | {row.ttft_error:.1%} | {row.ttft_error_without_http:.1%} "
        f"| {row.ttft_ms[0]:.1f} / {row.ttft_ms[1]:.1f} | {row.itl_error:.1%} "
        f"| {row.itl_ms[0]:.2f} / {row.itl_ms[1]:.2f} |"
        for row in rows
    )
    lengths = ", ".join(map(str, PROMPT_LENGTHS))
    section = f"""
## Emulated engine: timing fidelity (client-measured vs engine model)

- date: {date}
- machine: {os.cpu_count()} CPUs, {cpu_model}, shared with other work
- command: `{command}`
- {MODEL}, one streaming request at a time, {args.requests} requests per GPU, prompts of {lengths}
  tokens, {OUTPUT_TOKENS} output tokens; errors are medians over requests. "Without HTTP" subtracts the
  round trip of a trivial request measured just before (overhead a real vLLM server has as well).

| GPU | TTFT error | without HTTP | TTFT ms measured / predicted | ITL error | ITL ms measured / predicted |
|---|---|---|---|---|---|
{table}
"""
    with (ROOT / "docs" / "benchmarks.md").open("a") as docs:
        docs.write(section)


if __name__ == "__main__":
    main()
