"""Soak: a gateway under mixed traffic, hostile clients and engine kills, watched for leaks.

    python benchmarks/soak.py --duration 600          # the figure quoted in docs/benchmarks.md
    python benchmarks/soak.py --duration 3600         # an hour

Three emulated engines run as separate processes behind `fleetserve serve --no-launch`. For the whole
run:
- well-behaved clients send a Poisson mix of chat and completions, streamed and not, from 127.0.0.1;
- hostile clients from 127.0.0.3 keep opening connections that stall mid-body, lie about their
  Content-Length, never finish a chunked body, send huge headers or nothing at all;
- every `--kill-every` seconds one engine is killed (SIGKILL) and started again on the same port.

Every `--sample-every` seconds the gateway's resident memory, open file descriptors and asyncio tasks
are read from its /metrics. The run passes when all three stay bounded (the last third's peak within
`--growth` of the first third's, after a warm-up) and no request was lost: every well-formed request
got a 200, or a stream that an engine kill cut got its SSE error event (counted, not lost). A request
refused before its first byte while an engine was still alive elsewhere counts as lost.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import yaml

from common import answers, cpu_model, free_port, record, stop_process_group

ROOT = Path(__file__).resolve().parent.parent
FLEETSERVE = Path(sys.executable).with_name("fleetserve")
MODEL = "llama-3-8b"
HOSTILE_ADDRESS = "127.0.0.3"
CLIENT_ADDRESS = "127.0.0.1"


@dataclass
class Outcomes:
    counts: Counter[str] = field(default_factory=Counter)

    def add(self, what: str) -> None:
        self.counts[what] += 1


@dataclass
class Sample:
    at_s: float
    rss_mb: float
    open_fds: float
    tasks: float


class Engine:
    def __init__(self, name: str, port: int, logs: Path) -> None:
        self.name, self.port, self.logs = name, port, logs
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = (self.logs / f"{self.name}.log").open("ab")
        self.process = subprocess.Popen(
            [
                str(FLEETSERVE),
                "engine",
                "emulate",
                "--gpu",
                "h100-80g",
                "--model",
                MODEL,
                "--port",
                str(self.port),
                "--time-scale",
                "0.2",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


async def good_client(url: str, rate: float, until: float, outcomes: Outcomes, seed: int) -> None:
    rng = random.Random(seed)
    connector = aiohttp.TCPConnector(local_addr=(CLIENT_ADDRESS, 0), limit=0)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=120)
    ) as session:
        pending: set[asyncio.Task[None]] = set()
        while time.monotonic() < until:
            await asyncio.sleep(rng.expovariate(rate))
            task = asyncio.create_task(one_request(session, url, rng, outcomes))
            pending.add(task)
            task.add_done_callback(pending.discard)
        await asyncio.gather(*pending)


async def one_request(
    session: aiohttp.ClientSession, url: str, rng: random.Random, outcomes: Outcomes
) -> None:
    chat = rng.random() < 0.5
    stream = rng.random() < 0.7
    words = " ".join(
        rng.choice(("the", "fleet", "serves", "tokens", "fast")) for _ in range(rng.randint(5, 400))
    )
    body: dict[str, object] = {"model": MODEL, "max_tokens": rng.randint(4, 64), "stream": stream}
    if chat:
        body["messages"] = [{"role": "user", "content": words}]
    else:
        body["prompt"] = words
    path = "/v1/chat/completions" if chat else "/v1/completions"
    try:
        async with session.post(url + path, json=body) as response:
            data = await response.read()
    except aiohttp.ClientError as exc:
        outcomes.add(f"lost:{type(exc).__name__}")
        return
    if response.status != 200:
        outcomes.add(f"lost:{response.status}")
    elif stream and b'"error"' in data:
        outcomes.add("cut_by_engine_kill")  # an engine died mid-stream: the client got an error event
    elif stream and not data.rstrip().endswith(b"data: [DONE]"):
        outcomes.add("lost:unterminated_stream")
    else:
        outcomes.add("ok")


def hostile_connection(host: str, port: int, kind: str) -> socket.socket | None:
    sock = socket.socket()
    sock.bind((HOSTILE_ADDRESS, 0))
    sock.settimeout(5)
    try:
        sock.connect((host, port))
        if kind == "stalled_body":
            sock.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 97\r\n\r\n" + b"{" * 20
            )
        elif kind == "endless_chunked":
            sock.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"5\r\nhello\r\n"
            )
        elif kind == "huge_headers":
            sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 200_000)
        # "idle": send nothing
    except OSError:
        sock.close()
        return None
    return sock


async def hostile_clients(host: str, port: int, until: float, outcomes: Outcomes) -> None:
    kinds = ("stalled_body", "endless_chunked", "huge_headers", "idle")
    held: list[socket.socket] = []
    while time.monotonic() < until:
        for kind in kinds:
            sock = await asyncio.to_thread(hostile_connection, host, port, kind)
            if sock is not None:
                held.append(sock)
                outcomes.add(f"hostile:{kind}")
        # drop the oldest ones so the client side does not run out of descriptors itself
        while len(held) > 200:
            held.pop(0).close()
        await asyncio.sleep(0.2)
    for sock in held:
        sock.close()


async def engine_killer(engines: list[Engine], every_s: float, until: float, outcomes: Outcomes) -> None:
    rng = random.Random(7)
    while time.monotonic() + every_s < until:
        await asyncio.sleep(every_s)
        victim = rng.choice(engines)
        victim.kill()
        outcomes.add("engine_kills")
        await asyncio.sleep(1.0)
        victim.start()


async def sampler(url: str, every_s: float, until: float, started: float, samples: list[Sample]) -> None:
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < until:
            async with session.get(url + "/metrics") as response:
                text = await response.text()
            values = {}
            for line in text.splitlines():
                name, _, value = line.partition(" ")
                if name in (
                    "process_resident_memory_bytes",
                    "process_open_fds",
                    "fleetserve_gateway_asyncio_tasks",
                ):
                    values[name] = float(value)
            samples.append(
                Sample(
                    time.monotonic() - started,
                    values["process_resident_memory_bytes"] / 2**20,
                    values["process_open_fds"],
                    values["fleetserve_gateway_asyncio_tasks"],
                )
            )
            await asyncio.sleep(every_s)


def bounded(samples: list[Sample], attribute: str, growth: float, slack: float) -> tuple[bool, float, float]:
    """Whether the last third's peak stays within `growth` (plus `slack`) of the first third's."""
    third = max(1, len(samples) // 3)
    first = max(getattr(s, attribute) for s in samples[:third])
    last = max(getattr(s, attribute) for s in samples[-third:])
    return last <= first * (1 + growth) + slack, first, last


async def run(
    args: argparse.Namespace, gateway_url: str, engines: list[Engine]
) -> tuple[Outcomes, list[Sample]]:
    outcomes = Outcomes()
    samples: list[Sample] = []
    started = time.monotonic()
    until = started + args.duration
    port = int(gateway_url.rsplit(":", 1)[1])
    await asyncio.gather(
        *(
            good_client(gateway_url, args.rate / args.clients, until, outcomes, seed)
            for seed in range(args.clients)
        ),
        hostile_clients("127.0.0.1", port, until, outcomes),
        engine_killer(engines, args.kill_every, until, outcomes),
        sampler(gateway_url, args.sample_every, until, started, samples),
    )
    return outcomes, samples


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=600.0, help="Seconds of soak (default 600).")
    parser.add_argument("--rate", type=float, default=20.0, help="Well-formed requests per second, in all.")
    parser.add_argument("--clients", type=int, default=4, help="Concurrent well-behaved client sessions.")
    parser.add_argument("--kill-every", type=float, default=30.0, help="Seconds between engine kills.")
    parser.add_argument("--sample-every", type=float, default=5.0, help="Seconds between resource samples.")
    parser.add_argument("--growth", type=float, default=0.2, help="Allowed growth of each resource's peak.")
    parser.add_argument("--no-append", action="store_true", help="Do not append to docs/benchmarks.md.")
    args = parser.parse_args()

    logs = Path(tempfile.mkdtemp(prefix="fleetserve-soak-"))
    engines = [Engine(f"h100-{index}", free_port(), logs) for index in range(3)]
    gateway_port = free_port()
    fleet = {
        "engines": [{"name": e.name, "model": MODEL, "url": e.url, "gpu": "h100-80g"} for e in engines],
        "gateway": {"port": gateway_port, "health_interval_s": 0.5, "eject_duration_s": 1.0},
    }
    fleet_file = logs / "fleet.yaml"
    fleet_file.write_text(yaml.safe_dump(fleet))
    gateway = None
    try:
        for engine in engines:
            engine.start()
        gateway = subprocess.Popen(
            [str(FLEETSERVE), "serve", "-c", str(fleet_file), "--no-launch"],
            stdout=(logs / "gateway.log").open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        url = f"http://127.0.0.1:{gateway_port}"
        deadline = time.monotonic() + 60
        while not answers(url + "/ready"):
            if time.monotonic() > deadline or gateway.poll() is not None:
                raise SystemExit(f"the gateway did not become ready; see {logs}")
            time.sleep(0.2)
        outcomes, samples = asyncio.run(run(args, url, engines))
    finally:
        if gateway is not None:
            stop_process_group(gateway)
        for engine in engines:
            engine.kill()

    lost = {what: count for what, count in outcomes.counts.items() if what.startswith("lost:")}
    warm = [s for s in samples if s.at_s >= min(60.0, args.duration / 4)] or samples
    checks = {
        "rss_mb": bounded(warm, "rss_mb", args.growth, 5.0),
        "open_fds": bounded(warm, "open_fds", args.growth, 16),
        "tasks": bounded(warm, "tasks", args.growth, 16),
    }
    passed = not lost and all(ok for ok, _, _ in checks.values())
    lines = [
        f"## Soak ({datetime.date.today().isoformat()})",
        "",
        f"`python benchmarks/soak.py --duration {args.duration:g} --rate {args.rate:g}` on {cpu_model()}"
        f" ({len(samples)} samples, {args.kill_every:g} s between engine kills):"
        f" **{'PASS' if passed else 'FAIL'}**",
        "",
        "| outcome | count |",
        "|---|---:|",
        *(f"| {what} | {count} |" for what, count in sorted(outcomes.counts.items())),
        "",
        "| resource | first third peak | last third peak | median | bounded |",
        "|---|---:|---:|---:|---|",
        *(
            f"| {name} | {first:.1f} | {last:.1f} | {statistics.median(getattr(s, name) for s in warm):.1f} |"
            f" {'yes' if ok else 'NO'} |"
            for name, (ok, first, last) in checks.items()
        ),
        "",
    ]
    text = "\n".join(lines)
    print(text)
    print(json.dumps({"passed": passed, "lost": lost, "logs": str(logs)}))
    if not args.no_append:
        record(text)
    if not passed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
