"""Latency the gateway adds, measured side by side against the same upstream.

    python benchmarks/gateway_overhead.py [--upstream raw|emulator] [--duration 4] [--rounds 3]

The upstream answers instantly (a minimal raw-asyncio HTTP server, or with `--upstream emulator` an
emulated engine with a near-zero time scale), so what is measured is transport plus gateway. For each
request rate, windows alternate between calling the upstream directly and calling it through a
`fleetserve serve` process, open-loop (requests start on schedule whatever the latency), non-streaming.
It reports the added p50/p99 at 200 req/s, then raises the rate until the added p99 exceeds 5 ms or the
gateway falls behind the schedule, and appends the figures to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import orjson
import uvloop
import yaml

from common import free_port

ROOT = Path(__file__).resolve().parent.parent
FLEETSERVE = Path(sys.executable).with_name("fleetserve")
ADDED_P99_LIMIT_MS = 5.0
BASELINE_RATE = 200.0
REQUEST = orjson.dumps(
    {"model": "bench-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
)


# -- the instant upstream (runs in its own process) ---------------------------------------------------

ANSWER = orjson.dumps(
    {
        "id": "x",
        "object": "chat.completion",
        "created": 0,
        "model": "bench-model",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "length"}
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
)
MODELS = orjson.dumps({"object": "list", "data": [{"id": "bench-model", "object": "model", "parent": None}]})


class InstantUpstream(asyncio.Protocol):
    """HTTP/1.1 with keep-alive, just enough for the gateway's client: every POST gets ANSWER."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (head_end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head = self.buffer[:head_end].lower()
            length = 0
            if (at := head.find(b"content-length:")) >= 0:
                length = int(head[at + 15 : head.find(b"\r\n", at) if head.find(b"\r\n", at) > 0 else None])
            if len(self.buffer) < head_end + 4 + length:
                return
            self.buffer = self.buffer[head_end + 4 + length :]
            body = (
                MODELS
                if head.startswith(b"get /v1/models")
                else ANSWER
                if head.startswith(b"post")
                else b"{}"
            )
            self.transport.write(  # type: ignore[attr-defined]
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                + str(len(body)).encode()
                + b"\r\n\r\n"
                + body
            )


def serve_upstream(port: int) -> None:
    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(InstantUpstream, "127.0.0.1", port)
        await server.serve_forever()

    uvloop.run(main())


# -- measurement ------------------------------------------------------------------------------------


@dataclass
class Window:
    latencies_ms: list[float]
    wall_s: float
    errors: int


async def open_loop(session: aiohttp.ClientSession, url: str, rate: float, duration: float) -> Window:
    loop = asyncio.get_running_loop()
    count = int(rate * duration)
    latencies: list[float] = []
    errors = 0

    async def one() -> None:
        nonlocal errors
        started = time.perf_counter()
        try:
            async with session.post(url, data=REQUEST, headers={"content-type": "application/json"}) as r:
                await r.read()
                if r.status != 200:
                    errors += 1
                    return
        except aiohttp.ClientError:
            errors += 1
            return
        latencies.append((time.perf_counter() - started) * 1000)

    start = loop.time()
    tasks = []
    for index in range(count):
        delay = start + index / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one()))
    await asyncio.gather(*tasks)
    return Window(latencies, loop.time() - start, errors)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class RateResult:
    rate: float
    direct_p50: float
    direct_p99: float
    gateway_p50: float
    gateway_p99: float
    achieved: float
    errors: int

    @property
    def added_p50(self) -> float:
        return self.gateway_p50 - self.direct_p50

    @property
    def added_p99(self) -> float:
        return self.gateway_p99 - self.direct_p99


async def measure(direct: str, gateway: str, rate: float, duration: float, rounds: int) -> RateResult:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        await open_loop(session, direct, 50, 0.5)  # warm both connection pools
        await open_loop(session, gateway, 50, 0.5)
        per_round: dict[str, list[tuple[float, float]]] = {"direct": [], "gateway": []}
        achieved, errors = [], 0
        for _ in range(rounds):
            for name, url in (("direct", direct), ("gateway", gateway)):
                window = await open_loop(session, url, rate, duration)
                errors += window.errors
                per_round[name].append(
                    (percentile(window.latencies_ms, 0.5), percentile(window.latencies_ms, 0.99))
                )
                if name == "gateway":
                    achieved.append(len(window.latencies_ms) / window.wall_s)
    med = statistics.median
    return RateResult(
        rate,
        med(p50 for p50, _ in per_round["direct"]),
        med(p99 for _, p99 in per_round["direct"]),
        med(p50 for p50, _ in per_round["gateway"]),
        med(p99 for _, p99 in per_round["gateway"]),
        med(achieved),
        errors,
    )


async def one_at_a_time(direct: str, gateway: str, count: int = 1000) -> tuple[float, float]:
    """Added p50/p99 with one request in flight: the gateway's own cost, without queueing."""
    latencies: dict[str, list[float]] = {direct: [], gateway: []}
    async with aiohttp.ClientSession() as session:
        for index in range(2 * count):
            url = direct if index % 2 else gateway
            started = time.perf_counter()
            async with session.post(url, data=REQUEST, headers={"content-type": "application/json"}) as r:
                await r.read()
            latencies[url].append((time.perf_counter() - started) * 1000)
    return (
        percentile(latencies[gateway], 0.5) - percentile(latencies[direct], 0.5),
        percentile(latencies[gateway], 0.99) - percentile(latencies[direct], 0.99),
    )


# -- processes --------------------------------------------------------------------------------------


def wait_ready(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f}s")


def start(argv: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def start_upstream(kind: str, port: int) -> tuple[subprocess.Popen[bytes], str]:
    if kind == "raw":
        return start([sys.executable, __file__, "--serve-upstream", str(port)]), "bench-model"
    argv = [str(FLEETSERVE), "engine", "emulate", "--gpu", "h100-80g", "--model", "llama-3-8b"]
    argv += ["--served-model-name", "bench-model", "--port", str(port), "--time-scale", "1e-6"]
    return start(argv), "bench-model"


# -- report -----------------------------------------------------------------------------------------


def machine() -> str:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return f"{os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}"


def report(
    args: argparse.Namespace,
    baseline: RateResult,
    sequential: tuple[float, float],
    sweep: list[RateResult],
    best: float | None,
) -> str:
    rows = [
        f"| {r.rate:.0f} | {r.achieved:.0f} | {r.direct_p50:.2f} | {r.gateway_p50:.2f} | {r.added_p50:.2f} "
        f"| {r.direct_p99:.2f} | {r.gateway_p99:.2f} | {r.added_p99:.2f} | {r.errors} |"
        for r in sweep
    ]
    command = "python benchmarks/gateway_overhead.py " + " ".join(sys.argv[1:])
    return "\n".join(
        [
            f"## Gateway overhead ({args.upstream} upstream)",
            "",
            f"- date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
            f"- machine: {machine()} (shared with other jobs: expect noise)",
            f"- command: `{command.strip()}`",
            f"- method: open-loop non-streaming chat completions, {args.rounds} alternating direct/gateway "
            f"windows of {args.duration:g} s per rate; figures are medians over windows, latencies in ms",
            f"- **added latency at 200 req/s: p50 {baseline.added_p50:.2f} ms, "
            f"p99 {baseline.added_p99:.2f} ms**",
            f"- added latency one request at a time (no load): p50 {sequential[0]:.2f} ms, "
            f"p99 {sequential[1]:.2f} ms",
            "- **highest rate with added p99 <= 5 ms: "
            + (f"{best:.0f} req/s**" if best is not None else "none of the rates tried**"),
            "",
            "| rate | achieved | direct p50 | gateway p50 | added p50 "
            "| direct p99 | gateway p99 | added p99 | errors |",
            "|---|---|---|---|---|---|---|---|---|",
            *rows,
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--upstream", choices=["raw", "emulator"], default="raw")
    parser.add_argument("--duration", type=float, default=4.0, help="Seconds per measurement window.")
    parser.add_argument("--rounds", type=int, default=3, help="Direct/gateway window pairs per rate.")
    parser.add_argument("--rates", default="50,100,400,600,800,1000,1300,1600,2000", help="Rates to sweep.")
    parser.add_argument("--no-record", action="store_true", help="Do not append to docs/benchmarks.md.")
    parser.add_argument("--serve-upstream", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_upstream:
        serve_upstream(args.serve_upstream)
        return

    upstream_port, gateway_port = free_port(), free_port()
    upstream, model = start_upstream(args.upstream, upstream_port)
    upstream_url = f"http://127.0.0.1:{upstream_port}"
    fleet = {
        "engines": [{"name": "upstream", "model": model, "url": upstream_url, "dialect": "none"}],
        "gateway": {"max_queue": 100000},
    }
    gateway = None
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as file:
        yaml.safe_dump(fleet, file)
    try:
        wait_ready(upstream_url + "/v1/models")
        gateway = start(
            [str(FLEETSERVE), "serve", "-c", file.name, "--no-launch", "--port", str(gateway_port)]
        )
        wait_ready(f"http://127.0.0.1:{gateway_port}/ready")
        direct = upstream_url + "/v1/chat/completions"
        through = f"http://127.0.0.1:{gateway_port}/v1/chat/completions"
        sequential = uvloop.run(one_at_a_time(direct, through))
        print(
            f"one request at a time: added p50 {sequential[0]:.2f} ms, p99 {sequential[1]:.2f} ms", flush=True
        )
        baseline = uvloop.run(measure(direct, through, BASELINE_RATE, args.duration, args.rounds))
        rates = sorted({float(r) for r in args.rates.split(",")} | {BASELINE_RATE})
        sweep: list[RateResult] = []
        best = None
        for rate in rates:
            result = (
                baseline
                if rate == BASELINE_RATE
                else uvloop.run(measure(direct, through, rate, args.duration, args.rounds))
            )
            sweep.append(result)
            print(
                f"{rate:6.0f} req/s: achieved {result.achieved:6.0f}  added p50 {result.added_p50:5.2f} ms  "
                f"added p99 {result.added_p99:5.2f} ms  (direct p99 {result.direct_p99:.2f}, "
                f"gateway p99 {result.gateway_p99:.2f}, errors {result.errors})",
                flush=True,
            )
            keeps_up = result.achieved >= 0.95 * rate and result.errors == 0
            if result.added_p99 > ADDED_P99_LIMIT_MS or not keeps_up:
                break
            best = rate
    finally:
        if gateway is not None:
            stop(gateway)
        stop(upstream)
        os.unlink(file.name)
    text = report(args, baseline, sequential, sweep, best)
    print(text)
    if not args.no_record:
        path = ROOT / "docs" / "benchmarks.md"
        path.parent.mkdir(exist_ok=True)
        prefix = (
            ""
            if path.exists()
            else "# Benchmarks\n\nEvery figure here was produced by the command shown with it.\n\n"
        )
        with path.open("a") as out:
            out.write(prefix + text + "\n")


if __name__ == "__main__":
    main()
