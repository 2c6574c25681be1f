"""How many SSE chunks one emulator process delivers on one core, and what a 32-engine demo load costs.

Two measurements, each with the emulator process pinned to CPU 0 and the load generator (a separate
process) pinned to CPU 1:

1. saturation: one engine, many concurrent streams, time scale small enough that the engine always
   has tokens ready; the figure is SSE chunks per second (one chunk per token), i.e. what one core
   can serve when rendering and writing chunks is the only work left.
2. demo load: 32 engines in one process (`--fleet`), a closed loop of a few streams per engine at
   time scale 1; the figure is the emulator's CPU use (share of one core) at that load.

Usage: python benchmarks/emulator_sse.py [--duration 10] [--no-append]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
READY = re.compile(r"url=(\S+)")
EMULATOR_CPU = 0
CLIENT_CPU = 1


@dataclass
class LoadResult:
    chunks: int
    requests: int
    seconds: float


async def _stream_forever(
    session: aiohttp.ClientSession, url: str, tokens: int, deadline: float, totals: list[int]
) -> None:
    body = {
        "prompt": "benchmark prompt " * 16,
        "max_tokens": tokens,
        "ignore_eos": True,
        "stream": True,
    }
    while time.monotonic() < deadline:
        async with session.post(f"{url}/v1/completions", json=body) as response:
            response.raise_for_status()
            chunks = 0
            async for data in response.content.iter_any():
                chunks += data.count(b"data: ")
            totals[0] += chunks - 1  # the final `data: [DONE]` carries no token
            totals[1] += 1


async def _load(urls: list[str], streams_per_url: int, tokens: int, duration: float) -> LoadResult:
    totals = [0, 0]
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        # warm up: one request per engine, not counted
        await asyncio.gather(
            *(_stream_forever(session, url, 4, time.monotonic() + 0.01, [0, 0]) for url in urls)
        )
        start = time.monotonic()
        deadline = start + duration
        await asyncio.gather(
            *(
                _stream_forever(session, url, tokens, deadline, totals)
                for url in urls
                for _ in range(streams_per_url)
            )
        )
        elapsed = time.monotonic() - start
    return LoadResult(totals[0], totals[1], elapsed)


def _client_process(
    urls: list[str], streams: int, tokens: int, duration: float, out: multiprocessing.Queue
) -> None:
    os.sched_setaffinity(0, {CLIENT_CPU})
    out.put(asyncio.run(_load(urls, streams, tokens, duration)))


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _start_emulator(args: list[str], engines: int) -> tuple[subprocess.Popen[str], list[str]]:
    command = [sys.executable, "-c", "from fleetserve.cli import main; main()", "engine", "emulate", *args]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=lambda: os.sched_setaffinity(0, {EMULATOR_CPU}),
    )
    urls: list[str] = []
    assert process.stdout is not None
    while len(urls) < engines:
        line = process.stdout.readline()
        if not line:
            raise RuntimeError(f"emulator exited: {process.wait()}")
        if match := READY.search(line):
            urls.append(match.group(1))
    return process, urls


def _measure(
    emulator_args: list[str], engines: int, streams: int, tokens: int, duration: float
) -> tuple[LoadResult, float]:
    process, urls = _start_emulator(emulator_args, engines)
    try:
        results: multiprocessing.Queue = multiprocessing.Queue()
        client = multiprocessing.Process(
            target=_client_process, args=(urls, streams, tokens, duration, results)
        )
        cpu_before, wall_before = _cpu_seconds(process.pid), time.monotonic()
        client.start()
        result = results.get(timeout=duration + 120)
        cpu_share = (_cpu_seconds(process.pid) - cpu_before) / (time.monotonic() - wall_before)
        client.join()
        return result, cpu_share
    finally:
        process.terminate()
        process.wait(timeout=15)


def _free_port_run(count: int) -> int:
    """A base port with `count` consecutive free ports after it."""
    for base in range(21000, 60000, 97):
        try:
            for port in range(base, base + count):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError("no run of free ports")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=10.0, help="Seconds of load per measurement.")
    parser.add_argument("--runs", type=int, default=3, help="Repetitions; medians are reported.")
    parser.add_argument("--saturation-streams", type=int, default=128)
    parser.add_argument("--demo-engines", type=int, default=32)
    parser.add_argument("--demo-streams-per-engine", type=int, default=2)
    parser.add_argument("--no-append", action="store_true", help="Do not append to docs/benchmarks.md.")
    args = parser.parse_args()
    if os.cpu_count() is None or os.cpu_count() < 2:  # type: ignore[operator]
        raise SystemExit("needs two CPUs: one for the emulator, one for the load generator")

    saturation_args = [
        "--gpu", "h100-80g", "--model", "llama-3-8b", "--port", "0",
        "--time-scale", "0.01", "--max-num-seqs", "512",
    ]  # fmt: skip
    saturation = [
        _measure(saturation_args, 1, args.saturation_streams, 256, args.duration) for _ in range(args.runs)
    ]
    chunks_per_s = statistics.median(r.chunks / r.seconds for r, _ in saturation)
    saturation_cpu = statistics.median(cpu for _, cpu in saturation)
    # the load generator may saturate first: chunks per emulator CPU-second is the core's capacity
    per_core = statistics.median(r.chunks / r.seconds / cpu for r, cpu in saturation)
    print(
        f"saturation: {chunks_per_s:,.0f} SSE chunks/s delivered at emulator CPU {saturation_cpu:.0%}: "
        f"{per_core:,.0f} chunks per emulator CPU-second"
    )

    base = _free_port_run(args.demo_engines)
    with tempfile.TemporaryDirectory() as tmp:
        fleet = Path(tmp) / "fleet.yaml"
        h100s = args.demo_engines // 2
        fleet.write_text(
            "engines:\n"
            f"  - {{name: h100, gpu: h100-80g, model: llama-3-8b, replicas: {h100s}}}\n"
            f"  - {{name: l4, gpu: l4, model: llama-3-8b, replicas: {args.demo_engines - h100s}}}\n"
            f"emulator: {{base_port: {base}}}\n"
        )
        demo = [
            _measure(
                ["--fleet", str(fleet)], args.demo_engines, args.demo_streams_per_engine, 128, args.duration
            )
            for _ in range(args.runs)
        ]
    demo_chunks = statistics.median(r.chunks / r.seconds for r, _ in demo)
    demo_cpu = statistics.median(cpu for _, cpu in demo)
    demo_per_core = statistics.median(r.chunks / r.seconds / cpu for r, cpu in demo)
    print(
        f"demo load: {args.demo_engines} engines, {args.demo_streams_per_engine} streams each: "
        f"{demo_chunks:,.0f} chunks/s, emulator CPU {demo_cpu:.0%} of one core "
        f"({demo_per_core:,.0f} chunks per CPU-second)"
    )
    if not args.no_append:
        _append(args, (chunks_per_s, saturation_cpu, per_core), (demo_chunks, demo_cpu, demo_per_core))


def _append(
    args: argparse.Namespace, saturation: tuple[float, float, float], demo: tuple[float, float, float]
) -> None:
    """Each figure is (chunks/s delivered, emulator share of one core, chunks per emulator CPU-second)."""
    cpu_model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "unknown",
    )
    date = subprocess.run(["date", "-u"], capture_output=True, text=True, check=True).stdout.strip()
    command = "python benchmarks/emulator_sse.py " + " ".join(sys.argv[1:])
    saturation_row = (
        f"| saturation: 1 engine, {args.saturation_streams} concurrent streams, time scale 0.01 "
        f"| {saturation[0]:,.0f} | {saturation[1]:.0%} | {saturation[2]:,.0f} |"
    )
    demo_row = (
        f"| demo load: {args.demo_engines} engines in one process (half H100, half L4), "
        f"{args.demo_streams_per_engine} streams each, time scale 1 "
        f"| {demo[0]:,.0f} | {demo[1]:.0%} | {demo[2]:,.0f} |"
    )
    section = f"""
## Emulated engine: SSE throughput on one core

- date: {date}
- machine: {os.cpu_count()} CPUs, {cpu_model}, shared with other work; medians of {args.runs} runs
- command: `{command.strip()}`
- emulator pinned to CPU {EMULATOR_CPU}; load generator (aiohttp, separate process) pinned to CPU {CLIENT_CPU}
- at saturation the event loop runs late, so several due tokens of a stream leave in one write (still one
  SSE event per token); at demo load every token is its own write. When the load generator saturates
  its core first, chunks per emulator CPU-second is the emulator's capacity per core

| measurement | SSE chunks/s delivered | emulator CPU (one core = 100%) | chunks per emulator CPU-second |
|---|---|---|---|
{saturation_row}
{demo_row}
"""
    with (ROOT / "docs" / "benchmarks.md").open("a") as docs:
        docs.write(section)


if __name__ == "__main__":
    main()
