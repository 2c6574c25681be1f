"""One requests-per-minute limit enforced by two gateway replicas through one Redis.

Two `fleetserve serve --no-launch` processes in front of the same instant upstream, one tenant limited
to `--rpm` requests per minute, hammered through both replicas at once for `--duration` seconds by
closed-loop clients. Admitted requests are counted per calendar minute (the minutes wholly inside the
run) and compared with the limit; then the same without `redis:`, where each replica counts alone (as
LiteLLM's in-memory limits do: N replicas, N times the limit).

    python benchmarks/tenant_quota_replicas.py             # ~5 min
    python benchmarks/tenant_quota_replicas.py --duration 125 --no-write
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import math
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import orjson
import yaml

from common import free_port, publish, section_head, start_redis
from gateway_overhead import start, start_upstream, stop, wait_ready

FLEETSERVE = Path(sys.executable).with_name("fleetserve")
KEY = "sk-bench-quota-replicas-0123456789"
CLIENTS_PER_REPLICA = 4
BODY = orjson.dumps(
    {"model": "bench-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
)


def fleet(upstream: str, rpm: int, redis_url: str | None, port: int) -> dict:
    document: dict = {
        "engines": [{"name": "upstream", "model": "bench-model", "url": upstream, "dialect": "none"}],
        "gateway": {"port": port, "max_queue": 100000},
        "auth": {"required": True},
        "tenants": [
            {
                "name": "hammer",
                "key_sha256": [hashlib.sha256(KEY.encode()).hexdigest()],
                "limits": {"rpm": rpm},
            }
        ],
    }
    if redis_url is not None:
        document["redis"] = {"url": redis_url}
    return document


async def hammer(urls: list[str], duration_s: float) -> list[float]:
    """Wall-clock times of admitted (200) answers, from closed-loop clients on every replica."""
    admitted: list[float] = []
    deadline = time.monotonic() + duration_s
    headers = {"content-type": "application/json", "authorization": f"Bearer {KEY}"}

    async def client(session: aiohttp.ClientSession, url: str) -> None:
        while time.monotonic() < deadline:
            async with session.post(url, data=BODY, headers=headers) as response:
                await response.read()
                if response.status == 200:
                    admitted.append(time.time())

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        await asyncio.gather(*(client(session, url) for url in urls for _ in range(CLIENTS_PER_REPLICA)))
    return admitted


def full_minutes(admitted: list[float], started: float, ended: float) -> list[int]:
    first, last = math.ceil(started / 60), math.floor(ended / 60)  # minutes wholly inside the run
    counts = dict.fromkeys(range(first, last), 0)
    for when in admitted:
        minute = math.floor(when / 60)
        if minute in counts:
            counts[minute] += 1
    return list(counts.values())


def run_mode(upstream: str, rpm: int, redis_url: str | None, duration_s: float, work: Path) -> list[int]:
    gateways = []
    try:
        urls = []
        for index in range(2):
            port = free_port()
            path = work / f"fleet-{index}-{'redis' if redis_url else 'local'}.yaml"
            path.write_text(yaml.safe_dump(fleet(upstream, rpm, redis_url, port)))
            gateways.append(start([str(FLEETSERVE), "serve", "-c", str(path), "--no-launch"]))
            wait_ready(f"http://127.0.0.1:{port}/ready")
            urls.append(f"http://127.0.0.1:{port}/v1/chat/completions")
        started = time.time()
        admitted = asyncio.run(hammer(urls, duration_s))
        return full_minutes(admitted, started, time.time())
    finally:
        for gateway in gateways:
            stop(gateway)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rpm", type=int, default=600, help="The tenant's requests-per-minute limit.")
    parser.add_argument("--duration", type=float, default=130.0, help="Seconds per mode (>= 120).")
    parser.add_argument("--no-write", action="store_true", help="Do not append to docs/benchmarks.md.")
    args = parser.parse_args()
    upstream_port, redis_port = free_port(), free_port()
    upstream, _ = start_upstream("raw", upstream_port)
    redis, redis_url = start_redis(redis_port)
    upstream_url = f"http://127.0.0.1:{upstream_port}"
    try:
        wait_ready(upstream_url + "/v1/models")
        with tempfile.TemporaryDirectory() as work:
            shared = run_mode(upstream_url, args.rpm, redis_url, args.duration, Path(work))
            print(f"with Redis: admitted per full minute {shared}", flush=True)
            alone = run_mode(upstream_url, args.rpm, None, args.duration, Path(work))
            print(f"without Redis: admitted per full minute {alone}", flush=True)
    finally:
        stop(upstream)
        stop(redis)

    def describe(counts: list[int]) -> str:
        if not counts:
            return "no full minute (run longer)"
        worst = max(abs(count - args.rpm) / args.rpm for count in counts)
        return f"{', '.join(map(str, counts))} (worst {100 * worst:.1f}% off the limit)"

    section = "\n".join(
        [
            *section_head("Tenant quotas: one limit across two gateway replicas", "tenant_quota_replicas.py"),
            "- setup: two `fleetserve serve --no-launch` replicas over one instant upstream, one tenant "
            f"limited to {args.rpm} requests per minute, {CLIENTS_PER_REPLICA} closed-loop clients per "
            f"replica for {args.duration:g} s; admitted requests counted per calendar minute wholly "
            "inside the run",
            f"- **with one Redis (`redis:`): {describe(shared)}**",
            f"- without Redis (limits per replica, as LiteLLM's in-memory limiter): {describe(alone)}",
            "",
        ]
    )
    publish(section, not args.no_write)


if __name__ == "__main__":
    main()
