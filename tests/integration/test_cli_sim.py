"""The real `fleetserve sim` console script on subsets of the shared traces."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = Path(os.environ.get("FLEETSERVE_SHARED_DATA", REPO.parent / "shared" / "data"))
AZURE_CONV = SHARED_DATA / "traces" / "azure_llm_2023_conv.csv"
MOONCAKE = SHARED_DATA / "traces" / "mooncake_conversation.jsonl"
FLEETSERVE = Path(sys.executable).with_name("fleetserve")

pytestmark = pytest.mark.skipif(
    not AZURE_CONV.exists() or not MOONCAKE.exists(), reason=f"shared traces not found under {SHARED_DATA}"
)

FLEET = """
engines:
  - {name: h100, gpu: h100-80g, model: llama-3-8b}
  - {name: l4, gpu: l4, model: llama-3-8b, replicas: 2}
router: {policy: least_request}
slo: {ttft_ms: 2000, tpot_ms: 150}
"""

SUMMARY_KEYS = {
    "requests", "ttft_ms", "tpot_ms", "e2e_ms", "itl_ms", "slo_attainment", "goodput_rps",
    "throughput_tok_s", "prefix_hit_rate", "cost_usd", "cost_per_million_tokens_usd", "wall_s",
    "sim_requests_per_s", "preemptions", "per_engine", "policy", "fleet", "failed", "failures",
}  # fmt: skip


@pytest.fixture
def fleet_file(tmp_path: Path) -> Path:
    path = tmp_path / "fleet.yaml"
    path.write_text(FLEET)
    return path


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(FLEETSERVE), "sim", *map(str, args)], capture_output=True, text=True, timeout=120, check=False
    )


def test_sim_writes_json_and_report(fleet_file: Path, tmp_path: Path) -> None:
    out, report = tmp_path / "out.json", tmp_path / "out.html"
    done = run("-c", fleet_file, "--trace", AZURE_CONV, "--limit", 300, "--json", out, "--report", report)
    assert done.returncode == 0, done.stderr
    summary = json.loads(out.read_text())
    assert summary.keys() >= SUMMARY_KEYS
    assert summary["requests"] == 300
    assert summary["completed"] + summary["failed"] == 300
    for key in ("ttft_ms", "tpot_ms", "e2e_ms", "itl_ms"):
        assert set(summary[key]) == {"p50", "p90", "p99", "mean"}
        assert summary[key]["p50"] <= summary[key]["p99"]
    assert set(summary["per_engine"]) == {"h100", "l4-0", "l4-1"}
    assert sum(e["requests"] for e in summary["per_engine"].values()) == summary["completed"]
    assert 0 < summary["slo_attainment"] <= 1
    assert summary["cost_usd"] > 0
    page = report.read_text()
    assert page.count("data:image/png;base64,") >= 2
    assert "least_request" in page


def test_sim_json_on_stdout_and_prefix_hits_on_mooncake(fleet_file: Path) -> None:
    done = run("-c", fleet_file, "--trace", MOONCAKE, "--limit", 150, "--policy", "round_robin", "--json")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1
    summary = json.loads(lines[0])
    assert summary["policy"] == "round_robin"
    assert summary["prefix_hit_rate"] > 0  # Mooncake conversations share prefixes


def test_capacity_prints_one_json_line(fleet_file: Path) -> None:
    done = run(
        "capacity", "-c", fleet_file, "--trace", AZURE_CONV, "--limit", 150, "--policy", "least_request",
        "--target", 0.9, "--tolerance", 0.1, "--json", "-q",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result["capacity_rps"] > 0
    assert result["slo_attainment"] >= 0.9
    failing = [p for p in result["probes"] if p["slo_attainment"] < 0.9]
    assert all(p["rate_rps"] > result["capacity_rps"] for p in failing)


def test_sweep_runs_every_cell_in_worker_processes(fleet_file: Path, tmp_path: Path) -> None:
    other = tmp_path / "h100s.yaml"
    other.write_text("engines:\n  - {name: h100, gpu: h100-80g, model: llama-3-8b, replicas: 2}\n")
    out, report = tmp_path / "sweep.json", tmp_path / "sweep.html"
    done = run(
        "sweep", "-c", fleet_file, "--fleets", other, "--trace", AZURE_CONV, "--limit", 120,
        "--policies", "least_request,round_robin", "--rates", "2,8", "--workers", 2,
        "--json", out, "--report", report,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    cells = json.loads(out.read_text())["cells"]
    assert len(cells) == 8
    assert {(c["fleet_name"], c["policy"], c["rate_rps"]) for c in cells} == {
        (f, p, r) for f in ("fleet", "h100s") for p in ("least_request", "round_robin") for r in (2.0, 8.0)
    }
    assert all(c.keys() >= SUMMARY_KEYS for c in cells)
    assert "SLO attainment against arrival rate" in report.read_text()


def test_requests_for_unserved_models_are_counted_as_failed(fleet_file: Path, tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    rows = [{"timestamp": i * 100, "input_length": 200, "output_length": 20} for i in range(6)]
    rows += [{"timestamp": 50, "input_length": 200, "output_length": 20, "model": "no-such-model"}]
    trace.write_text("".join(json.dumps(row) + "\n" for row in rows))
    done = run("-c", fleet_file, "--trace", trace, "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["requests"] == 7
    assert summary["failed"] == 1
    assert summary["failures"] == {"model_not_served": 1}
    assert summary["slo_attainment"] <= 6 / 7


def test_bad_input_is_one_clean_error(fleet_file: Path) -> None:
    done = run("-c", fleet_file, "--trace", AZURE_CONV, "--limit", 5, "--policy", "no_such_policy")
    assert done.returncode == 1
    assert "unknown routing policy" in done.stderr
    assert "Traceback" not in done.stderr


def test_an_autoscaled_group_follows_a_diurnal_day(tmp_path: Path) -> None:
    """`workload gen --diurnal` and `sim` with an `autoscale:` block, through the console scripts."""
    trace, fleet, out = tmp_path / "day.jsonl", tmp_path / "fleet.yaml", tmp_path / "out.json"
    generate = [str(FLEETSERVE), "workload", "gen", "--rate", "3", "--duration", "1200", "--diurnal", "6"]
    generate += ["--period", "1200", "--input", "fixed:512", "--output", "fixed:128", "-o", str(trace)]
    subprocess.run(generate, check=True, capture_output=True)
    fleet.write_text(
        "engines:\n  - {name: l4, gpu: l4, model: llama-3-8b,"
        " autoscale: {policy: kpa, max_replicas: 8, target: 4}}\n"
    )
    sim = [str(FLEETSERVE), "sim", "-c", str(fleet), "--trace", str(trace), "--json", str(out), "-q"]
    subprocess.run(sim, check=True, capture_output=True)
    summary = json.loads(out.read_text())
    assert summary["failed"] == 0 and summary["autoscale"] == {
        "l4": {"policy": "kpa", "metric": "in_flight", "replicas_at_start": 1}
    }
    sizes = [event["to"] for event in summary["scale_events"]]
    # up towards the peak at 600 s, down again after it
    assert max(sizes) >= 3 and sizes[-1] < max(sizes) and summary["cold_starts"] >= max(sizes) - 1


def test_the_example_autoscaled_fleet_runs_its_planned_groups_in_the_twin(tmp_path: Path) -> None:
    """examples/autoscaled-fleet.yaml through `sim`: its profiles measured once (then read from
    --profiles), the planned groups sized by the plan."""
    trace, out = tmp_path / "day.jsonl", tmp_path / "out.json"
    generate = [str(FLEETSERVE), "workload", "gen", "--rate", "3", "--duration", "900", "--diurnal", "4"]
    generate += ["--period", "900", "--input", "fixed:300", "--output", "fixed:100", "-o", str(trace)]
    subprocess.run(generate, check=True, capture_output=True)
    example = Path(__file__).parents[2] / "examples" / "autoscaled-fleet.yaml"
    sim = [str(FLEETSERVE), "sim", "-c", str(example), "--trace", str(trace), "--json", str(out)]
    sim += ["--profiles", str(tmp_path / "profiles")]
    first = subprocess.run(sim, check=True, capture_output=True, text=True)
    assert "planned groups: 2 profile(s) measured, 0 from the cache" in first.stderr
    summary = json.loads(out.read_text())
    assert summary["failed"] == 0
    assert summary["autoscale"]["l4"]["policy"] == summary["autoscale"]["h100"]["policy"] == "planned"
    plan = summary["plans"]["llama-3-8b"]
    assert plan["replicas"]["l4"] >= 1 and plan["replicas"]["h100-80g"] == 0  # chat: L4s are cheaper
    assert {event["reason"] for event in summary["scale_events"]} <= {"planned", "scale", "tolerance"}
    again = subprocess.run(sim, check=True, capture_output=True, text=True)
    assert "planned groups: 0 profile(s) measured, 2 from the cache" in again.stderr
