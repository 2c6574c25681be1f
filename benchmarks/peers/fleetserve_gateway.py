"""fleetserve's own gateway (`fleetserve serve --no-launch`) with one routing policy, in front of engines
that are already running, launched exactly as the peers are."""

from __future__ import annotations

import sys
from pathlib import Path

import aiohttp

from peers.process import ReadyCheck, ServerSpec, all_of, completion_ok

FLEETSERVE = Path(sys.executable).with_name("fleetserve")


def fleetserve_gateway(fleet_file: Path, policy: str, port: int, host: str = "127.0.0.1") -> ServerSpec:
    argv = [str(FLEETSERVE), "serve", "-c", str(fleet_file), "--no-launch", "--policy", policy]
    argv += ["--port", str(port)]
    return ServerSpec(f"fleetserve {policy}", argv, f"http://{host}:{port}")


def all_engines_routable(engines: int) -> ReadyCheck:
    """The gateway routes to an engine only after a health probe; wait until it routes to all of them,
    so no policy starts a run with part of the fleet."""

    async def check(session: aiohttp.ClientSession, url: str) -> bool:
        async with session.get(url + "/metrics") as response:
            text = await response.text()
        routable = [
            line
            for line in text.splitlines()
            if line.startswith("fleetserve_engine_routable{") and line.rstrip().endswith(" 1.0")
        ]
        return len(routable) >= engines

    return check


def fleetserve_ready(model: str, engines: int) -> ReadyCheck:
    return all_of(all_engines_routable(engines), completion_ok(model))
