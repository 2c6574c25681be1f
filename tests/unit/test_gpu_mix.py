"""The GPU-mix planner's pure core (Mélange's integer program, the length buckets) and the planner's
helpers that need no trace: the replica search, the profile workloads, the profile store."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetserve.autoscale.mix import (
    GpuOption,
    LengthBuckets,
    NoFeasibleMix,
    option_name,
    replicas_for,
    solve_mix,
)
from fleetserve.config import EngineGroup, SLOConfig
from fleetserve.errors import InputError
from fleetserve.model.catalog import default_catalog
from fleetserve.sim.planner import fewest_passing
from fleetserve.sim.profiles import (
    MAX_REQUESTS,
    MIN_REQUESTS,
    PROFILE_SECONDS,
    ProfileRequest,
    ProfileStore,
    bucket_workload,
    profile_capacities,
)

SHORT, LONG = "in:0-128,out:0-32", "in:2048-8192,out:0-32"


def test_buckets_cover_every_length_once() -> None:
    buckets = LengthBuckets((128, 512), (32,))
    assert buckets.bucket_of(0, 0).key == "in:0-128,out:0-32"
    assert buckets.bucket_of(128, 31).key == "in:128-512,out:0-32"
    assert buckets.bucket_of(9000, 32).key == "in:512+,out:32+"
    assert buckets.input_bucket_keys(200) == ["in:128-512,out:0-32", "in:128-512,out:32+"]
    with pytest.raises(InputError, match="input_edges"):
        LengthBuckets((512, 128))


def test_the_mix_splits_buckets_by_what_each_gpu_does_best() -> None:
    """A cheap GPU that is good at short prompts and useless at long ones, and a dear one that does
    both: the mix gives each bucket to the GPU that is cheaper per request for it."""
    cheap = GpuOption("l4", 1.0, {SHORT: 10.0, LONG: 0.0})
    dear = GpuOption("h100", 10.0, {SHORT: 40.0, LONG: 4.0})
    plan = solve_mix({SHORT: 40.0, LONG: 4.0}, [cheap, dear])
    assert plan.replicas == {"l4": 4, "h100": 1}
    assert plan.routes == {SHORT: {"l4": 40.0}, LONG: {"h100": 4.0}}
    assert plan.usd_per_hour == pytest.approx(14.0)
    # each type alone: the dear one carries it all with 2 replicas ($20); the cheap one cannot
    assert replicas_for({SHORT: 40.0, LONG: 4.0}, dear) == 2
    with pytest.raises(NoFeasibleMix, match="l4 serves no traffic of bucket"):
        replicas_for({SHORT: 40.0, LONG: 4.0}, cheap)


def test_slices_let_one_bucket_share_two_types() -> None:
    """The last quarter of a bucket that would need a whole extra H100 goes to a cheaper L4 instead."""
    l4 = GpuOption("l4", 1.0, {SHORT: 1.25})
    h100 = GpuOption("h100", 10.0, {SHORT: 30.0})
    plan = solve_mix({SHORT: 40.0}, [l4, h100], slice_factor=4)
    assert plan.replicas == {"l4": 8, "h100": 1}  # $18, against $20 for two H100s
    assert plan.routes[SHORT] == {"l4": 10.0, "h100": 30.0}
    whole = solve_mix({SHORT: 40.0}, [l4, h100], slice_factor=1)
    assert whole.usd_per_hour > plan.usd_per_hour


def test_a_bucket_no_gpu_serves_is_a_clear_error() -> None:
    with pytest.raises(NoFeasibleMix, match="no GPU type serves bucket in:2048-8192"):
        solve_mix({LONG: 1.0}, [GpuOption("l4", 1.0, {LONG: 0.0})])
    with pytest.raises(InputError, match="slice_factor"):
        solve_mix({SHORT: 1.0}, [GpuOption("l4", 1.0, {SHORT: 1.0})], slice_factor=0)


rates = st.floats(min_value=0.05, max_value=50.0)


@settings(max_examples=40, deadline=None)
@given(
    demand=st.dictionaries(st.sampled_from([SHORT, LONG, "in:128-512,out:32-128"]), rates, min_size=1),
    capacity=st.lists(st.lists(rates, min_size=3, max_size=3), min_size=1, max_size=3),
    prices=st.lists(st.floats(min_value=0.1, max_value=20.0), min_size=3, max_size=3),
)
def test_every_plan_carries_its_demand_on_its_replicas(
    demand: dict[str, float], capacity: list[list[float]], prices: list[float]
) -> None:
    keys = [SHORT, LONG, "in:128-512,out:32-128"]
    options = [
        GpuOption(f"gpu{g}", prices[g], dict(zip(keys, row, strict=True))) for g, row in enumerate(capacity)
    ]
    plan = solve_mix(demand, options)
    for key, rate in demand.items():
        assert sum(plan.routes[key].values()) == pytest.approx(rate)
    for option in options:
        load = sum(plan.routes[key].get(option.name, 0.0) / option.capacity_rps[key] for key in demand)
        assert load <= plan.replicas[option.name] + 1e-6
    # never dearer than the best single type
    best_alone = min(replicas_for(demand, option) * option.usd_per_hour for option in options)
    assert plan.usd_per_hour <= best_alone + 1e-6


def test_option_names_carry_the_tp_degree() -> None:
    assert option_name("l4") == "l4"
    assert option_name("h100-80g", 2) == "h100-80g-tp2"


@given(threshold=st.integers(min_value=1, max_value=300), start=st.integers(min_value=1, max_value=300))
def test_the_replica_search_finds_the_fewest_that_pass(threshold: int, start: int) -> None:
    probed: list[int] = []

    def passes(n: int) -> bool:
        probed.append(n)
        return n >= threshold

    assert fewest_passing(passes, start, 256) == (threshold if threshold <= 256 else None)
    assert len(probed) <= 2 * math.log2(300) + 3


def test_a_profile_workload_stays_in_its_bucket_and_lasts_at_every_rate() -> None:
    bucket = LengthBuckets().bucket_of(600, 200)  # in:512-2048, out:128-512
    for rate in (0.5, 10.0, 400.0):
        workload = bucket_workload(bucket, max_context=8192, rate_rps=rate)
        assert len(workload) == min(MAX_REQUESTS, max(MIN_REQUESTS, math.ceil(rate * PROFILE_SECONDS)))
        assert all(512 <= r.input_length < 2048 and 128 <= r.output_length < 512 for r in workload)
    # the open bucket reaches 4x its lower edge, within the context
    top = bucket_workload(LengthBuckets().bucket_of(9000, 600), max_context=32768, rate_rps=1.0)
    assert all(8192 <= r.input_length < 32768 and r.input_length + r.output_length <= 32768 for r in top)
    assert bucket_workload(LengthBuckets().bucket_of(9000, 600), max_context=8192, rate_rps=1.0) == []


def test_profiles_are_measured_once_and_then_read_from_disk(tmp_path: Path) -> None:
    group = EngineGroup(name="h100", model="llama-3-8b", gpu="h100-80g")
    bucket = LengthBuckets().bucket_of(1000, 60)
    requests = [ProfileRequest(group, bucket, SLOConfig(), 0.9)]
    first = ProfileStore(tmp_path)
    measured = profile_capacities(requests, first)
    assert first.measured == 1 and first.hits == 0
    capacity = measured["h100-80g"][bucket.key]
    assert 1.0 < capacity < 200.0  # an 8B model on an H100, ~1000-token prompts
    again = ProfileStore(tmp_path)
    assert profile_capacities(requests, again) == measured
    assert again.measured == 0 and again.hits == 1
    # a different SLO is a different profile, and a tighter one sustains less
    tight = [ProfileRequest(group, bucket, SLOConfig(ttft_ms=200.0, tpot_ms=30.0), 0.9)]
    assert profile_capacities(tight, again)["h100-80g"][bucket.key] < capacity
    assert again.measured == 1
    assert requests[0].key(default_catalog()) != tight[0].key(default_catalog())
