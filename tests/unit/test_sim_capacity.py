import numpy as np
import pytest

from fleetserve.config import parse_fleet
from fleetserve.sim import find_capacity, rate_of, simulate
from fleetserve.workload import TraceRequest
from fleetserve.workload.transform import scale_rate

FLEET = """
engines:
  - {name: l4, gpu: l4, model: llama-3-8b, replicas: 2}
slo: {ttft_ms: 800, tpot_ms: 120}
"""


def _poisson_trace(count: int = 60, rate: float = 1.0, seed: int = 1) -> list[TraceRequest]:
    rng = np.random.default_rng(seed)
    times = np.cumsum(rng.exponential(1000.0 / rate, count))
    return [
        TraceRequest(timestamp_ms=float(t), input_length=int(rng.integers(200, 1200)), output_length=60)
        for t in times
    ]


def test_attainment_falls_as_the_rate_rises():
    fleet, trace = parse_fleet(FLEET), _poisson_trace()
    base = rate_of(trace)
    attainments = [
        simulate(fleet, scale_rate(trace, rate / base), "least_request")["slo_attainment"]
        for rate in (0.5, 2.0, 8.0, 32.0)
    ]
    assert attainments == sorted(attainments, reverse=True)
    assert attainments[0] > 0.9 > attainments[-1]


def test_capacity_brackets_the_target():
    fleet, trace = parse_fleet(FLEET), _poisson_trace()
    result = find_capacity(fleet, trace, "least_request", target=0.9, tolerance=0.05)
    assert result.bounded
    assert result.capacity_rps > 0
    assert result.slo_attainment >= 0.9
    passing = [p.rate_rps for p in result.probes if p.slo_attainment >= 0.9]
    failing = [p.rate_rps for p in result.probes if p.slo_attainment < 0.9]
    assert result.capacity_rps == max(passing)
    assert min(failing) > result.capacity_rps
    assert min(failing) / result.capacity_rps - 1 <= 0.05
    document = result.to_json()
    assert document["capacity_rps"] == result.capacity_rps and document["policy"] == "least_request"


def test_a_lower_target_allows_a_higher_rate():
    fleet, trace = parse_fleet(FLEET), _poisson_trace()
    strict = find_capacity(fleet, trace, "least_request", target=0.95, tolerance=0.05)
    loose = find_capacity(fleet, trace, "least_request", target=0.5, tolerance=0.05)
    assert loose.capacity_rps > strict.capacity_rps


def test_capacity_needs_a_trace_that_spans_time():
    trace = [TraceRequest(timestamp_ms=0.0, input_length=10, output_length=5)] * 3
    with pytest.raises(ValueError, match="two distinct arrival times"):
        find_capacity(parse_fleet(FLEET), trace)


def test_a_probe_past_capacity_stops_once_the_target_is_out_of_reach():
    from fleetserve.sim import SimOptions

    fleet, trace = parse_fleet(FLEET), _poisson_trace(count=200)
    overloaded = scale_rate(trace, 40.0)
    whole = simulate(fleet, overloaded, "least_request").summary
    hasty = simulate(fleet, overloaded, "least_request", options=SimOptions(give_up_below=0.9)).summary
    assert whole["slo_attainment"] < 0.9 and "stopped_early" not in whole
    assert hasty["stopped_early"] is True and hasty["completed"] < whole["completed"]
    assert hasty["slo_attainment"] <= whole["slo_attainment"]  # what it did finish, it counts as before
    # a run that meets the target is never cut short
    calm = simulate(fleet, scale_rate(trace, 0.5), "least_request", options=SimOptions(give_up_below=0.9))
    assert "stopped_early" not in calm.summary and calm.summary["slo_attainment"] >= 0.9


def test_failures_no_rate_changes_end_the_search_with_the_reason():
    from fleetserve.sim.capacity import UnreachableTarget

    fleet = parse_fleet(FLEET)
    trace = [
        TraceRequest(timestamp_ms=100.0 * i, input_length=20000 if i % 3 == 0 else 300, output_length=20)
        for i in range(90)
    ]
    probes = []
    with pytest.raises(UnreachableTarget, match=r"at most 66\.7% at any rate.*30 x engine_rejected"):
        find_capacity(fleet, trace, "least_request", target=0.9, on_probe=probes.append)
    assert len(probes) == 1
