from pathlib import Path

from fleetserve.config import parse_fleet
from fleetserve.sim import plan_cells, run_sweep, simulate
from fleetserve.sim.report import render_report
from fleetserve.workload import TraceRequest

FLEET = "engines:\n  - {name: a100, gpu: a100-80g, model: llama-3-8b, replicas: 2}\n"


def _trace() -> list[TraceRequest]:
    return [TraceRequest(timestamp_ms=i * 80.0, input_length=300 + i, output_length=30) for i in range(40)]


def test_single_run_report_has_cdfs_and_load(tmp_path: Path):
    summary = simulate(parse_fleet(FLEET), _trace(), "least_request").summary
    path = tmp_path / "report.html"
    render_report([summary], path, title="one run")
    page = path.read_text()
    assert "<title>one run</title>" in page
    assert "Latency CDFs" in page and "Per-engine load over time" in page
    assert page.count("data:image/png;base64,") == 2


def test_an_autoscaled_run_draws_replicas_over_time_with_the_arrival_rate(tmp_path: Path):
    fleet = (
        "engines:\n  - {name: a100, gpu: a100-80g, model: llama-3-8b,"
        " autoscale: {policy: kpa, max_replicas: 4, target: 2, interval_s: 1}}\n"
    )
    summary = simulate(parse_fleet(fleet), _trace(), "least_request").summary
    assert len(summary["arrival_rate_over_time"]["rps"]) == 60
    path = tmp_path / "report.html"
    render_report([summary], path)
    page = path.read_text()
    assert "Replicas over time" in page and page.count("data:image/png;base64,") == 3


def test_sweep_report_plots_attainment_against_rate(tmp_path: Path):
    cells = plan_cells([("a100s", parse_fleet(FLEET))], ["least_request", "round_robin"], [5.0, 20.0])
    results = run_sweep(cells, _trace())
    assert [(r["policy"], r["rate_rps"]) for r in results] == [
        ("least_request", 5.0), ("least_request", 20.0), ("round_robin", 5.0), ("round_robin", 20.0)
    ]  # fmt: skip
    assert all("load_over_time" not in r for r in results)
    path = tmp_path / "sweep.html"
    render_report(results, path)
    page = path.read_text()
    assert "SLO attainment against arrival rate" in page
    assert page.count("data:image/png;base64,") == 3  # a CDF figure per rate, and the attainment curve
    assert "a100s / round_robin @ 20 rps" in page
