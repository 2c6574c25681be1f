"""What a new user runs in the first hour, through the real console script: the README's multi-tenant
workload on the example fleet, a capacity search that cannot succeed, rates that say what they count,
reports that say where they went, and engines that move with --engine-base-port."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.helpers import free_port, free_ports, wait_until
from tests.integration.gateway_harness import Serve, answers

REPO = Path(__file__).resolve().parents[2]
FLEETSERVE = Path(sys.executable).with_name("fleetserve")
HETERO = REPO / "examples" / "hetero-fleet.yaml"
README_WORKLOAD = [
    "--rate",
    "5",
    "--duration",
    "600",
    "--sessions",
    "4",
    "--tenants",
    "8",
    "--system-prompt",
    "2048",
    "--max-input",
    "6144",
    "--max-output",
    "1024",
]


def fleetserve(*args: str | Path, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(FLEETSERVE), *map(str, args)], capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="module")
def chat_trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("first_hour") / "chat.jsonl"
    done = fleetserve("workload", "gen", *README_WORKLOAD, "-o", path)
    assert done.returncode == 0, done.stderr
    # the generator says what it produced, and why that is below what was asked
    offered = re.search(
        r"wrote (\d+) requests to .*: ([\d.]+) req/s offered over (\d+) s \(asked for 5 req/s", done.stderr
    )
    assert offered, done.stderr
    assert float(offered.group(2)) < 5
    return path


def simulate(trace: Path, policy: str, tmp_path: Path) -> dict:
    out = tmp_path / f"{policy}.json"
    done = fleetserve("sim", "-c", HETERO, "--trace", trace, "--policy", policy, "--json", out, "-q")
    assert done.returncode == 0, done.stderr
    return json.loads(out.read_text())


def test_prefix_aware_keeps_every_engine_working_on_the_readme_workload(
    chat_trace: Path, tmp_path: Path
) -> None:
    flagship = simulate(chat_trace, "prefix_aware", tmp_path)
    baseline = simulate(chat_trace, "least_request", tmp_path)
    idle = [engine for engine, stats in flagship["per_engine"].items() if stats["requests"] == 0]
    assert idle == []  # before the bounded-load fix: 7 of 16, three of the four H100s among them
    assert flagship["slo_attainment"] >= baseline["slo_attainment"] - 0.01
    assert flagship["prefix_hit_rate"] > baseline["prefix_hit_rate"]  # and it still caches better
    load = flagship["load_over_time"]
    assert load["idle_while_queued_samples"] <= 0.02 * len(load["t_s"])


def test_sim_reports_rates_with_their_windows_and_failures_in_words(chat_trace: Path, tmp_path: Path) -> None:
    report = tmp_path / "report.html"
    done = fleetserve("sim", "-c", HETERO, "--trace", chat_trace, "--limit", 300, "--report", report, "-q")
    assert done.returncode == 0, done.stderr
    assert f"wrote the HTML report to {report}" in done.stderr and report.stat().st_size > 0
    assert "offered rate" in done.stdout and "achieved rate" in done.stdout and "(over the run" in done.stdout
    summary = simulate(chat_trace, "least_request", tmp_path)
    assert summary["offered_rps"] == pytest.approx(2.9, rel=0.1)
    assert summary["achieved_rps"] < summary["offered_rps"]  # the drain is in its window
    assert set(summary["rate_windows"]) >= {"offered_rps", "achieved_rps", "goodput_rps"}


def test_capacity_search_stops_when_no_rate_can_meet_the_target(tmp_path: Path) -> None:
    trace = tmp_path / "long.jsonl"
    # every other prompt is longer than llama-3-8b's 8k context: attainment can never pass 50%
    trace.write_text(
        "".join(
            json.dumps({"timestamp": 200 * i, "input_length": 9000 if i % 2 else 500, "output_length": 20})
            + "\n"
            for i in range(200)
        )
    )
    done = fleetserve("sim", "capacity", "-c", HETERO, "--trace", trace, "--target", 0.9)
    assert done.returncode == 1
    assert len(re.findall(r"^probe ", done.stderr, re.MULTILINE)) == 1, done.stderr
    assert "at most 50.0% at any rate" in done.stderr and "100 x engine_rejected" in done.stderr
    assert "--max-input" in done.stderr and "Traceback" not in done.stderr
    cut = tmp_path / "cut.jsonl"
    assert fleetserve("workload", "convert", trace, "--max-input", 7000, "-o", cut).returncode == 0
    fits = fleetserve("sim", "capacity", "-c", HETERO, "--trace", cut, "--target", 0.9, "--json", "-q")
    assert fits.returncode == 0, fits.stderr
    result = json.loads(fits.stdout.strip().splitlines()[-1])
    assert result["capacity_rps"] > 0 and any(probe["stopped_early"] for probe in result["probes"])


def test_sweep_prints_a_header(chat_trace: Path) -> None:
    done = fleetserve(
        "sim", "sweep", "-c", HETERO, "--trace", chat_trace, "--limit", 200, "--policies", "least_request",
        "--rates", "2", "--workers", "1", "-q",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    header, row = done.stdout.splitlines()[:2]
    assert header.split()[:3] == ["fleet", "policy", "offered"] and "least_request" in row


@pytest.fixture
def serving(tmp_path: Path) -> Iterator[list[Serve]]:
    started: list[Serve] = []
    yield started
    for serve in started:
        serve.kill()


def test_serve_moves_its_engines_with_engine_base_port(tmp_path: Path, serving: list[Serve]) -> None:
    base, port = free_ports(2), free_port()
    fleet = {
        "engines": [{"name": "l4", "gpu": "l4", "model": "llama-3-8b", "replicas": 2}],
        "gateway": {"port": port},
    }  # emulator.base_port stays at its default: the flag alone moves the engines
    serve = Serve(tmp_path, fleet, "--engine-base-port", str(base))
    serving.append(serve)
    wait_until(lambda: answers(f"http://127.0.0.1:{port}/ready"), timeout=60, message=serve.output())
    assert f"l4-0@{base}, l4-1@{base + 1}" in serve.output()
    assert answers(f"http://127.0.0.1:{base + 1}/health")


def test_engine_emulate_defaults_clear_of_the_gateway_port() -> None:
    done = fleetserve("engine", "emulate", "--help")
    assert re.search(r"--port .*\[default: 8100", " ".join(done.stdout.split()))
