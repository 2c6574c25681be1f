"""Real processes for gateway tests: controllable upstream engines and a `fleetserve serve` gateway."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from tests.helpers import free_port, free_ports, wait_until

UPSTREAM = Path(__file__).with_name("upstream_server.py")
FLEETSERVE = Path(sys.executable).with_name("fleetserve")


@dataclass
class Process:
    popen: subprocess.Popen[bytes]
    url: str
    name: str

    def kill(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(timeout=10)


@dataclass
class Processes:
    """Starts processes in their own process groups and kills every group at teardown."""

    tmp_path: Path
    started: list[Process] = field(default_factory=list)

    def upstream(
        self, name: str, model: str = "test-model", adapters: tuple[str, ...] = (), chunk_delay_ms: float = 5
    ) -> Process:
        port = free_port()
        argv = [sys.executable, str(UPSTREAM), "--port", str(port), "--model", model, "--name", name]
        argv += ["--chunk-delay-ms", str(chunk_delay_ms)]
        for adapter in adapters:
            argv += ["--adapter", adapter]
        process = self._spawn(argv, f"http://127.0.0.1:{port}", name)
        wait_until(lambda: answers(process.url + "/v1/models"), timeout=20, message=f"{name} up")
        return process

    def emulated(
        self, name: str, gpu: str = "l4", model: str = "llama-3-8b", time_scale: float = 1.0
    ) -> Process:
        """One `fleetserve engine emulate` process (one engine): a real engine to kill with SIGKILL."""
        port = free_port()
        argv = [str(FLEETSERVE), "engine", "emulate", "--gpu", gpu, "--model", model, "--port", str(port)]
        argv += ["--time-scale", str(time_scale)]
        process = self._spawn(argv, f"http://127.0.0.1:{port}", name)
        wait_until(lambda: answers(process.url + "/v1/models"), timeout=30, message=f"{name} up")
        return process

    def gateway(
        self,
        engines: list[Process | dict[str, Any]],
        router: dict | None = None,
        fleet_extra: dict[str, Any] | None = None,
        **gateway: Any,
    ) -> Process:
        """`fleet_extra`: more top-level keys of the fleet file (tenants, auth, redis, pipeline)."""
        port = free_port()
        fleet = {
            "engines": [
                engine
                if isinstance(engine, dict)
                else {"name": engine.name, "model": "test-model", "url": engine.url, "dialect": "vllm"}
                for engine in engines
            ],
            "router": {"debug_header": True, **(router or {})},
            "gateway": {"health_interval_s": 0.2, "scrape_interval_s": 0.2, **gateway},
            **(fleet_extra or {}),
        }
        path = self.tmp_path / f"fleet-{port}.yaml"
        path.write_text(yaml.safe_dump(fleet))
        argv = [str(FLEETSERVE), "serve", "-c", str(path), "--port", str(port), "--no-launch"]
        process = self._spawn(argv, f"http://127.0.0.1:{port}", "gateway")
        wait_until(lambda: answers(process.url + "/ready"), timeout=30, message="gateway ready")
        return process

    def redis(self, port: int | None = None) -> Process:
        """A real `redis-server` (Debian's) on a free loopback port, keeping nothing on disk."""
        port = port or free_port()
        argv = [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ]
        process = self._spawn(argv, f"redis://127.0.0.1:{port}/0", "redis")
        wait_until(lambda: redis_answers(port), timeout=20, message="redis-server up")
        return process

    def _spawn(self, argv: list[str], url: str, name: str) -> Process:
        log = (self.tmp_path / f"{name}-{len(self.started)}.log").open("wb")
        popen = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        process = Process(popen, url, name)
        self.started.append(process)
        return process

    def close(self) -> None:
        for process in reversed(self.started):
            process.kill()


def running_processes(tmp_path: Path) -> Iterator[Processes]:
    """Body of a test module's `procs` fixture."""
    processes = Processes(tmp_path)
    try:
        yield processes
    finally:
        processes.close()


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def redis_answers(port: int) -> bool:
    """True once a Redis server on the port answers PING (spoken in RESP over a plain socket)."""
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as connection:
            connection.sendall(b"PING\r\n")
            return connection.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def post_json(url: str, payload: object) -> Any:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())


def control(upstream: Process, **state: Any) -> None:
    post_json(upstream.url + "/control", state)


def metric_value(gateway: Process, name: str, **labels: str) -> float | None:
    """The sum of the gateway's /metrics samples of `name` that carry `labels`, or None when absent."""
    with urllib.request.urlopen(gateway.url + "/metrics", timeout=5) as response:
        text = response.read().decode()
    total = None
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        series, _, value = line.rpartition(" ")
        if series.split("{")[0] != name:
            continue
        if all(f'{key}="{wanted}"' in series for key, wanted in labels.items()):
            total = float(value) + (total or 0.0)
    return total


class Serve:
    """A `fleetserve serve` process in its own session, with its output in a file."""

    def __init__(self, tmp_path: Path, fleet: dict[str, object], *args: str) -> None:
        self.config = tmp_path / "fleet.yaml"
        self.config.write_text(yaml.safe_dump(fleet))
        self.log = tmp_path / "serve.log"
        self.tmp = tmp_path / "tmp"  # serve's temporary files (the emulator's fleet file, engine logs)
        self.tmp.mkdir()
        with self.log.open("wb") as out:
            self.popen = subprocess.Popen(
                [str(FLEETSERVE), "serve", "-c", str(self.config), *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, "TMPDIR": str(self.tmp)},
            )

    def output(self) -> str:
        return self.log.read_text()

    def descendants(self) -> set[int]:
        """Every process below serve, read from /proc (children of each of its threads, recursively)."""
        found: set[int] = set()
        pending = [self.popen.pid]
        while pending:
            pid = pending.pop()
            for children in Path(f"/proc/{pid}/task").glob("*/children"):
                try:
                    kids = {int(child) for child in children.read_text().split()}
                except OSError:
                    continue
                pending += sorted(kids - found)
                found |= kids
        return found

    def kill(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(timeout=10)


def fleet_with_admin(engines: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """A fleet file (as a dict) for `engines` with the gateway, its admin API and the emulated engines
    on free ports, probing health every 0.2 s; `extra` adds or replaces top-level keys."""
    return {
        "engines": engines,
        "emulator": {"base_port": free_ports(4)},
        "gateway": {"port": free_port(), "health_interval_s": 0.2, "admin_port": free_port()},
        **extra,
    }


def start_serve(
    tmp_path: Path, fleet: dict[str, Any], *args: str, ready_path: str = "/ready"
) -> tuple[Serve, str, str]:
    """`fleetserve serve` on `fleet` (see `fleet_with_admin`), once `ready_path` answers: the process,
    the gateway's URL and the admin API's."""
    serve = Serve(tmp_path, fleet, *args)
    url = f"http://127.0.0.1:{fleet['gateway']['port']}"
    admin = f"http://127.0.0.1:{fleet['gateway']['admin_port']}"
    wait_until(lambda: answers(url + ready_path), timeout=120, message="gateway up:\n" + serve.output())
    return serve, url, admin


@contextlib.contextmanager
def emulated_gateway(tmp_path: Path, group: dict[str, Any]) -> Iterator[str]:
    """`fleetserve serve` over `group["replicas"]` emulated engines of one group on free ports; yields the
    gateway's URL once it is ready, and kills everything on exit."""
    port = free_port()
    fleet = {
        "engines": [group],
        "emulator": {"base_port": free_ports(int(group.get("replicas", 1)))},
        "gateway": {"port": port, "health_interval_s": 0.2},
    }
    serve = Serve(tmp_path, fleet)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: answers(url + "/ready"), timeout=60, message="gateway ready:\n" + serve.output())
        yield url
    finally:
        serve.kill()
