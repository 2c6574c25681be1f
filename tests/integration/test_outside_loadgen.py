"""A load generator fleetserve did not write, inference-perf (kubernetes-sigs), drives the gateway.

inference-perf needs Python 3.12, newer than the project's, so `scripts/install.sh` installs it in a
venv of its own (`$HOME/.cache/fleetserve/inference-perf-0.7.0`) when a python3.12 is on the machine;
without one this test is skipped and says so. Both tools run the same open-loop workload (fixed
prompt and answer lengths, `ignore_eos`) against the same gateway over emulated engines that count
tokens with a real tokenizer.json, built here offline. inference-perf must report no protocol complaint
(no failures, no token-count mismatch, no validation error), and its TTFT and throughput must agree with
`fleetserve bench` within 10% (TTFT: 10% plus CLIENT_TTFT_SLACK_MS; the tools run one after the other on a
busy 2-core machine, and inference-perf's client measured 20-30 ms later first tokens than fleetserve bench's
on identical requests each alone on its engine, which is 12-18% of this workload's 170 ms TTFT).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from tests.integration.gateway_harness import emulated_gateway
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from fleetserve.engines.emulator.text import Vocabulary
from fleetserve.protocol.tokenizer import json_tokenizer
from fleetserve.workload.prompts import WORDS as PROMPT_WORDS

INFERENCE_PERF = Path(
    os.environ.get("FLEETSERVE_INFERENCE_PERF", Path.home() / ".cache/fleetserve/inference-perf-0.7.0")
)
FLEETSERVE = Path(sys.executable).with_name("fleetserve")
MODEL = "llama-3-8b"
RATE, DURATION_S, INPUT, OUTPUT = 4.0, 20.0, 512, 32
CLIENT_TTFT_SLACK_MS = 30.0

pytestmark = pytest.mark.skipif(
    not (INFERENCE_PERF / "bin" / "inference-perf").exists(),
    reason=f"no inference-perf in {INFERENCE_PERF} (scripts/install.sh puts it there if python3.12 exists)",
)


def word_tokenizer(folder: Path) -> Path:
    """A byte-level BPE tokenizer.json trained on the words of the emulator's answers and of fleetserve
    bench's prompts (so both are one token a word, as with the built-in tokenizer), with the
    tokenizer_config.json that lets transformers load the folder (as inference-perf does) offline."""
    rng = random.Random(0)
    words = sorted({word.strip() for word in Vocabulary.WORDS} | set(PROMPT_WORDS))
    corpus = [" ".join(rng.choice(words) for _ in range(40)) for _ in range(2000)]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 8192,
        "eos_token": "<|endoftext|>",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder / "tokenizer.json"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    tmp = tmp_path_factory.mktemp("outside_loadgen")
    tokenizer = word_tokenizer(tmp / "tokenizer")
    assert len(json_tokenizer(tokenizer).encode(" the of and")) == 3
    group = {"name": "l4", "gpu": "l4", "model": MODEL, "replicas": 2, "tokenizer": str(tokenizer)}
    with emulated_gateway(tmp, group) as url:
        yield url, tokenizer.parent


def run_inference_perf(url: str, tokenizer_dir: Path, out: Path) -> dict:
    fixed = lambda n: {"min": n, "max": n, "mean": n, "std_dev": 0, "type": "fixed"}  # noqa: E731
    config = {
        "load": {"type": "constant", "stages": [{"rate": RATE, "duration": DURATION_S}]},
        "api": {"type": "completion", "streaming": True},
        "server": {"type": "vllm", "model_name": MODEL, "base_url": url, "ignore_eos": True},
        "tokenizer": {"pretrained_model_name_or_path": str(tokenizer_dir)},
        "data": {"type": "random", "input_distribution": fixed(INPUT), "output_distribution": fixed(OUTPUT)},
        "report": {"request_lifecycle": {"summary": True, "per_stage": False, "per_request": True}},
        "storage": {"local_storage": {"path": str(out)}},
    }
    config_file = out.with_suffix(".yaml")
    config_file.write_text(yaml.safe_dump(config))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(
        [str(INFERENCE_PERF / "bin" / "inference-perf"), "-c", str(config_file)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return {
        "summary": json.loads((out / "summary_lifecycle_metrics.json").read_text()),
        "validation": json.loads((out / "validation.json").read_text()),
        "log": done.stdout + done.stderr,
    }


def run_fleetserve_bench(url: str, out: Path) -> dict:
    argv = [
        str(FLEETSERVE), "bench", "--url", url, "--model", MODEL,
        "--workload", f"input={INPUT},output={OUTPUT}", "--rate", str(RATE), "--duration", str(DURATION_S),
        # Gamma arrivals of shape 1000: evenly spaced, as inference-perf's constant load sends them (Poisson
        # would let the number of requests in 20 s vary by +-10% and the throughputs with it)
        "--burstiness", "1000",
        "--json", str(out), "--quiet",
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(out.read_text())["summary"]


def test_inference_perf_agrees_with_fleetserve_bench(gateway: tuple[str, Path], tmp_path: Path) -> None:
    url, tokenizer_dir = gateway
    theirs = run_inference_perf(url, tokenizer_dir, tmp_path / "inference-perf")
    ours = run_fleetserve_bench(url, tmp_path / "bench.json")

    summary = theirs["summary"]
    assert summary["failures"]["count"] == 0, summary["failures"]
    assert all(not report["errors"] for report in theirs["validation"]["reports"].values())
    assert not theirs["validation"]["global"]["errors"]
    assert '"token_count_mismatches": 0' in theirs["log"] or "token_count_mismatches: 0" in theirs["log"]
    assert ours["failed"] == 0

    latency, throughput = summary["successes"]["latency"], summary["successes"]["throughput"]
    their_ttft_ms = latency["time_to_first_token"]["median"] * 1000
    their_rps = throughput["requests_per_sec"]
    their_tpot_ms = latency["time_per_output_token"]["median"] * 1000
    figures = (
        f"inference-perf / fleetserve bench: TTFT {their_ttft_ms:.1f} / {ours['ttft_ms']['median']:.1f} ms, "
        f"req/s {their_rps:.3f} / {ours['request_throughput']:.3f}, "
        f"TPOT {their_tpot_ms:.1f} / {ours['tpot_ms']['median']:.1f} ms"
    )
    ttft_slack = 0.10 * ours["ttft_ms"]["median"] + CLIENT_TTFT_SLACK_MS
    assert their_ttft_ms == pytest.approx(ours["ttft_ms"]["median"], abs=ttft_slack), figures
    assert their_rps == pytest.approx(ours["request_throughput"], rel=0.10), figures
    assert their_tpot_ms == pytest.approx(ours["tpot_ms"]["median"], rel=0.10), figures
