"""`fleetserve demo` end to end: the packaged emulated fleet behind the gateway, a short replay, the
per-engine table and the exit code; and the same with a real llama.cpp engine."""

from __future__ import annotations

import importlib.util
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from tests.helpers import free_port, pid_alive, wait_until

FLEETSERVE = Path(sys.executable).with_name("fleetserve")
DEMO_ENGINES = ["h100-0", "h100-1", "a100-0", "a100-1", "l4-0", "l4-1", "l4-2", "l4-3"]


def run_demo(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(FLEETSERVE), "demo", "--exit", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        start_new_session=True,
    )


def table_rows(output: str) -> dict[str, list[str]]:
    """Cells of the per-engine table, by engine id."""
    rows = {}
    for line in output.splitlines():
        cells = [cell.strip() for cell in line.strip("│ ").split("│")]
        if len(cells) > 2 and cells[0] in (*DEMO_ENGINES, "smollm2"):
            rows[cells[0]] = cells[1:]
    return rows


def test_demo_replays_the_trace_through_the_emulated_fleet_and_reports_per_engine() -> None:
    done = run_demo("--port", str(free_port()), "--requests", "24", "--rate-scale", "6")
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "starting 8 engines (2 x h100-80g, 2 x a100-80g, 4 x l4) serving llama-3-8b" in out
    assert "replaying 24 requests of the demo trace" in out
    assert "24/24 requests" in out

    rows = table_rows(out)
    assert list(rows) == DEMO_ENGINES
    assert [cells[0] for cells in rows.values()] == ["h100-80g"] * 2 + ["a100-80g"] * 2 + ["l4"] * 4
    # requests come from the gateway's counters and must add up to what the client sent
    assert sum(int(cells[1]) for cells in rows.values()) == 24
    # output tokens come from the engines' own /metrics; every engine that served something reports them
    served = [cells for cells in rows.values() if int(cells[1]) > 0]
    assert served and all(cells[2] != "-" and cells[3].endswith("ms") for cells in served)
    assert re.search(r"requests by GPU type: h100-80g \d+%, a100-80g \d+%, l4 \d+%", out)

    emulator = re.search(r"started 8 emulated engine\(s\) in pid (\d+)", out)
    assert emulator, out
    wait_until(lambda: not pid_alive(int(emulator.group(1))), timeout=15, message="emulator stopped")


def test_demo_on_a_busy_port_says_to_pick_another() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_demo("--port", str(port), timeout=60)
    assert done.returncode == 1
    assert f"port {port} on 127.0.0.1 is in use" in done.stderr and "--port" in done.stderr


@pytest.mark.llamacpp
@pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None,
    reason="llama_cpp is not importable: install the llama.cpp extra, pip install 'fleetserve[llamacpp]'",
)
def test_real_demo_gets_real_text_from_llamacpp() -> None:
    done = run_demo("--real", "--engines", "1", "--requests", "2", "--port", str(free_port()), timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "serving smollm2-135m" in out and "2/2 requests" in out
    assert table_rows(out)["smollm2"][:2] == ["cpu", "2"]
    # printed as a Python repr: in double quotes when the answer has an apostrophe
    answer = re.search(r"a real answer: (['\"])(.+)\1", out)
    assert answer and "no answer" not in answer.group(2) and len(answer.group(2).split()) >= 2
