"""How long the workload room takes to make, write, read and summarise a 1,000,000-request trace.

The simulator benchmark replays 1M requests in under a minute, so loading the trace must stay a small
share of that. Lengths follow the Azure LLM 2023 conversation trace (Azure Public Dataset, CC-BY-4.0) when
the shared data is present, else zipf:1024/zipf:256. The CSV figure reads a 1M-row file in the Azure format
written from the generated trace.

    .venv/bin/python benchmarks/workload_io.py            # appends a section to docs/benchmarks.md
    .venv/bin/python benchmarks/workload_io.py -n 100000 --no-append
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

from fleetserve.workload import WorkloadSpec, generate, parse_length_spec, read_trace, summarize, write_jsonl

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("FLEETSERVE_SHARED_DATA", REPO.parent / "shared" / "data"))
AZURE_CONV = SHARED_DATA / "traces" / "azure_llm_2023_conv.csv"


def timed(action: Callable[[], object], repeats: int) -> float:
    durations = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = action()
        durations.append(time.perf_counter() - start)
        # Freeing a million requests is not part of the step being measured.
        del result
    return statistics.median(durations)


def write_azure_csv(path: Path, spec: WorkloadSpec) -> None:
    origin = datetime(2023, 11, 16, 18, 15)
    with open(path, "w") as handle:
        handle.write("TIMESTAMP,ContextTokens,GeneratedTokens\n")
        for request in generate(spec):
            moment = origin + timedelta(milliseconds=request.timestamp_ms)
            handle.write(f"{moment.isoformat(sep=' ')},{request.input_length},{request.output_length}\n")


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next(
        (line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
        platform.processor(),
    )
    nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    return f"{nproc} cores (nproc), {cpu}, Python {platform.python_version()}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-n", "--requests", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--no-append", action="store_true", help="Print only; leave docs/benchmarks.md alone."
    )
    args = parser.parse_args()

    if AZURE_CONV.exists():
        lengths = f"empirical:{AZURE_CONV}"
        mix = "Azure LLM 2023 conversation lengths"
    else:
        lengths, mix = "zipf:1024", "zipf:1024 / zipf:256 lengths"
    spec = WorkloadSpec(
        rate=100.0,
        num_requests=args.requests,
        input_lengths=parse_length_spec(lengths, side="input"),
        output_lengths=parse_length_spec(lengths if AZURE_CONV.exists() else "zipf:256", side="output"),
    )
    requests = generate(spec)
    with tempfile.TemporaryDirectory() as scratch:
        jsonl = Path(scratch) / "trace.jsonl"
        csv_path = Path(scratch) / "trace.csv"
        write_jsonl(requests, jsonl)
        write_azure_csv(csv_path, spec)
        figures = {
            "generate (Poisson, hash ids)": timed(lambda: generate(spec), args.repeats),
            "write JSONL": timed(lambda: write_jsonl(requests, jsonl), args.repeats),
            "read JSONL": timed(lambda: read_trace(jsonl), args.repeats),
            "read Azure CSV": timed(lambda: read_trace(csv_path), args.repeats),
            "stats": timed(lambda: summarize(requests), args.repeats),
        }
    command = "python benchmarks/workload_io.py" + (
        f" -n {args.requests}" if args.requests != 1_000_000 else ""
    )
    rows = "\n".join(f"| {name} | {seconds:.2f} |" for name, seconds in figures.items())
    section = (
        f"\n## Workload trace I/O ({args.requests:,} requests)\n\n"
        f"- date: {subprocess.run(['date', '-u'], capture_output=True, text=True).stdout.strip()}\n"
        f"- machine: {machine()}\n"
        f"- command: `{command}`\n"
        f"- workload: Poisson arrivals at 100 req/s, {mix}; median of {args.repeats} runs\n\n"
        f"| step | seconds |\n|---|---|\n{rows}\n"
    )
    print(section)
    if not args.no_append:
        with open(REPO / "docs" / "benchmarks.md", "a") as handle:
            handle.write(section)


if __name__ == "__main__":
    main()
