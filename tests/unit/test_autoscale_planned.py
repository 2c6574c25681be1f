"""The `planned` autoscaler: one planner per model sizes every planned group at once from the traffic of
a sliding window, hands its routes to the `planned` routing policy, and runs in the twin."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetserve.autoscale.mix import GpuOption, LengthBuckets
from fleetserve.autoscale.planned import FleetPlanner, PlannedGroup
from fleetserve.config import ConfigError, FleetConfig, parse_fleet
from fleetserve.errors import InputError
from fleetserve.routing.planned import PlannedPolicy
from fleetserve.sim import SimOptions, simulate
from fleetserve.sim.errors import SimInputError
from fleetserve.sim.profiles import ProfileStore, planned_options
from fleetserve.workload import TraceRequest

BUCKETS = LengthBuckets()
SHORT = BUCKETS.bucket_of(100, 20).key  # in:0-128,out:0-32
LONG = BUCKETS.bucket_of(5000, 200).key  # in:4096-6144,out:128-512


def planner(window_s: float = 60.0, l4_max: int = 10, h100_max: int = 10) -> FleetPlanner:
    l4 = GpuOption("l4", 0.8, {SHORT: 10.0}, min_replicas=0, max_replicas=l4_max)  # cannot serve LONG
    h100 = GpuOption("h100-80g", 12.0, {SHORT: 40.0, LONG: 2.0}, min_replicas=0, max_replicas=h100_max)
    return FleetPlanner(
        "m", [PlannedGroup("l4", l4), PlannedGroup("h100", h100)], window_s=window_s, headroom=1.0
    )


def arrive(plan: FleetPlanner, key_len: tuple[int, int], count: int, start: float, span: float) -> None:
    for i in range(count):
        plan.arrived(*key_len, start + span * i / count)


def test_the_plan_sizes_every_group_of_the_model_together() -> None:
    plan = planner()
    arrive(plan, (100, 20), 2400, 0.0, 60.0)  # 40 req/s of short requests
    arrive(plan, (5000, 200), 180, 0.0, 60.0)  # 3 req/s of long documents
    assert plan.demand(60.0) == pytest.approx({SHORT: 40.0, LONG: 3.0})
    # long documents need H100s: 1.5 replicas' worth; the rest of the second H100 takes a quarter of
    # the short traffic, cheap L4s the rest (3 H100s would cost more than 2 H100s and 2 L4s)
    assert (plan.replicas("l4", 60.0), plan.replicas("h100", 60.0)) == (2, 2)
    assert plan.plan is not None and set(plan.plan.routes) == {SHORT, LONG}
    assert plan.notes == []


def test_the_window_forgets_old_traffic_and_an_idle_model_goes_to_its_minimum() -> None:
    plan = planner(window_s=30.0)
    arrive(plan, (100, 20), 300, 0.0, 10.0)  # 30 req/s over the first 10 s
    assert plan.demand(10.0)[SHORT] == pytest.approx(30.0)  # over the time since the start
    assert plan.replicas("l4", 10.0) is None  # no plan before a whole window of traffic
    assert plan.demand(30.0)[SHORT] == pytest.approx(10.0)
    assert plan.replicas("l4", 30.0) == 1
    arrive(plan, (100, 20), 600, 30.0, 10.0)
    assert plan.replicas("l4", 45.0) == 1  # no new plan before the window has passed
    assert plan.replicas("l4", 60.0) == 2
    assert plan.demand(95.0) == {}
    assert (plan.replicas("l4", 95.0), plan.replicas("h100", 95.0)) == (0, 0)


def test_traffic_no_group_serves_is_named_and_too_much_traffic_takes_every_maximum() -> None:
    only_l4 = dataclasses.replace(planner(), groups=planner().groups[:1])
    arrive(only_l4, (5000, 200), 60, 0.0, 60.0)
    arrive(only_l4, (100, 20), 60, 0.0, 60.0)
    assert only_l4.replicas("l4", 60.0) == 1
    assert only_l4.notes and "in:4096-6144,out:128-512" in only_l4.notes[0]
    capped = planner(l4_max=1, h100_max=1)
    arrive(capped, (100, 20), 6000, 0.0, 60.0)  # 100 req/s: more than 1 + 1 replicas carry
    assert (capped.replicas("l4", 60.0), capped.replicas("h100", 60.0)) == (1, 1)
    assert "every group at its maximum" in capped.notes[-1]


def test_two_groups_of_one_gpu_type_cannot_share_a_plan() -> None:
    option = GpuOption("l4", 0.8, {SHORT: 10.0})
    with pytest.raises(InputError, match="must differ in GPU type"):
        FleetPlanner("m", [PlannedGroup("a", option), PlannedGroup("b", option)])


@settings(max_examples=50, deadline=None)
@given(short=st.integers(0, 3000), long=st.integers(0, 300), window=st.floats(10, 300), now=st.floats(0, 400))
def test_every_plan_keeps_each_group_within_its_bounds(
    short: int, long: int, window: float, now: float
) -> None:
    plan = planner(window_s=window, l4_max=4, h100_max=3)
    arrive(plan, (100, 20), short, 0.0, 60.0)
    arrive(plan, (5000, 200), long, 0.0, 60.0)
    l4, h100 = plan.replicas("l4", now), plan.replicas("h100", now)
    if now < window:
        assert l4 is None and h100 is None  # warming up
        return
    assert l4 is not None and h100 is not None
    assert 0 <= l4 <= 4 and 0 <= h100 <= 3
    if plan.demand(now).get(LONG, 0.0) > 0:
        assert h100 >= 1  # only the H100s serve long documents


FLEET = """
engines:
  - name: l4
    gpu: l4
    model: llama-3-8b
    replicas: 1
    cold_start_s: 20
    autoscale: {policy: planned, min_replicas: 0, max_replicas: 8, interval_s: 10, plan_window_s: 60}
  - name: h100
    gpu: h100-80g
    model: llama-3-8b
    replicas: 0
    cold_start_s: 20
    autoscale: {policy: planned, min_replicas: 0, max_replicas: 4, interval_s: 10, plan_window_s: 60}
router: {policy: planned}
slo: {ttft_ms: 2000, tpot_ms: 100}
"""


def test_in_the_twin_the_plan_follows_the_traffic_and_routes_it(tmp_path: Path) -> None:
    """Short chat, then long documents join in, then quiet: the planned groups grow, take the long
    documents on H100s, and shrink; every request is served."""
    config = parse_fleet(FLEET)
    chat = [TraceRequest(i * 250.0, 200, 64) for i in range(2400)]  # 4 req/s for 600 s
    documents = [TraceRequest(200_000 + i * 1000.0, 3500, 200) for i in range(200)]  # 1 req/s, 200-400 s
    trace = sorted(chat + documents, key=lambda r: r.timestamp_ms)
    buckets = {BUCKETS.bucket_of(r.input_length, r.output_length) for r in trace}
    options = planned_options(config, buckets, ProfileStore(tmp_path))
    result = simulate(config, trace, options=SimOptions(planned_options=options))
    summary = result.summary
    assert summary["completed"] == len(trace)
    events = summary["scale_events"]
    assert {event["reason"] for event in events} == {"planned"}
    h100_sizes = [event["to"] for event in events if event["group"] == "h100"]
    assert h100_sizes and max(h100_sizes) >= 1  # the documents brought H100s
    assert h100_sizes[-1] < max(h100_sizes)  # and their end took them away
    assert summary["plans"]["llama-3-8b"]["replicas"]["l4"] >= 1
    assert summary["slo_attainment"] >= 0.8  # the misses: the 60 s window reacts a window late


def test_planned_groups_need_profiles_and_a_gpu() -> None:
    config = parse_fleet(FLEET)
    with pytest.raises(SimInputError, match="needs each planned group's GPU profile"):
        simulate(config, [TraceRequest(0.0, 100, 10)])
    with pytest.raises(ConfigError, match="a planned group needs a gpu"):
        parse_fleet(
            "engines:\n  - {name: cpu, kind: llamacpp, model: smollm2, autoscale: {policy: planned}}\n"
        )
    # a plan's groups: one option each
    assert (
        FleetConfig.model_validate(
            {"engines": [{"name": "l4", "gpu": "l4", "model": "llama-3-8b"}]}
        ).planned_groups()
        == []
    )


def test_each_new_plan_is_handed_to_the_planned_routing_policy(tmp_path: Path) -> None:
    config = parse_fleet(FLEET)
    trace = [TraceRequest(i * 250.0, 200, 64) for i in range(1200)]  # 4 req/s of chat for 300 s
    buckets = {BUCKETS.bucket_of(r.input_length, r.output_length) for r in trace}
    options = planned_options(config, buckets, ProfileStore(tmp_path))
    policy = PlannedPolicy()
    result = simulate(config, trace, policy, options=SimOptions(planned_options=options))
    chat = BUCKETS.bucket_of(200, 64).key
    # an L4 sustains 5 req/s of this chat, planned at 80%: 4 req/s take two
    assert result.summary["plans"]["llama-3-8b"]["replicas"] == {"l4": 2, "h100-80g": 0}
    assert policy.routes == {chat: {"l4": pytest.approx(4.0, rel=0.05)}}  # all of it to the L4s
