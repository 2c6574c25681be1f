"""Real llama.cpp servers (llama-cpp-python) serving SmolLM2-135M, started by the launcher and by
`fleetserve engine llamacpp`, exercised with the official openai client, and stopped without orphans."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from openai import OpenAI
from tests.helpers import free_port, free_ports, pid_alive, wait_until

from fleetserve.engines.commands import llamacpp_replicas
from fleetserve.engines.launcher import EngineLauncher
from fleetserve.engines.smollm2 import SMOLLM2_ALIAS, smollm2_gguf_path

pytestmark = [
    pytest.mark.llamacpp,
    pytest.mark.skipif(
        importlib.util.find_spec("llama_cpp") is None,
        reason="llama_cpp is not importable: install the llama.cpp extra, pip install 'fleetserve[llamacpp]'",
    ),
]

N_CTX = 512
FLEETSERVE = str(Path(sys.executable).with_name("fleetserve"))


@pytest.fixture(scope="module")
def engine() -> Iterator[EngineLauncher]:
    spec = llamacpp_replicas(1, free_port(), alias=SMOLLM2_ALIAS, model_path=smollm2_gguf_path(), n_ctx=N_CTX)
    with EngineLauncher(spec, ready_timeout=120) as launcher:
        yield launcher


def client(launcher: EngineLauncher) -> OpenAI:
    return OpenAI(base_url=launcher.engines[0].url + "/v1", api_key="unused", timeout=60, max_retries=0)


def test_chat_completion_returns_real_text(engine: EngineLauncher) -> None:
    reply = client(engine).chat.completions.create(
        model=SMOLLM2_ALIAS,
        messages=[{"role": "user", "content": "Name a colour."}],
        max_tokens=8,
        temperature=0,
    )
    assert reply.model == SMOLLM2_ALIAS
    assert reply.choices[0].message.content and reply.choices[0].message.content.strip()
    assert reply.usage is not None and 0 < reply.usage.completion_tokens <= 8


def test_streaming_yields_several_chunks(engine: EngineLauncher) -> None:
    stream = client(engine).chat.completions.create(
        model=SMOLLM2_ALIAS,
        messages=[{"role": "user", "content": "Count from one to ten."}],
        max_tokens=12,
        temperature=0,
        stream=True,
    )
    pieces = [
        chunk.choices[0].delta.content for chunk in stream if chunk.choices and chunk.choices[0].delta.content
    ]
    assert len(pieces) >= 3
    assert "".join(pieces).strip()


def test_models_endpoint_lists_the_alias(engine: EngineLauncher) -> None:
    assert [model.id for model in client(engine).models.list()] == [SMOLLM2_ALIAS]


def test_stop_leaves_no_process_behind() -> None:
    spec = llamacpp_replicas(1, free_port(), alias=SMOLLM2_ALIAS, model_path=smollm2_gguf_path(), n_ctx=N_CTX)
    launcher = EngineLauncher(spec, ready_timeout=120)
    with launcher:
        pid = launcher.engines[0].pid
        assert pid_alive(pid)
    assert launcher.engines == []
    wait_until(lambda: not pid_alive(pid), timeout=10, message=f"llama.cpp server {pid} still running")


def start_cli(replicas: int) -> tuple[subprocess.Popen[str], list[int], list[str]]:
    """Run `fleetserve engine llamacpp` and read its `ready NAME URL pid PID` lines."""
    base_port = free_ports(replicas)
    process = subprocess.Popen(
        [FLEETSERVE, "engine", "llamacpp", "--replicas", str(replicas), "--base-port", str(base_port),
         "--n-ctx", str(N_CTX)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )  # fmt: skip
    pids, urls, lines = [], [], []
    assert process.stdout is not None
    for line in process.stdout:  # ends at EOF if the command dies, so this cannot hang on a crash
        lines.append(line)
        if line.startswith("ready "):
            _, _, url, _, pid = line.split()
            urls.append(url)
            pids.append(int(pid))
        if line.startswith("serving "):
            break
    assert len(pids) == replicas, "".join(lines)
    return process, pids, urls


@pytest.fixture
def cli_processes() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:  # only if a test failed half-way: never leave the command running
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.mark.skipif(not Path(FLEETSERVE).exists(), reason="the fleetserve console script is not installed")
def test_cli_serves_until_sigint_then_stops_its_servers(cli_processes: list[subprocess.Popen[str]]) -> None:
    process, pids, urls = start_cli(replicas=2)
    cli_processes.append(process)
    assert all(pid_alive(pid) for pid in pids)
    for url in urls:
        reply = OpenAI(base_url=url + "/v1", api_key="unused", timeout=60, max_retries=0).completions.create(
            model=SMOLLM2_ALIAS, prompt="The sky is", max_tokens=4, temperature=0
        )
        assert reply.choices[0].text
    process.send_signal(signal.SIGINT)
    out, _ = process.communicate(timeout=30)
    assert process.returncode == 0, out
    assert "stopped" in out
    for pid in pids:
        wait_until(lambda pid=pid: not pid_alive(pid), timeout=10, message=f"server {pid} outlived the CLI")


@pytest.mark.skipif(not Path(FLEETSERVE).exists(), reason="the fleetserve console script is not installed")
def test_servers_die_when_the_cli_is_killed(cli_processes: list[subprocess.Popen[str]]) -> None:
    process, pids, _ = start_cli(replicas=1)
    cli_processes.append(process)
    process.kill()
    process.wait(timeout=10)
    for pid in pids:
        wait_until(
            lambda pid=pid: not pid_alive(pid), timeout=10, message=f"server {pid} orphaned by SIGKILL"
        )
