import pytest

from fleetserve.workload.prompts import prompt_token_ids
from fleetserve.workload.stats import summarize
from fleetserve.workload.trace import TraceRequest
from fleetserve.workload.transform import (
    TransformSpec,
    apply_transforms,
    limit,
    sample,
    scale_lengths,
    scale_rate,
    time_window,
)


def trace(count: int = 10, gap_ms: float = 1000.0) -> list[TraceRequest]:
    return [TraceRequest(i * gap_ms, 100 + i, 10, hash_ids=(0, i + 1)) for i in range(count)]


def test_time_window_keeps_start_inclusive_end_exclusive_and_rebases() -> None:
    kept = time_window(trace(), start_s=2, end_s=5)
    assert [r.input_length for r in kept] == [102, 103, 104]
    assert [r.timestamp_ms for r in kept] == [0.0, 1000.0, 2000.0]
    assert [r.input_length for r in time_window(trace(), end_s=2)] == [100, 101]
    with pytest.raises(ValueError, match="empty time window"):
        time_window(trace(), start_s=5, end_s=5)


def test_rate_scale_compresses_timestamps() -> None:
    scaled = scale_rate(trace(), 2.0)
    assert [r.timestamp_ms for r in scaled] == [i * 500.0 for i in range(10)]
    assert summarize(scaled)["mean_rate_rps"] == pytest.approx(2 * summarize(trace())["mean_rate_rps"])
    with pytest.raises(ValueError):
        scale_rate(trace(), 0)


def test_sample_is_deterministic_and_close_to_the_fraction() -> None:
    requests = trace(5000, gap_ms=1.0)
    kept = sample(requests, 0.1, seed=4)
    assert kept == sample(requests, 0.1, seed=4)
    assert kept != sample(requests, 0.1, seed=5)
    assert len(kept) == pytest.approx(500, rel=0.15)
    assert sample(requests, 1.0) == requests and sample(requests, 0.0) == []


def test_sample_keeps_or_drops_sessions_whole() -> None:
    requests = [TraceRequest(i, 10, 1, session=f"s{i % 50}") for i in range(1000)]
    kept = sample(requests, 0.5, seed=1)
    kept_sessions = {r.session for r in kept}
    assert 10 < len(kept_sessions) < 40
    assert len(kept) == 20 * len(kept_sessions)


def test_length_scale_keeps_prefix_sharing_by_scaling_the_block_size() -> None:
    requests = [
        TraceRequest(0, 1500, 400, hash_ids=(0, 1, 2)),
        TraceRequest(1, 1100, 40, hash_ids=(0, 1, 3)),
    ]
    scaled = scale_lengths(requests, 0.125)
    assert [(r.input_length, r.output_length, r.hash_block_size) for r in scaled] == [
        (188, 50, 64),
        (138, 5, 64),
    ]
    assert summarize(scaled)["prefix_sharing_ratio"] == summarize(requests)["prefix_sharing_ratio"]
    first, second = (prompt_token_ids(r) for r in scaled)
    assert (first[:128] == second[:128]).all()
    with pytest.raises(ValueError, match="keeps them whole"):
        scale_lengths(requests, 0.3)


def test_limit_and_the_fixed_transform_order() -> None:
    assert limit(trace(), 3) == trace()[:3]
    # Window first (in original seconds), then rate scaling, then the limit.
    result = apply_transforms(trace(), TransformSpec(start_s=4, rate_scale=4.0, limit=2))
    assert [(r.timestamp_ms, r.input_length) for r in result] == [(0.0, 104), (250.0, 105)]


def test_clipping_keeps_whole_prefix_blocks_and_the_rest_untouched() -> None:
    from fleetserve.workload.transform import clip_lengths

    long = TraceRequest(0.0, 2000, 900, hash_ids=(1, 2, 3, 4), hash_block_size=512)
    short = TraceRequest(1.0, 100, 10)
    clipped, untouched = clip_lengths([long, short], max_input=1100, max_output=500)
    assert (clipped.input_length, clipped.output_length, clipped.hash_ids) == (1100, 500, (1, 2, 3))
    assert untouched == short
