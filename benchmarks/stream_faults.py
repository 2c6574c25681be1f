"""Engines killed under 200 live streams: how many requests fail as the client sees them.

Four emulated engines, each its own `fleetserve engine emulate` process (L4, llama-3-8b), behind one
`fleetserve serve --no-launch`. `--streams` concurrent streams (half chat, half completions, official
openai client, `ignore_eos` so each answer is exactly `--tokens` tokens) start together; once the
clients have received a third of all tokens one engine is killed with SIGKILL, at two thirds another.
A request fails when the client gets an exception, an error event, or fewer tokens than it asked for.
Run twice, side by side: with stream resumes (the default `max_resumes: 2`) and with `max_resumes: 0`
(every peer router's behaviour: a stream cut mid-way ends with an error).

    python benchmarks/stream_faults.py              # ~2 min
    python benchmarks/stream_faults.py --streams 50 --no-write
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import openai
import yaml

from common import free_port, publish, section_head, stop_process_group
from gateway_overhead import wait_ready

FLEETSERVE = Path(sys.executable).with_name("fleetserve")
MODEL = "llama-3-8b"
ENGINES = 4


@dataclass
class Run:
    failed: int = 0
    short: int = 0
    tokens: int = 0
    resumes: float = 0.0
    failures: list[str] = field(default_factory=list)


def metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as response:
        lines = response.read().decode().splitlines()
    return sum(float(line.rpartition(" ")[2]) for line in lines if line.startswith(name + "{"))


async def one_stream(api: openai.AsyncOpenAI, index: int, tokens: int, run: Run, received: list[int]) -> None:
    common = {"model": MODEL, "max_tokens": tokens, "stream": True, "extra_body": {"ignore_eos": True}}
    got = 0
    try:
        if index % 2:
            messages = [{"role": "user", "content": f"request {index}: tell me about ships"}]
            stream = await api.chat.completions.create(messages=messages, **common)
        else:
            stream = await api.completions.create(prompt=f"request {index}: the sea", **common)
        async for chunk in stream:
            if chunk.choices:
                choice = chunk.choices[0]
                piece = choice.delta.content if index % 2 else choice.text  # type: ignore[union-attr]
                if piece:
                    got += 1
                    received[0] += 1
    except openai.APIError as exc:
        run.failed += 1
        run.failures.append(f"{type(exc).__name__}: {exc}"[:160])
        return
    if got < tokens:
        run.short += 1
    run.tokens += got


async def load(gateway: str, engines: list[subprocess.Popen], streams: int, tokens: int) -> Run:
    run = Run()
    received = [0]
    api = openai.AsyncOpenAI(base_url=gateway + "/v1", api_key="unused", max_retries=0, timeout=600)
    total = streams * tokens
    tasks = [asyncio.create_task(one_stream(api, index, tokens, run, received)) for index in range(streams)]
    for victim, share in ((engines[0], 1 / 3), (engines[1], 2 / 3)):
        while received[0] < total * share and not all(task.done() for task in tasks):
            await asyncio.sleep(0.05)
        os.killpg(victim.pid, signal.SIGKILL)
    await asyncio.gather(*tasks)
    await api.close()
    run.resumes = metric(gateway, "fleetserve_stream_resumes_total")
    return run


def start_fleet(
    work: Path, max_resumes: int, time_scale: float
) -> tuple[list[subprocess.Popen], subprocess.Popen, str]:
    engines, urls = [], []
    for _ in range(ENGINES):
        port = free_port()
        argv = [str(FLEETSERVE), "engine", "emulate", "--gpu", "l4", "--model", MODEL, "--port", str(port)]
        argv += ["--time-scale", str(time_scale)]
        engines.append(
            subprocess.Popen(
                argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
            )
        )
        urls.append(f"http://127.0.0.1:{port}")
    for url in urls:
        wait_ready(url + "/v1/models")
    port = free_port()
    fleet = {
        "engines": [
            {"name": f"l4-{index}", "model": MODEL, "gpu": "l4", "url": url} for index, url in enumerate(urls)
        ],
        "router": {"policy": "least_request"},
        "gateway": {
            "port": port,
            "max_resumes": max_resumes,
            "health_interval_s": 0.5,
            "max_pending_per_client": 4 * 256,  # every stream comes from this one address
        },
    }
    path = work / f"fleet-{max_resumes}.yaml"
    path.write_text(yaml.safe_dump(fleet))
    log = (work / f"serve-{max_resumes}.log").open("wb")
    gateway = subprocess.Popen(
        [str(FLEETSERVE), "serve", "-c", str(path), "--no-launch"],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    wait_ready(url + "/ready")
    return engines, gateway, url


def measure(max_resumes: int, streams: int, tokens: int, time_scale: float) -> Run:
    with tempfile.TemporaryDirectory() as tmp:
        engines, gateway, url = start_fleet(Path(tmp), max_resumes, time_scale)
        try:
            return asyncio.run(load(url, engines, streams, tokens))
        finally:
            stop_process_group(gateway)
            for engine in engines:
                stop_process_group(engine)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--tokens", type=int, default=120, help="Tokens per answer.")
    parser.add_argument("--time-scale", type=float, default=2.0, help="Stretch the engines' timings.")
    parser.add_argument("--no-write", action="store_true", help="Print only; leave docs/benchmarks.md alone.")
    args = parser.parse_args()
    rows = []
    for max_resumes in (2, 0):
        run = measure(max_resumes, args.streams, args.tokens, args.time_scale)
        rows.append((max_resumes, run))
        print(f"max_resumes={max_resumes}: {run.failed} failed; first: {run.failures[:2]}", file=sys.stderr)
    lines = section_head("Streams through killed engines (stream resume)", "stream_faults.py")
    lines += [
        f"- {args.streams} concurrent streams (half chat, half completions) of {args.tokens} tokens each"
        f" over {ENGINES} emulated L4 engines (one process each, time_scale {args.time_scale:g}); one engine "
        "SIGKILLed at 1/3 of the tokens, another at 2/3",
        "",
        "| gateway | requests failed as the client sees them | answers short of their tokens | resumes |",
        "| --- | ---: | ---: | ---: |",
    ]
    for max_resumes, run in rows:
        label = f"max_resumes: {max_resumes}" + (" (today's peers)" if max_resumes == 0 else "")
        lines.append(f"| {label} | {run.failed} of {args.streams} | {run.short} | {run.resumes:g} |")
    publish("\n".join(lines) + "\n", not args.no_write)


if __name__ == "__main__":
    main()
