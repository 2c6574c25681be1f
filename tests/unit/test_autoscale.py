"""The autoscalers' arithmetic (AIBrix's KPA and APA: windows, tolerance, step limits, panic, cooldown),
the group scaler (never-ready replicas, what is shed first), the fleet file's `autoscale:` block, and
autoscaling in the simulator."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleetserve.autoscale import APA, KPA, GroupScaler, GroupStatus, MetricWindow, Replica
from fleetserve.config import ConfigError, FleetConfig, parse_fleet
from fleetserve.sim import simulate
from fleetserve.workload.generators import FixedLengths, WorkloadSpec, generate


def window(*samples: tuple[float, float]) -> MetricWindow:
    out = MetricWindow(600.0)
    for when, value in samples:
        out.add(when, value)
    return out


def steady(value: float, until: float = 180.0, every: float = 10.0) -> MetricWindow:
    return window(*((when * every, value) for when in range(int(until / every) + 1)))


def group(replicas: int, ready: int | None = None, low: int = 1, high: int = 100) -> GroupStatus:
    return GroupStatus("g", replicas, replicas if ready is None else ready, low, high)


def test_the_window_means_what_it_holds_and_forgets_the_old() -> None:
    samples = MetricWindow(60.0)
    for when in range(0, 200, 10):
        samples.add(float(when), float(when))
    assert len(samples) == 7  # 130..190: older than the horizon is dropped
    assert samples.mean(190.0, 30.0) == (170 + 180 + 190) / 3
    assert samples.mean(500.0, 30.0) is None


def test_kpa_sizes_the_group_by_the_stable_mean_over_the_target() -> None:
    # the window holds the group's total: 3 replicas at 25 each, target 10 a replica: ceil(75 / 10) = 8,
    # limited to twice the 3 ready
    decision = KPA(10.0).desired(group(3), steady(75.0), 180.0)
    assert (decision.replicas, decision.reason) == (6, "scale")
    assert KPA(10.0).desired(group(4), steady(60.0), 180.0).replicas == 6


def test_kpa_leaves_the_group_alone_within_the_tolerance() -> None:
    for total in (45.5, 50.0, 54.5):  # 5 replicas at 9.1 to 10.9 each
        decision = KPA(10.0).desired(group(5), steady(total), 180.0)
        assert (decision.replicas, decision.reason) == (5, "tolerance")
    assert KPA(10.0).desired(group(5), steady(57.5), 180.0).replicas == 6


def test_steps_are_limited_to_twice_up_and_half_down() -> None:
    assert KPA(10.0).desired(group(4), steady(1000.0), 180.0).replicas == 8
    assert KPA(10.0).desired(group(8), steady(4.0), 180.0).replicas == 4
    assert KPA(10.0).desired(group(0, ready=0), steady(50.0), 180.0).replicas == 1  # from nothing ready: 1
    # starting replicas are kept: one that never becomes ready does not shrink the group
    assert APA(10.0).desired(group(6, ready=1), steady(100.0), 180.0).replicas == 6


def test_no_scale_down_within_the_cooldown_after_a_scale_up() -> None:
    kpa = KPA(10.0, scale_down_cooldown_s=300.0)
    assert kpa.desired(group(2), steady(80.0, until=100), 100.0).replicas == 4
    quiet = steady(4.0, until=390)
    assert kpa.desired(group(4), quiet, 390.0).reason == "cooldown"
    assert kpa.desired(group(4), quiet, 400.0).replicas == 2  # 300 s after the scale-up


def test_kpa_panics_on_a_burst_and_holds_its_high_water_mark() -> None:
    kpa = KPA(10.0, stable_window_s=180.0, panic_window_s=60.0, scale_down_cooldown_s=0.0)
    calm = [(float(t), 20.0) for t in range(0, 130, 10)]  # 2 replicas at the target
    burst = [(float(t), 120.0) for t in range(130, 190, 10)]  # panic mean 120 > 2 x stable mean 53
    decision = kpa.desired(group(2), window(*calm, *burst), 180.0)
    assert (decision.replicas, decision.reason) == (4, "panic")
    # the burst is over, but within a stable window of the last panic the group does not shrink
    after = window(*calm, *burst, *((float(t), 4.0) for t in range(190, 300, 10)))
    held = kpa.desired(group(4), after, 290.0)
    assert held.replicas == 4 and held.reason == "panic"
    # a whole stable window without panic: back to the stable arithmetic
    later = steady(4.0, until=600)
    assert kpa.desired(group(4), later, 600.0).replicas == 2


def test_apa_scales_the_current_replicas_by_observed_over_target() -> None:
    assert APA(10.0).desired(group(5), steady(65.0), 180.0).replicas == 7  # ceil(5 x 13 / 10)
    assert APA(10.0).desired(group(5), steady(52.5), 180.0).reason == "tolerance"
    assert APA(10.0).desired(group(5), window(), 180.0).reason == "no_metric"


def test_the_bounds_win() -> None:
    assert KPA(10.0).desired(group(3, high=4), steady(100.0), 180.0).replicas == 4
    assert KPA(10.0, scale_down_cooldown_s=0).desired(group(3, low=3), steady(0.0), 180.0).replicas == 3


@given(
    replicas=st.integers(0, 40),
    ready_share=st.floats(0, 1),
    value=st.floats(0, 1e4, allow_nan=False),
    low=st.integers(1, 5),
    span=st.integers(0, 40),
    policy=st.sampled_from([KPA, APA]),
)
def test_every_decision_keeps_the_bounds_and_the_step_limits(
    replicas: int, ready_share: float, value: float, low: int, span: int, policy: type
) -> None:
    high = low + span
    ready = int(replicas * ready_share)
    status = group(replicas, ready, low, high)
    decision = policy(10.0).desired(status, steady(value), 180.0)
    assert low <= decision.replicas <= high
    if low <= replicas <= high:  # from within the bounds, one step is limited
        assert decision.replicas <= max(1, replicas, 2 * ready)
        assert decision.replicas >= min(replicas, ready // 2) or decision.replicas == low


def test_the_group_scaler_replaces_never_ready_replicas_and_sheds_the_idlest() -> None:
    scaler = GroupScaler("g", APA(10.0, scale_down_cooldown_s=0.0), 1, 10, ready_timeout_s=100.0)
    for when in range(0, 181, 10):
        scaler.observe(float(when), 20.0)  # the 2 ready replicas on target: keep them
    replicas = [
        Replica("g-0", "ready", 0.0, in_flight=5),
        Replica("g-1", "ready", 0.0, in_flight=5),
        Replica("g-2", "starting", 10.0),  # 170 s starting: never ready
    ]
    actions = scaler.step(replicas, 180.0)
    assert actions.never_ready == ("g-2",) and actions.start == 0 and actions.decision.replicas == 2
    for when in range(190, 400, 10):
        scaler.observe(float(when), 15.0)  # the 3 ready at half the target: half the replicas
    replicas = [
        Replica("g-0", "ready", 0.0, in_flight=4),
        Replica("g-1", "ready", 0.0, in_flight=1),
        Replica("g-3", "ready", 50.0, in_flight=1),
        Replica("g-4", "starting", 390.0),
    ]
    shed = scaler.step(replicas, 400.0)
    # 4 -> 2: the starting one is stopped, then the ready one with the fewest requests (newest on a tie)
    assert shed.stop == ("g-4",) and shed.drain == ("g-3",)


def test_a_bad_autoscale_block_is_refused_with_its_key_and_line() -> None:
    text = """engines:
  - name: l4
    gpu: l4
    model: llama-3-8b
    replicas: 1
    autoscale:
      policy: kpa
      max_replicas: 0
"""
    with pytest.raises(ConfigError) as error:
        parse_fleet(text, "fleet.yaml")
    assert "fleet.yaml:8: engines[0].autoscale.max_replicas" in str(error.value)
    outside = text.replace("max_replicas: 0", "min_replicas: 2\n      max_replicas: 4")
    with pytest.raises(ConfigError, match=r"replicas \(1\) must be within"):
        parse_fleet(outside, "fleet.yaml")


@pytest.mark.parametrize(("metric", "target"), [("in_flight", 4), ("tokens_per_s", 300)])
def test_in_the_twin_a_burst_adds_engines_and_the_quiet_after_it_removes_them(
    metric: str, target: float
) -> None:
    """12 req/s of 128-token answers is ~1,500 tokens/s, 0.5 req/s ~64: either metric sees the burst."""
    lengths = {"input_lengths": FixedLengths(512), "output_lengths": FixedLengths(128)}
    quiet = generate(WorkloadSpec(0.5, duration_s=900.0, seed=0, **lengths))
    burst = generate(WorkloadSpec(12.0, duration_s=120.0, seed=1, **lengths))
    trace = sorted(
        quiet + [dataclasses.replace(r, timestamp_ms=r.timestamp_ms + 120_000) for r in burst],
        key=lambda request: request.timestamp_ms,
    )
    config = FleetConfig.model_validate(
        {
            "engines": [
                {
                    "name": "l4",
                    "gpu": "l4",
                    "model": "llama-3-8b",
                    "autoscale": {"policy": "kpa", "max_replicas": 8, "metric": metric, "target": target},
                }
            ]
        }
    )
    summary = simulate(config, trace).summary
    assert summary["completed"] == summary["requests"] == len(trace)  # drained, never cut
    events = summary["scale_events"]
    peak = max(event["to"] for event in events)
    assert peak >= 3 and any(event["to"] < peak for event in events if event["t_s"] > 240)
    assert summary["cold_starts"] == sum(max(0, e["to"] - e["from"]) for e in events)
    assert summary["gpu_hours"] < peak * summary["duration_s"] / 3600.0  # not the peak all along


def test_in_the_twin_a_replica_that_never_becomes_ready_is_replaced_and_does_not_block_scaling() -> None:
    lengths = {"input_lengths": FixedLengths(512), "output_lengths": FixedLengths(128)}
    trace = generate(WorkloadSpec(6.0, duration_s=400.0, seed=2, **lengths))
    group = {
        "name": "l4",
        "gpu": "l4",
        "model": "llama-3-8b",
        "cold_start_s": 10_000,  # every engine started during the run would take hours to come up
        "autoscale": {"policy": "kpa", "max_replicas": 4, "target": 4, "ready_timeout_s": 60},
    }
    summary = simulate(FleetConfig.model_validate({"engines": [group]}), trace).summary
    assert summary["never_ready"] >= 2  # given up after 60 s, again and again
    assert summary["cold_starts"] > summary["never_ready"]  # each was replaced at once
    assert summary["completed"] == len(trace)  # the one ready replica served everything, late
    assert all(event["to"] <= 4 for event in summary["scale_events"])
