"""`fleetserve sim sweep --ray` runs the cells as Ray tasks and gets exactly the results of a serial sweep.

`--ray local` makes the command start its own single-node cluster on this machine (and stop it on exit),
so the test never touches Ray processes it did not start."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fleetserve.config import parse_fleet
from fleetserve.sim import plan_cells, run_sweep
from fleetserve.workload import TraceRequest, write_jsonl

pytest.importorskip("ray")

pytestmark = pytest.mark.ray

FLEET = """
engines:
  - {name: a100, gpu: a100-80g, model: llama-3-8b, replicas: 2}
  - {name: l4, gpu: l4, model: llama-3-8b}
"""


def _trace() -> list[TraceRequest]:
    return [
        TraceRequest(timestamp_ms=i * 150.0, input_length=300 + 37 * (i % 11), output_length=20 + i % 30)
        for i in range(80)
    ]


def _comparable(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in ("wall_s", "sim_requests_per_s")}


def test_ray_sweep_matches_serial_sweep(tmp_path: Path) -> None:
    fleet_file, trace_file, out = tmp_path / "fleet.yaml", tmp_path / "trace.jsonl", tmp_path / "out.json"
    fleet_file.write_text(FLEET)
    write_jsonl(_trace(), trace_file)
    command = [
        str(Path(sys.executable).with_name("fleetserve")), "sim", "sweep", "-c", str(fleet_file),
        "--trace", str(trace_file), "--policies", "least_request,random", "--rates", "4,12", "--seed", "3",
        "--ray", "local", "--json", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    distributed = json.loads(out.read_text())["cells"]

    cells = plan_cells([("fleet", parse_fleet(FLEET))], ["least_request", "random"], [4.0, 12.0], seed=3)
    serial = run_sweep(cells, _trace())
    assert [_comparable(r) for r in distributed] == [_comparable(r) for r in serial]
    assert [(r["policy"], r["rate_rps"]) for r in distributed] == [
        ("least_request", 4.0), ("least_request", 12.0), ("random", 4.0), ("random", 12.0)
    ]  # fmt: skip
