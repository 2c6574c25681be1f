"""What the tenant stages cost on the request path: auth + quotas (Redis on loopback) + VTC, against the
same gateway without them, side by side over one instant upstream.

Two `fleetserve serve --no-launch` processes: `plain` (no tenants) and `tenants` (`auth.required`, a
key, rpm/tpm/in-flight limits too high to bite, quotas shared through a local redis-server, the `vtc`
stage with room to spare, so every request pays for every check and none waits). Requests alternate
between the two, one at a time (the gateway's own cost, without queueing), then in open-loop windows
at `--rate`; figures are the added p50/p99 of `tenants` over `plain`, medians over rounds.

    python benchmarks/tenant_overhead.py                  # ~1 min
    python benchmarks/tenant_overhead.py --rounds 5 --no-write
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import yaml

from common import free_port, publish, section_head, start_redis
from gateway_overhead import REQUEST, percentile, start, start_upstream, stop, wait_ready

FLEETSERVE = Path(sys.executable).with_name("fleetserve")
KEY = "sk-bench-tenant-overhead-0123456789"
SEQUENTIAL = 1000


def fleet(upstream: str, port: int, redis_url: str | None) -> dict:
    document: dict = {
        "engines": [{"name": "upstream", "model": "bench-model", "url": upstream, "dialect": "none"}],
        "gateway": {"port": port, "max_queue": 100000},
    }
    if redis_url is not None:
        limits = {"rpm": 10**8, "tpm": 10**10, "max_in_flight": 10**6}
        document |= {
            "auth": {"required": True},
            "redis": {"url": redis_url},
            "tenants": [
                {"name": "bench", "key_sha256": [hashlib.sha256(KEY.encode()).hexdigest()], "limits": limits}
            ],
            "pipeline": [{"stage": "vtc", "params": {"slots_per_engine": 100000}}],
        }
    return document


HEADERS = {"content-type": "application/json", "authorization": f"Bearer {KEY}"}


async def timed(session: aiohttp.ClientSession, url: str) -> float:
    started = time.perf_counter()
    async with session.post(url, data=REQUEST, headers=HEADERS) as response:
        await response.read()
        if response.status != 200:
            raise RuntimeError(f"{url} answered {response.status}")
    return (time.perf_counter() - started) * 1000


async def one_at_a_time(urls: dict[str, str]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {name: [] for name in urls}
    async with aiohttp.ClientSession() as session:
        for index in range(2 * SEQUENTIAL):
            name = list(urls)[index % 2]
            out[name].append(await timed(session, urls[name]))
    return out


async def open_loop(session: aiohttp.ClientSession, url: str, rate: float, duration: float) -> list[float]:
    loop = asyncio.get_running_loop()
    start_at = loop.time()
    tasks = []
    for index in range(int(rate * duration)):
        delay = start_at + index / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(timed(session, url)))
    return list(await asyncio.gather(*tasks))


async def windows(
    urls: dict[str, str], rate: float, duration: float, rounds: int
) -> dict[str, list[tuple[float, float]]]:
    out: dict[str, list[tuple[float, float]]] = {name: [] for name in urls}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        for url in urls.values():
            await open_loop(session, url, 50, 0.5)  # warm the pools
        for _ in range(rounds):
            for name, url in urls.items():
                latencies = await open_loop(session, url, rate, duration)
                out[name].append((percentile(latencies, 0.5), percentile(latencies, 0.99)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=float, default=200.0, help="Open-loop requests per second.")
    parser.add_argument("--duration", type=float, default=4.0, help="Seconds per window.")
    parser.add_argument("--rounds", type=int, default=3, help="Alternating plain/tenants window pairs.")
    parser.add_argument("--no-write", action="store_true", help="Do not append to docs/benchmarks.md.")
    args = parser.parse_args()
    upstream_port, redis_port = free_port(), free_port()
    upstream, _ = start_upstream("raw", upstream_port)
    redis, redis_url = start_redis(redis_port)
    upstream_url = f"http://127.0.0.1:{upstream_port}"
    gateways = []
    try:
        wait_ready(upstream_url + "/v1/models")
        urls = {}
        with tempfile.TemporaryDirectory() as work:
            for name, shared in (("plain", None), ("tenants", redis_url)):
                port = free_port()
                path = Path(work) / f"{name}.yaml"
                path.write_text(yaml.safe_dump(fleet(upstream_url, port, shared)))
                gateways.append(start([str(FLEETSERVE), "serve", "-c", str(path), "--no-launch"]))
                wait_ready(f"http://127.0.0.1:{port}/ready")
                urls[name] = f"http://127.0.0.1:{port}/v1/chat/completions"
            sequential = asyncio.run(one_at_a_time(urls))
            loaded = asyncio.run(windows(urls, args.rate, args.duration, args.rounds))
    finally:
        for gateway in gateways:
            stop(gateway)
        stop(upstream)
        stop(redis)
    seq = {name: (percentile(v, 0.5), percentile(v, 0.99)) for name, v in sequential.items()}
    med = {
        name: (statistics.median(p50 for p50, _ in v), statistics.median(p99 for _, p99 in v))
        for name, v in loaded.items()
    }
    added_seq = (seq["tenants"][0] - seq["plain"][0], seq["tenants"][1] - seq["plain"][1])
    added_load = (med["tenants"][0] - med["plain"][0], med["tenants"][1] - med["plain"][1])
    section = "\n".join(
        [
            *section_head(
                "Tenant stages on the request path: auth + quotas (Redis) + VTC, side by side",
                "tenant_overhead.py",
            ),
            "- setup: two gateways over one instant upstream, `plain` and `tenants` (key check, "
            "rpm/tpm/in-flight limits counted in a loopback redis-server by Lua scripts, the `vtc` "
            "stage), non-streaming chat",
            f"- one at a time ({SEQUENTIAL} each, interleaved): plain p50 {seq['plain'][0]:.2f} / p99 "
            f"{seq['plain'][1]:.2f} ms, tenants p50 {seq['tenants'][0]:.2f} / p99 "
            f"{seq['tenants'][1]:.2f} ms: "
            f"**added p50 {added_seq[0]:.2f} ms, p99 {added_seq[1]:.2f} ms**",
            f"- open loop at {args.rate:g} req/s ({args.rounds} alternating {args.duration:g} s windows, "
            f"medians): plain p50 {med['plain'][0]:.2f} / p99 {med['plain'][1]:.2f} ms, tenants p50 "
            f"{med['tenants'][0]:.2f} / p99 {med['tenants'][1]:.2f} ms: added p50 {added_load[0]:.2f} ms, "
            f"p99 {added_load[1]:.2f} ms",
            "",
        ]
    )
    publish(section, not args.no_write)


if __name__ == "__main__":
    main()
