"""`fleetserve plan` end to end: profiles measured then cached, a mix cheaper than the best homogeneous
fleet, a fleet file `sim` accepts and that replays to the attainment the plan reported, clean errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

FLEETSERVE = Path(sys.executable).with_name("fleetserve")


def fleetserve(*args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(FLEETSERVE), *map(str, args)], capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="module")
def workload(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Short chat prompts and long documents, and a fleet file that allows H100s and L4s."""
    work = tmp_path_factory.mktemp("plan")
    fleet = work / "fleet.yaml"
    fleet.write_text(
        yaml.safe_dump(
            {
                "engines": [
                    {"name": "h100", "model": "llama-3-8b", "gpu": "h100-80g", "replicas": 3},
                    {"name": "l4", "model": "llama-3-8b", "gpu": "l4"},
                ],
                "slo": {"ttft_ms": 1000, "tpot_ms": 100},
            }
        )
    )
    parts = []
    for name, rate, prompts, answers in (
        ("chat", "60", "uniform:50:400", "uniform:20:200"),
        ("docs", "8", "uniform:3000:6000", "uniform:20:100"),
    ):
        path = work / f"{name}.jsonl"
        done = fleetserve("workload", "gen", "--rate", rate, "--duration", "40", "--input", prompts,
                          "--output", answers, "--seed", "1", "-o", path)  # fmt: skip
        assert done.returncode == 0, done.stderr
        parts.append(path.read_text())
    trace = work / "mixed.jsonl"
    lines = [json.loads(line) for part in parts for line in part.splitlines() if line.strip()]
    trace.write_text("".join(json.dumps(r) + "\n" for r in sorted(lines, key=lambda r: r["timestamp"])))
    return fleet, trace


def test_a_plan_is_verified_cheaper_and_replays_as_reported(
    workload: tuple[Path, Path], tmp_path: Path
) -> None:
    fleet, trace = workload
    planned = tmp_path / "planned.yaml"
    profiles = tmp_path / "profiles"
    done = fleetserve("plan", "-c", fleet, "--trace", trace, "--profiles", profiles, "-o", planned, "--json")
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert plan["slo_attainment"] >= 0.9 and plan["meets_target"]
    assert plan["profiles"]["measured"] > 0
    assert set(plan["replicas"]) <= {"h100-80g", "l4"}
    assert plan["usd_per_hour"] == pytest.approx(
        sum(n * {"h100-80g": 12.29, "l4": 0.8048}[gpu] for gpu, n in plan["replicas"].items())
    )
    # the L4s cannot prefill the documents within the SLO alone; the H100s alone can, at a higher price
    assert not plan["baselines"]["l4"]["meets_target"]
    h100 = plan["baselines"]["h100-80g"]
    assert h100["meets_target"] and h100["slo_attainment"] >= 0.9
    assert plan["savings_vs_best_homogeneous"] == pytest.approx(
        1 - plan["usd_per_hour"] / h100["usd_per_hour"]
    )
    assert plan["savings_vs_best_homogeneous"] > 0
    assert plan["solve_s"] >= 0
    # every bucket's traffic is routed, and the routes are in the fleet file the `planned` policy reads
    for bucket, rate in plan["demand_rps"].items():
        assert sum(plan["routes"][bucket].values()) == pytest.approx(rate)
    document = yaml.safe_load(planned.read_text())
    assert document["router"]["policy"] == "planned"
    assert {g["gpu"]: g["replicas"] for g in document["engines"]} == plan["replicas"]
    assert document["slo"] == {"ttft_ms": 1000, "tpot_ms": 100}
    replayed = fleetserve("sim", "-c", planned, "--trace", trace, "-q", "--json")
    assert replayed.returncode == 0, replayed.stderr
    assert json.loads(replayed.stdout)["slo_attainment"] == pytest.approx(plan["slo_attainment"])

    again = fleetserve("plan", "-c", fleet, "--trace", trace, "--profiles", profiles, "-o", planned,
                       "--json", "--no-baselines")  # fmt: skip
    assert again.returncode == 0, again.stderr
    second = json.loads(again.stdout)
    assert (
        second["profiles"]["measured"] == 0 and second["profiles"]["cached"] == plan["profiles"]["measured"]
    )
    assert second["replicas"] == plan["replicas"]


def test_plan_errors_are_one_clean_line(workload: tuple[Path, Path], tmp_path: Path) -> None:
    fleet, trace = workload
    out = tmp_path / "p.yaml"
    unknown = fleetserve(
        "plan", "-c", fleet, "--trace", trace, "--gpus", "b300", "-o", out, "--no-profile-cache"
    )
    assert unknown.returncode == 1 and "b300" in unknown.stderr and "Traceback" not in unknown.stderr
    slow = fleetserve("plan", "-c", fleet, "--trace", trace, "--gpus", "l4", "-o", out, "--no-profile-cache")
    assert slow.returncode == 1 and "Traceback" not in slow.stderr
    assert "out of reach" in slow.stderr and not out.exists()
