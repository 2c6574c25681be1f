"""`fleetserve serve -c fleet.yaml` launching its engines: emulated ones in one child process, traffic
through the gateway with the official client, and no process left behind after SIGINT or SIGKILL."""

from __future__ import annotations

import re
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from tests.helpers import free_port, free_ports, pid_alive, wait_until
from tests.integration.gateway_harness import Serve, answers

FLEETSERVE = Path(sys.executable).with_name("fleetserve")
MESSAGES = [{"role": "user", "content": "Which GPU should serve me?"}]


@pytest.fixture
def started(tmp_path: Path) -> Iterator[list[Serve]]:
    processes: list[Serve] = []
    yield processes
    for process in processes:
        process.kill()


def emulated_fleet(base_port: int, gateway_port: int) -> dict[str, object]:
    engines = [
        {"name": "h100", "model": "llama-3-8b", "gpu": "h100-80g", "time_scale": 0.05},
        {"name": "l4", "model": "llama-3-8b", "gpu": "l4", "replicas": 2, "time_scale": 0.05},
    ]
    return {
        "engines": engines,
        "emulator": {"base_port": base_port},
        "gateway": {"port": gateway_port, "health_interval_s": 0.2, "scrape_interval_s": 0.2},
    }


def all_gone(pids: set[int]) -> bool:
    return not any(pid_alive(pid) for pid in pids)


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_serve_launches_emulated_engines_and_a_signal_stops_everything(
    tmp_path: Path, started: list[Serve], stop_signal: signal.Signals
) -> None:
    base, port = free_ports(3), free_port()
    serve = Serve(tmp_path, emulated_fleet(base, port))
    started.append(serve)
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: "listening on" in serve.output(), timeout=60, message="gateway listening")

    launched = re.search(r"started 3 emulated engine\(s\) in pid (\d+): (.*)", serve.output())
    assert launched, serve.output()
    assert launched.group(2) == f"h100@{base}, l4-0@{base + 1}, l4-1@{base + 2}"
    emulator_pid = int(launched.group(1))
    children = serve.descendants()
    assert emulator_pid in children
    # The engines were ready before the gateway listened: each answers on its own port right away.
    assert all(answers(f"http://127.0.0.1:{base + offset}/health") for offset in range(3))

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    wait_until(lambda: answers(url + "/ready"), timeout=20, message="gateway ready")
    assert [model.id for model in client.models.list()] == ["llama-3-8b"]
    reply = client.chat.completions.create(model="llama-3-8b", messages=MESSAGES, max_tokens=8)
    assert reply.usage is not None and reply.usage.completion_tokens == 8
    stream = client.chat.completions.create(model="llama-3-8b", messages=MESSAGES, max_tokens=5, stream=True)
    assert sum(1 for chunk in stream if chunk.choices and chunk.choices[0].delta.content) == 5

    assert list(serve.tmp.iterdir())
    serve.popen.send_signal(stop_signal)
    assert serve.popen.wait(timeout=30) == 0, serve.output()
    wait_until(lambda: all_gone(children), timeout=15, message=f"children {children} still running")
    assert not answers(f"http://127.0.0.1:{base}/health")
    assert list(serve.tmp.iterdir()) == []


def test_sigkill_of_serve_takes_its_engines_down(tmp_path: Path, started: list[Serve]) -> None:
    base, port = free_ports(1), free_port()
    fleet = emulated_fleet(base, port)
    fleet["engines"] = fleet["engines"][:1]  # type: ignore[index]
    serve = Serve(tmp_path, fleet)
    started.append(serve)
    wait_until(lambda: "listening on" in serve.output(), timeout=60, message="gateway listening")
    children = serve.descendants()
    assert children

    serve.popen.kill()
    serve.popen.wait(timeout=10)
    wait_until(lambda: all_gone(children), timeout=15, message=f"orphans {children} after SIGKILL")


def test_engines_that_cannot_run_here_fail_up_front(tmp_path: Path, started: list[Serve]) -> None:
    fleet = {
        "engines": [{"name": "big", "kind": "vllm", "model": "llama-3-70b", "gpu": "h100-80g", "tp": 4}],
        "emulator": {"base_port": free_port()},
        "gateway": {"port": free_port()},
    }
    serve = Serve(tmp_path, fleet)
    started.append(serve)
    assert serve.popen.wait(timeout=30) == 1
    message = serve.output()
    assert "cannot launch engine big (vllm)" in message
    assert "`vllm` is not installed" in message and "url:" in message


def test_busy_ports_are_reported_with_what_to_change(tmp_path: Path, started: list[Serve]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        on_engine = Serve(tmp_path, emulated_fleet(busy, free_port()))
        started.append(on_engine)
        assert on_engine.popen.wait(timeout=30) == 1
        assert f"engine port(s) {busy}" in on_engine.output()
        assert "emulator.base_port" in on_engine.output()

        (tmp_path / "gateway").mkdir()
        on_gateway = Serve(tmp_path / "gateway", emulated_fleet(free_ports(3), busy))
        started.append(on_gateway)
        assert on_gateway.popen.wait(timeout=30) == 1
        assert f"gateway port {busy}" in on_gateway.output() and "--port" in on_gateway.output()
