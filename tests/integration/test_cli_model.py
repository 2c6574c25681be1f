"""Run the installed `fleetserve model` console script as a user would."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

FLEETSERVE = Path(sys.executable).parent / "fleetserve"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(FLEETSERVE), "model", *args], capture_output=True, text=True, timeout=60)


def test_predict_prints_one_json_line() -> None:
    result = run(
        "predict", "--gpu", "h100-80g", "--model", "llama-2-70b", "--tp", "4", "--prompt", "512",
        "--batch", "8", "--output", "64", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    prediction = json.loads(lines[0])
    assert 0 < prediction["decode_step_ms"] < prediction["prefill_ms"]
    # prefill plus 63 decode steps, each at least as long as the first
    assert prediction["e2e_ms"] >= prediction["prefill_ms"] + 63 * prediction["decode_step_ms"]
    assert prediction["tokens_per_s"] == round(8 * 64 / (prediction["e2e_ms"] / 1e3), 2)
    assert prediction["kv_blocks"] > 0


def test_table_output_and_user_catalog(tmp_path: Path) -> None:
    catalog = tmp_path / "prices.yaml"
    catalog.write_text("gpus:\n  l4:\n    usd_per_hour: 0.5\n    price_source: our spot price\n")
    result = run(
        "predict", "--gpu", "l4", "--model", "llama-3-8b", "--output", "10", "--catalog", str(catalog)
    )
    assert result.returncode == 0, result.stderr
    assert "prefill" in result.stdout and "decode step" in result.stdout
    assert "our spot price" in result.stdout


def test_errors_are_clear_and_without_traceback() -> None:
    unknown = run("predict", "--gpu", "h900", "--model", "llama-3-8b")
    assert unknown.returncode != 0
    assert "h900" in unknown.stderr and "h100-80g" in unknown.stderr
    too_big = run("predict", "--gpu", "l4", "--model", "llama-2-70b", "--json")
    assert too_big.returncode != 0
    assert "does not fit" in too_big.stderr and too_big.stdout == ""
    for result in (unknown, too_big):
        assert "Traceback" not in result.stderr


def test_list_json_names_every_entry() -> None:
    result = run("list", "--json")
    assert result.returncode == 0, result.stderr
    catalogs = json.loads(result.stdout)
    assert {"a100-80g", "h100-80g", "h200", "l4", "l40s", "a10g"} <= set(catalogs["gpus"])
    assert catalogs["models"]["llama-3-8b"]["kv_heads"] == 8


def test_breakdown_matches_vidur_profile_of_the_a40() -> None:
    """The per-layer figures for llama-2-7b's 1,024-token prefill on an A40, against Vidur's measured
    medians of the same operators (data/perf/vidur, 4.43 ms summed): the CLI reports the same cost model
    the fit was checked on."""
    result = run(
        "predict", "--gpu", "a40", "--model", "llama-2-7b", "--prompt", "512", "--batch", "2",
        "--breakdown", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    prediction = json.loads(result.stdout)
    operators = prediction["layer_operators_ms"]
    assert list(operators) == [
        "input_layernorm", "attn_pre_proj", "attn_rope", "attn_post_proj", "post_attention_layernorm",
        "mlp_up_proj", "mlp_act", "mlp_down_proj", "add",
    ]  # fmt: skip
    assert prediction["layer_non_attention_ms"] == pytest.approx(sum(operators.values()), abs=1e-3)
    measured = 0.048 + 0.898 + 0.066 + 0.370 + 0.047 + 1.734 + 0.126 + 0.944 + 0.044
    assert prediction["layer_non_attention_ms"] == pytest.approx(measured, rel=0.1)
    assert prediction["layer_attention_ms"] > 0 and prediction["layer_all_reduce_ms"] == 0
    # the table for people names each operator and its share
    table = run("predict", "--gpu", "a40", "--model", "phi-2", "--prompt", "1024", "--breakdown")
    assert table.returncode == 0, table.stderr
    assert "mlp_up_proj" in table.stdout and "attention" in table.stdout
    assert "post_attention_layernorm" not in table.stdout  # phi-2 has one norm per layer
