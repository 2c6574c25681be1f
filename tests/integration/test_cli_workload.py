"""Runs the installed `fleetserve` console script, as a user would."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

FLEETSERVE = Path(sys.executable).with_name("fleetserve")
SHARED_DATA = Path(
    os.environ.get("FLEETSERVE_SHARED_DATA", Path(__file__).resolve().parents[2].parent / "shared" / "data")
)
AZURE_CONV = SHARED_DATA / "traces" / "azure_llm_2023_conv.csv"
MOONCAKE_CONV = SHARED_DATA / "traces" / "mooncake_conversation.jsonl"
DEMO_TRACE = Path(__file__).resolve().parents[2] / "src" / "fleetserve" / "data" / "demo_trace.jsonl"

SESSION_WORKLOAD = (
    "gen", "--rate", "20", "--num", "3000", "--sessions", "3", "--think-time", "4", "--tenants", "4",
    "--system-prompt", "1024", "--adapters", "8", "--model", "llama=3", "--model", "qwen", "--seed", "7",
)  # fmt: skip

pytestmark = pytest.mark.skipif(
    not FLEETSERVE.exists(), reason=f"console script not installed at {FLEETSERVE}"
)


def fleetserve(*args: str | Path, expect_code: int = 0) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(FLEETSERVE), "workload", *map(str, args)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == expect_code, result.stderr
    return result


def test_gen_then_stats_reports_what_was_asked(tmp_path: Path) -> None:
    trace = tmp_path / "gen.jsonl"
    fleetserve(*SESSION_WORKLOAD, "-o", trace)
    lines = trace.read_text().splitlines()
    assert len(lines) == 3000
    assert all(json.loads(line)["tenant"].startswith("tenant-") for line in lines)
    summary = json.loads(fleetserve("stats", trace, "--json").stdout)
    assert summary["requests"] == 3000
    assert summary["mean_rate_rps"] == pytest.approx(20, rel=0.1)
    assert summary["tenants"] == 4 and summary["adapters"] == 8 and summary["models"] == 2
    assert summary["sessions"] > 500
    assert 0.3 < summary["prefix_sharing_ratio"] < 1
    # Same seed, same bytes.
    again = tmp_path / "again.jsonl"
    fleetserve(*SESSION_WORKLOAD, "-o", again)
    assert again.read_bytes() == trace.read_bytes()


def test_gen_to_stdout_with_transforms_and_text_stats() -> None:
    result = fleetserve(
        "gen", "--arrival", "gamma", "--rate", "10", "--burstiness", "0.5", "--duration", "100",
        "--input", "uniform:10:20", "--output", "fixed:5", "--rate-scale", "2", "--limit", "50",
    )  # fmt: skip
    requests = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(requests) == 50
    assert all(10 <= r["input_length"] <= 20 and r["output_length"] == 5 for r in requests)
    assert requests[-1]["timestamp"] < 10_000


@pytest.mark.skipif(not AZURE_CONV.exists(), reason=f"shared Azure trace not found at {AZURE_CONV}")
def test_stats_and_empirical_lengths_from_the_azure_trace(tmp_path: Path) -> None:
    text = fleetserve("stats", AZURE_CONV, "--start", "0", "--end", "600").stdout
    assert "requests" in text and "input tokens" in text
    summary = json.loads(fleetserve("stats", AZURE_CONV, "--json").stdout)
    assert summary["requests"] == 19366
    trace = tmp_path / "azure_mix.jsonl"
    fleetserve(
        "gen", "--rate", "5", "--num", "2000",
        "--input", f"empirical:{AZURE_CONV}", "--output", f"empirical:{AZURE_CONV}", "-o", trace,
    )  # fmt: skip
    mix = json.loads(fleetserve("stats", trace, "--json").stdout)
    assert mix["input_length"]["p50"] == pytest.approx(summary["input_length"]["p50"], rel=0.15)
    assert mix["output_length"]["p50"] == pytest.approx(summary["output_length"]["p50"], rel=0.15)


@pytest.mark.skipif(not MOONCAKE_CONV.exists(), reason=f"shared Mooncake trace not found at {MOONCAKE_CONV}")
def test_convert_reproduces_the_shipped_demo_trace(tmp_path: Path) -> None:
    out = tmp_path / "demo.jsonl"
    fleetserve(
        "convert", MOONCAKE_CONV, "--end", "180", "--rate-scale", "2", "--length-scale", "0.125", "-o", out
    )
    assert out.read_bytes() == DEMO_TRACE.read_bytes()


def test_bad_input_gives_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"timestamp": 0, "input_length": 5, "output_length": 1}\n{"timestamp": 1}\n')
    result = fleetserve("stats", bad, expect_code=1)
    assert f"{bad}:2: missing field 'input_length'" in result.stderr
    result = fleetserve("gen", "--rate", "1", expect_code=2)
    assert "exactly one of --duration and --num" in result.stderr
    result = fleetserve("gen", "--rate", "1", "--num", "5", "--input", "zipf:x", expect_code=2)
    assert "bad length spec 'zipf:x'" in result.stderr
