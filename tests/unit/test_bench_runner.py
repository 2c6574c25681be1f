"""Benchmark configuration rules, report shape and comparison tables (no network)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest
from rich.console import Console

from fleetserve.bench.client import RequestRecord
from fleetserve.bench.compare import Report, comparison_table, load_reports
from fleetserve.bench.metrics import SLO, summarize
from fleetserve.bench.runner import BenchConfig, BenchResult, run_bench

URL = "http://127.0.0.1:9"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({}, "exactly one of a trace or a workload"),
        ({"workload": "input=1,output=1", "trace": "t.jsonl"}, "exactly one"),
        ({"workload": "input=1,output=1", "num_requests": 1}, "needs a rate or a concurrency"),
        ({"workload": "input=1,output=1", "rate": 1.0, "concurrency": 2, "num_requests": 1}, "not both"),
        ({"workload": "input=1,output=1", "rate": 1.0}, "endless"),
        ({"workload": "input=1,output=1", "rate": float("inf"), "duration_s": 1.0}, "number of requests"),
        ({"trace": "/nonexistent/trace.jsonl"}, "does not exist"),
        ({"workload": "input=1", "rate": 1.0, "num_requests": 1}, "lacks output"),
    ],
)
def test_invalid_configs_are_rejected(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BenchConfig(url=URL, model="m", **changes).validate()  # type: ignore[arg-type]


def test_a_trace_needs_no_bound_and_replays_on_its_clock(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"timestamp": 0, "input_length": 4, "output_length": 2}\n')
    config = BenchConfig(url=URL, model="m", trace=trace)
    config.validate()
    assert config.arrival_mode == "trace"
    assert BenchConfig(url=URL, model="m", trace=trace, rate=3.0).arrival_mode == "rate"
    assert BenchConfig(url=URL, model="m", trace=trace, concurrency=3).arrival_mode == "closed_loop"


def test_config_in_the_report_hides_the_api_key(tmp_path: Path) -> None:
    config = BenchConfig(url=URL, model="m", trace=tmp_path / "t.jsonl", api_key="secret", slo=SLO(100, 10))
    data = config.to_json_dict()
    assert "api_key" not in data
    assert data["trace"] == str(tmp_path / "t.jsonl")
    assert data["slo"] == {"ttft_ms": 100, "tpot_ms": 10}
    assert b"secret" not in orjson.dumps(data)


def test_a_stopped_run_sends_nothing_and_says_so() -> None:
    stop = asyncio.Event()
    stop.set()
    config = BenchConfig(url=URL, model="m", workload="input=4,output=2", concurrency=2, num_requests=5)
    result = asyncio.run(run_bench(config, stop=stop))
    assert result.interrupted
    assert result.summary.sent == 0
    assert result.to_json_dict()["interrupted"] is True


def report_of(label: str, ttft: float) -> Report:
    record = RequestRecord(0, 10, 3, 0.0, ttft=ttft, e2e=ttft + 0.2, itls=[0.1, 0.1], output_tokens=3)
    failed = RequestRecord(1, 10, 3, 0.0)
    failed.fail("http_503", "busy", 503)
    config = BenchConfig(url=URL, model="m", workload="input=10,output=3", concurrency=1, label=label)
    result = BenchResult(
        config, "2026-01-01T00:00:00+00:00", [record, failed], summarize([record, failed], 1.0)
    )
    return Report(label, result.to_json_dict())


def test_comparison_table_has_a_column_per_run() -> None:
    table = comparison_table([report_of("fast", 0.05), report_of("slow", 0.5)])
    console = Console(width=200, record=True)
    console.print(table)
    text = console.export_text()
    assert "fast" in text and "slow" in text
    assert "http_503 1" in text
    ttft_row = next(line for line in text.splitlines() if "TTFT mean" in line)
    assert "50.00" in ttft_row and "500.00" in ttft_row


def test_load_reports_rejects_other_json(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_bytes(orjson.dumps(report_of("x", 0.1).data | {"label": None}))
    bad.write_text('{"hello": 1}')
    assert [report.name for report in load_reports([good])] == ["good"]
    assert load_reports([good])[0].per_request("ttft") == [pytest.approx(0.1)]
    with pytest.raises(ValueError, match="not a fleetserve bench report"):
        load_reports([bad])
