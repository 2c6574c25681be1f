"""The gateway's CPU time per streamed chunk: what the stream path costs, free of timing noise.

One emulated engine that answers at once (time scale 1e-6) behind `fleetserve serve --no-launch`;
`--requests` streamed completions of `--tokens` tokens each (one chunk per token), one at a time. The
figure is the gateway process's user + system CPU time over the run (from /proc) divided by the chunks
it relayed. Run it under `side_by_side.py` to compare two checkouts.

    python benchmarks/gateway_stream_cpu.py [--requests 200] [--tokens 256]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from pathlib import Path

import aiohttp
import yaml

from common import free_port
from gateway_overhead import FLEETSERVE, start, start_upstream, stop, wait_ready


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def stream_all(url: str, requests: int, tokens: int) -> int:
    body = {
        "model": "bench-model",
        "prompt": "hello",
        "max_tokens": tokens,
        "stream": True,
        "ignore_eos": True,
    }
    chunks = 0
    async with aiohttp.ClientSession() as session:
        for _ in range(requests):
            async with session.post(url + "/v1/completions", json=body) as response:
                text = await response.text()
                chunks += text.count('"text"')
    return chunks


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args()
    upstream_port, gateway_port = free_port(), free_port()
    upstream, model = start_upstream("emulator", upstream_port)
    with tempfile.TemporaryDirectory() as tmp:
        fleet = Path(tmp) / "fleet.yaml"
        engine = {"name": "e", "model": model, "url": f"http://127.0.0.1:{upstream_port}"}
        fleet.write_text(yaml.safe_dump({"engines": [engine], "gateway": {"port": gateway_port}}))
        gateway = start([str(FLEETSERVE), "serve", "-c", str(fleet), "--no-launch"])
        try:
            wait_ready(f"http://127.0.0.1:{upstream_port}/v1/models")
            url = f"http://127.0.0.1:{gateway_port}"
            wait_ready(url + "/ready")
            asyncio.run(stream_all(url, 10, args.tokens))  # warm up
            before = cpu_seconds(gateway.pid)
            chunks = asyncio.run(stream_all(url, args.requests, args.tokens))
            used = cpu_seconds(gateway.pid) - before
        finally:
            stop(gateway)
            stop(upstream)
    print(
        f"{chunks} chunks relayed; gateway CPU per streamed chunk: {used / chunks * 1e6:.2f} us",
        file=sys.stdout,
    )


if __name__ == "__main__":
    main()
