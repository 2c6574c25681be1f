"""The engine launcher with stand-in engines (a few lines of Python that serve HTTP and fork a worker):
readiness, start failures, SIGTERM then SIGKILL, asyncio use, and no orphan even when the process that
launched the engines is killed with SIGKILL."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.helpers import free_port, pid_alive, wait_until

from fleetserve.engines.launcher import EngineLauncher, EngineSpec, EngineStartError

# argv: port, mode, pid file. Writes "ENGINE_PID WORKER_PID" to the pid file, then serves
# /v1/models (mode "serve" or "ignore-term"), answers 404 forever ("never-ready"), or exits 3 ("crash").
FAKE_ENGINE = textwrap.dedent(
    """
    import http.server, os, signal, subprocess, sys
    port, mode, pid_file = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    if mode == "crash":
        print("fake engine: cannot load model", flush=True)
        sys.exit(3)
    if mode == "ignore-term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    with open(pid_file + ".tmp", "w") as out:
        out.write(f"{os.getpid()} {worker.pid}")
    os.replace(pid_file + ".tmp", pid_file)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            ok = self.path == "/v1/models" and mode != "never-ready"
            self.send_response(200 if ok else 404)
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()
    """
)


def fake_spec(tmp_path: Path, mode: str = "serve", name: str = "fake") -> EngineSpec:
    port = free_port()
    pid_file = tmp_path / f"{name}.pids"
    return EngineSpec(name, (sys.executable, "-c", FAKE_ENGINE, str(port), mode, str(pid_file)), port)


def pids_of(tmp_path: Path, name: str = "fake") -> tuple[int, int]:
    pid_file = tmp_path / f"{name}.pids"
    wait_until(pid_file.exists, timeout=20, message=f"{pid_file} written")
    engine, worker = pid_file.read_text().split()
    return int(engine), int(worker)


def gone(*pids: int) -> None:
    for pid in pids:
        wait_until(lambda pid=pid: not pid_alive(pid), timeout=15, message=f"process {pid} still running")


def test_context_manager_starts_ready_engines_and_stops_them_with_their_workers(tmp_path: Path) -> None:
    specs = [fake_spec(tmp_path, name="a"), fake_spec(tmp_path, name="b")]
    with EngineLauncher(specs, ready_timeout=30) as launcher:
        engines = launcher.engines
        assert [engine.name for engine in engines] == ["a", "b"]
        assert [engine.url for engine in engines] == [spec.url for spec in specs]
        pids = [*pids_of(tmp_path, "a"), *pids_of(tmp_path, "b")]
        assert {engine.pid for engine in engines} == {pids[0], pids[2]}
        assert all(pid_alive(pid) for pid in pids)
        assert launcher.exited() == []
    assert launcher.engines == []
    gone(*pids)


def test_an_engine_that_exits_during_startup_is_reported_with_its_log(tmp_path: Path) -> None:
    launcher = EngineLauncher(ready_timeout=30)
    with pytest.raises(EngineStartError, match=r"(?s)exited with code 3.*cannot load model"):
        launcher.start([fake_spec(tmp_path, mode="crash")])
    assert launcher.engines == []
    launcher.stop()


def test_an_engine_that_never_gets_ready_is_stopped_at_the_deadline(tmp_path: Path) -> None:
    launcher = EngineLauncher(ready_timeout=1.0)
    with pytest.raises(EngineStartError, match="not ready before the deadline: fake"):
        launcher.start([fake_spec(tmp_path, mode="never-ready")])
    gone(*pids_of(tmp_path))
    launcher.stop()


def test_stop_kills_an_engine_that_ignores_sigterm_after_the_grace_period(tmp_path: Path) -> None:
    launcher = EngineLauncher([fake_spec(tmp_path, mode="ignore-term")], ready_timeout=30, stop_grace=0.5)
    with launcher:
        engine_pid, worker_pid = pids_of(tmp_path)
    assert launcher.engines == []
    gone(engine_pid, worker_pid)


def test_async_context_manager_and_stopping_one_engine(tmp_path: Path) -> None:
    async def scenario() -> tuple[int, int]:
        async with EngineLauncher([fake_spec(tmp_path, name="a")], ready_timeout=30) as launcher:
            [added] = await launcher.astart([fake_spec(tmp_path, name="b")])
            assert [engine.name for engine in launcher.engines] == ["a", "b"]
            launcher.stop_engine(added)
            assert [engine.name for engine in launcher.engines] == ["a"]
            gone(*pids_of(tmp_path, "b"))
            return pids_of(tmp_path, "a")

    gone(*asyncio.run(scenario()))


def test_exited_lists_an_engine_that_died_after_startup(tmp_path: Path) -> None:
    with EngineLauncher([fake_spec(tmp_path)], ready_timeout=30) as launcher:
        engine_pid, worker_pid = pids_of(tmp_path)
        os.kill(engine_pid, signal.SIGKILL)
        [dead] = wait_until(launcher.exited, timeout=10, message="launcher notices the dead engine")
        assert dead.pid == engine_pid
    gone(worker_pid)


PARENT = textwrap.dedent(
    """
    import signal, sys
    from fleetserve.engines.launcher import EngineLauncher, EngineSpec
    port, pid_file = int(sys.argv[1]), sys.argv[2]
    fake = sys.argv[3]
    spec = EngineSpec("fake", (sys.executable, "-c", fake, str(port), "serve", pid_file), port)
    with EngineLauncher([spec]):
        print("ready", flush=True)
        signal.pause()
    """
)


@pytest.fixture
def parent_processes() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_engines_and_their_workers_die_when_the_launching_process_is_killed(
    tmp_path: Path, parent_processes: list[subprocess.Popen[str]]
) -> None:
    pid_file = tmp_path / "fake.pids"
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(free_port()), str(pid_file), FAKE_ENGINE],
        stdout=subprocess.PIPE,
        text=True,
    )
    parent_processes.append(parent)
    assert parent.stdout is not None and parent.stdout.readline() == "ready\n"
    engine_pid, worker_pid = pids_of(tmp_path)
    assert pid_alive(engine_pid) and pid_alive(worker_pid)
    parent.kill()
    parent.wait(timeout=10)
    # the engine dies of its parent-death signal, its worker by the watchdog's SIGKILL to the group
    gone(engine_pid, worker_pid)
