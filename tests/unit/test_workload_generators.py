import itertools
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from fleetserve.errors import InputError
from fleetserve.workload.generators import (
    EmpiricalLengths,
    FixedLengths,
    UniformLengths,
    WorkloadSpec,
    ZipfLengths,
    generate,
    parse_length_spec,
)
from fleetserve.workload.trace import TraceRequest, write_jsonl


def interarrival_gaps_s(requests: list[TraceRequest]) -> np.ndarray:
    return np.diff([r.timestamp_ms for r in requests]) / 1000.0


def test_poisson_rate_and_dispersion_match_the_spec() -> None:
    requests = generate(WorkloadSpec(rate=50.0, duration_s=400.0, seed=1))
    assert len(requests) == pytest.approx(50 * 400, rel=0.03)
    gaps = interarrival_gaps_s(requests)
    assert gaps.mean() == pytest.approx(1 / 50, rel=0.03)
    assert gaps.var() / gaps.mean() ** 2 == pytest.approx(1.0, rel=0.1)
    assert all(0 <= r.timestamp_ms < 400_000 for r in requests)


@pytest.mark.parametrize("burstiness", [0.25, 4.0])
def test_gamma_burstiness_sets_the_squared_coefficient_of_variation(burstiness: float) -> None:
    requests = generate(WorkloadSpec(rate=20.0, num_requests=20_000, arrival="gamma", burstiness=burstiness))
    gaps = interarrival_gaps_s(requests)
    assert 1 / gaps.mean() == pytest.approx(20.0, rel=0.05)
    assert gaps.var() / gaps.mean() ** 2 == pytest.approx(1 / burstiness, rel=0.15)


def test_same_seed_same_trace_other_seed_other_trace() -> None:
    spec = WorkloadSpec(rate=5.0, num_requests=300, turns=3, tenants=3, system_prompt_tokens=1024, adapters=4)
    assert generate(spec) == generate(spec)
    other = generate(WorkloadSpec(**{**_fields(spec), "seed": 1}))
    assert [r.timestamp_ms for r in other] != [r.timestamp_ms for r in generate(spec)]


def _fields(spec: WorkloadSpec) -> dict:
    return {name: getattr(spec, name) for name in spec.__slots__}


def test_num_requests_is_exact_and_a_longer_trace_extends_a_shorter_one() -> None:
    short = generate(WorkloadSpec(rate=10.0, num_requests=500, seed=3))
    long = generate(WorkloadSpec(rate=10.0, num_requests=2000, seed=3))
    assert len(short) == 500 and len(long) == 2000
    assert long[:500] == short


def test_session_turns_extend_the_previous_turn() -> None:
    requests = generate(WorkloadSpec(rate=20.0, num_requests=3000, turns=4, think_time_s=5.0, block_size=64))
    by_session: dict[str, list[TraceRequest]] = {}
    for request in requests:
        assert request.session is not None
        by_session.setdefault(request.session, []).append(request)
    multi_turn = [turns for turns in by_session.values() if len(turns) > 1]
    assert len(multi_turn) > 100
    for turns in multi_turn:
        for previous, current in itertools.pairwise(turns):
            assert current.timestamp_ms > previous.timestamp_ms
            # The next prompt holds the previous prompt, its answer and a new message.
            assert current.input_length > previous.input_length + previous.output_length
            assert current.hash_ids[: len(previous.hash_ids)] == previous.hash_ids
            assert len(current.hash_ids) == -(-current.input_length // 64)
    # Warm-up makes the trace open at the full rate rather than ramping up.
    first_half = sum(1 for r in requests if r.timestamp_ms < requests[-1].timestamp_ms / 2)
    assert first_half == pytest.approx(len(requests) / 2, rel=0.1)


def test_single_turn_prompts_share_nothing_without_tenants() -> None:
    requests = generate(WorkloadSpec(rate=10.0, num_requests=500))
    blocks = [block for r in requests for block in r.hash_ids]
    assert len(blocks) == len(set(blocks))
    assert all(r.session is None and r.tenant is None and r.adapter is None for r in requests)


def test_tenants_share_their_system_prompt_blocks_only() -> None:
    requests = generate(
        WorkloadSpec(rate=10.0, num_requests=600, tenants=3, system_prompt_tokens=1300, block_size=512)
    )
    prefix_of: dict[str, tuple[int, ...]] = {}
    for request in requests:
        assert request.input_length > 1300
        # 1300 tokens fill two whole blocks; the third holds the user message as well.
        prefix_of.setdefault(request.tenant, request.hash_ids[:2])
        assert request.hash_ids[:2] == prefix_of[request.tenant]
    assert len(prefix_of) == 3
    assert len({block for prefix in prefix_of.values() for block in prefix}) == 6
    third_blocks = [r.hash_ids[2] for r in requests]
    assert len(third_blocks) == len(set(third_blocks))


def test_adapter_popularity_follows_zipf() -> None:
    requests = generate(WorkloadSpec(rate=50.0, num_requests=20_000, adapters=10, adapter_zipf=1.0))
    counts = Counter(r.adapter for r in requests)
    assert set(counts) == {f"lora-{i}" for i in range(10)}
    harmonic = sum(1 / k for k in range(1, 11))
    assert counts["lora-0"] / len(requests) == pytest.approx(1 / harmonic, rel=0.05)
    assert counts["lora-0"] / counts["lora-1"] == pytest.approx(2.0, rel=0.1)
    assert counts["lora-0"] > 5 * counts["lora-9"]


def test_adapter_fraction_and_model_weights() -> None:
    requests = generate(
        WorkloadSpec(
            rate=50.0,
            num_requests=10_000,
            adapters=3,
            adapter_fraction=0.25,
            models=(("big", 1), ("small", 3)),
        )
    )
    with_adapter = sum(r.adapter is not None for r in requests) / len(requests)
    assert with_adapter == pytest.approx(0.25, abs=0.02)
    small = sum(r.model == "small" for r in requests) / len(requests)
    assert small == pytest.approx(0.75, abs=0.02)


def test_zipf_lengths_have_the_asked_mean_and_a_heavy_tail() -> None:
    lengths = ZipfLengths(1000).sample(np.random.default_rng(0), 200_000)
    assert lengths.mean() == pytest.approx(1000, rel=0.03)
    assert np.median(lengths) < 0.4 * lengths.mean()
    assert lengths.min() >= 1
    steeper = ZipfLengths(1000, theta=1.5).sample(np.random.default_rng(0), 200_000)
    assert np.median(steeper) < np.median(lengths)


def test_lengths_are_capped_by_the_maximums() -> None:
    requests = generate(
        WorkloadSpec(
            rate=10.0,
            num_requests=2000,
            input_lengths=ZipfLengths(4000),
            output_lengths=ZipfLengths(800),
            max_input_length=4096,
            max_output_length=512,
        )
    )
    assert max(r.input_length for r in requests) == 4096
    assert max(r.output_length for r in requests) == 512


def test_length_specs_parse(tmp_path: Path) -> None:
    assert parse_length_spec("fixed:128") == FixedLengths(128)
    assert parse_length_spec("uniform:10:20") == UniformLengths(10, 20)
    assert parse_length_spec("zipf:500") == ZipfLengths(500.0)
    assert parse_length_spec("zipf:500:1.3") == ZipfLengths(500.0, 1.3)
    trace = tmp_path / "t.jsonl"
    write_jsonl([TraceRequest(0, 100, 7), TraceRequest(1, 300, 9)], trace)
    empirical_inputs = parse_length_spec(f"empirical:{trace}", side="input")
    assert isinstance(empirical_inputs, EmpiricalLengths)
    assert set(empirical_inputs.sample(np.random.default_rng(0), 100).tolist()) == {100, 300}
    empirical_outputs = parse_length_spec(f"empirical:{trace}", side="output")
    assert set(empirical_outputs.sample(np.random.default_rng(0), 100).tolist()) == {7, 9}
    for bad in ("fixed:0", "uniform:9:3", "zipf:abc", "normal:5", "zipf:0"):
        with pytest.raises(ValueError, match="bad length spec"):
            parse_length_spec(bad)


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"num_requests": 10, "duration_s": 5.0},
        {"arrival": "poisson", "burstiness": 0.5},
        {"system_prompt_tokens": 512},
        {"turns": 0.5},
        {"models": (("m", 0),)},
        {"arrival": "uniform"},
    ],
)
def test_invalid_specs_are_refused(changes: dict) -> None:
    base = (
        {"rate": 1.0, "num_requests": None, "duration_s": None}
        if not changes
        else {"rate": 1.0, "num_requests": 1}
    )
    with pytest.raises(ValueError):
        generate(WorkloadSpec(**{**base, **changes}))


def test_a_diurnal_trace_swings_between_trough_and_peak_around_the_same_mean() -> None:
    spec = WorkloadSpec(rate=20.0, duration_s=7200.0, diurnal=6.0, period_s=3600.0, seed=3)
    times = np.array([request.timestamp_ms for request in generate(spec)]) / 1000.0
    assert len(times) / 7200.0 == pytest.approx(20.0, rel=0.03)
    per_window, _ = np.histogram(times % 3600.0, bins=36, range=(0.0, 3600.0))  # 100 s windows
    trough, peak = per_window[[0, -1]].mean(), per_window[17:19].mean()
    assert peak / trough == pytest.approx(6.0, rel=0.15)
    flat = generate(WorkloadSpec(rate=20.0, duration_s=600.0, seed=3))
    assert [r.timestamp_ms for r in flat] == [
        r.timestamp_ms for r in generate(WorkloadSpec(rate=20.0, duration_s=600.0, diurnal=1.0, seed=3))
    ]
    with pytest.raises(InputError, match="diurnal"):
        generate(WorkloadSpec(rate=1.0, duration_s=10.0, diurnal=0.5))
