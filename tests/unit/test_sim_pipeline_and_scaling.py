"""The simulator runs the pipeline's stages and a fleet that changes shape on its virtual clock."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fleetserve.config import FleetConfig
from fleetserve.control import parse_fleet_script
from fleetserve.errors import InputError
from fleetserve.model.catalog import default_catalog
from fleetserve.model.cost import ENGINE_START_S, CostModel
from fleetserve.routing import make_policy
from fleetserve.sim import SimOptions, simulate
from fleetserve.workload import TraceRequest


def config(pipeline: list | None = None, **groups: int) -> FleetConfig:
    return FleetConfig.model_validate(
        {
            "engines": [
                {
                    "name": name,
                    "gpu": {"l4": "l4", "h100": "h100-80g"}[name],
                    "model": "llama-3-8b",
                    "replicas": n,
                }
                for name, n in (groups or {"l4": 1}).items()
            ],
            "router": {"policy": "round_robin"},
            "pipeline": pipeline or [],
        }
    )


PRIORITY = [{"stage": "priority", "params": {"slots_per_engine": 1, "max_wait_s": 600}}]


def test_held_requests_are_served_by_priority_then_arrival() -> None:
    trace = [TraceRequest(0.0, 256, 64)] + [
        TraceRequest(100.0 * (i + 1), 256, 8, priority=p) for i, p in enumerate((0, 5, 2, 5))
    ]
    result = simulate(config(PRIORITY), trace, "round_robin")
    first = result.requests.first_token
    order = [int(i) for i in np.argsort(first[1:]) + 1]
    assert order == [2, 4, 3, 1]  # priority 5 (in arrival order), then 2, then 0
    # one at a time: each starts once the one before it has finished
    finish = result.requests.finish
    for before, after in zip([0, *order], order, strict=False):
        assert first[after] >= finish[before] - 1e-9


def test_a_stage_that_never_holds_changes_nothing() -> None:
    trace = [TraceRequest(200.0 * i, 512, 32) for i in range(40)]
    roomy = [{"stage": "priority", "params": {"slots_per_engine": 1000}}]
    plain, staged = simulate(config(), trace, "round_robin"), simulate(config(roomy), trace, "round_robin")
    for name in ("first_token", "finish", "engine"):
        assert np.array_equal(getattr(plain.requests, name), getattr(staged.requests, name))


def test_requests_that_wait_too_long_fail_as_queue_timeouts() -> None:
    stage = [{"stage": "priority", "params": {"slots_per_engine": 1, "max_wait_s": 0.5}}]
    trace = [TraceRequest(0.0, 2048, 256)] + [TraceRequest(10.0, 64, 4) for _ in range(3)]
    result = simulate(config(stage), trace, "round_robin")
    assert result["failures"] == {"queue_timeout": 3} and result["completed"] == 1


def test_a_started_engine_serves_only_after_its_cold_start() -> None:
    cost = CostModel(default_catalog().gpu("h100-80g"), default_catalog().model("llama-3-8b"))
    cold = cost.cold_start_s()
    assert cold == pytest.approx(cost.model.weight_bytes / 2e9 + ENGINE_START_S)
    trace = [TraceRequest(1000.0 * i, 128, 8) for i in range(120)]  # one a second for two minutes
    script = parse_fleet_script([{"at_s": 10, "start": "h100"}])
    result = simulate(config(l4=1, h100=0), trace, "round_robin", options=SimOptions(fleet_script=script))
    engines = result.requests.engine
    served_by_h100 = np.flatnonzero(engines == 1)
    assert served_by_h100.size > 0
    assert result.requests.arrival[served_by_h100].min() >= 10 + cold  # none before it was ready
    h100 = result["per_engine"]["h100-0"]
    assert h100["joined_s"] == 10 and h100["left_s"] is None
    # it is paid for from when it started, cold start included
    assert h100["cost_usd"] == pytest.approx(12.29 * (result["duration_s"] - 10) / 3600)


def test_a_drained_engine_finishes_its_requests_takes_no_more_and_leaves() -> None:
    trace = [TraceRequest(500.0 * i, 128, 64) for i in range(40)]
    script = parse_fleet_script([{"at_s": 5, "drain": "l4-0"}])
    result = simulate(config(l4=2), trace, "round_robin", options=SimOptions(fleet_script=script))
    assert result["completed"] == 40
    later = result.requests.arrival >= 5.0
    assert set(result.requests.engine[later].tolist()) == {1}
    left = result["per_engine"]["l4-0"]["left_s"]
    assert left is not None and 5 <= left < 10


def test_a_drain_timeout_stops_the_engine_and_fails_what_is_left() -> None:
    trace = [TraceRequest(0.0, 128, 4000)]
    script = parse_fleet_script([{"at_s": 1, "drain": "l4", "timeout_s": 2}])
    result = simulate(config(l4=1), trace, "round_robin", options=SimOptions(fleet_script=script))
    assert result["failures"] == {"engine_stopped": 1}
    assert result["per_engine"]["l4"]["left_s"] == pytest.approx(3.0)


def test_fleet_scripts_name_what_is_wrong() -> None:
    with pytest.raises(InputError, match=r"fleet script\[0\]: name exactly one"):
        parse_fleet_script([{"at_s": 1}])
    with pytest.raises(InputError, match=r"\[1\]\.at_s"):
        parse_fleet_script([{"at_s": 1, "start": "a"}, {"at_s": -2, "stop": "a-0"}])
    with pytest.raises(InputError, match="timeout_s: only a drain"):
        parse_fleet_script([{"at_s": 1, "start": "a", "timeout_s": 3}])
    steps = parse_fleet_script([{"at_s": 9, "stop": "b-0"}, {"at_s": 1, "start": "b"}])
    assert [step.action for step in steps] == ["start", "stop"] and not math.isnan(steps[0].at_s)


def test_the_simulated_actuator_reports_each_engine_starting_ready_draining_gone_in_order() -> None:
    from fleetserve.sim.simulator import Simulator

    trace = [TraceRequest(1000.0 * i, 128, 8) for i in range(60)]
    script = parse_fleet_script([{"at_s": 5, "start": "h100"}, {"at_s": 40, "drain": "h100-0"}])
    simulator = Simulator(
        config(l4=1, h100=0), trace, make_policy("round_robin"), SimOptions(fleet_script=script)
    )
    changes: list[tuple[str, str, float]] = []
    simulator.actuator.subscribe(
        lambda change: changes.append((change.engine_id, change.event.value, change.at))
    )
    simulator.run()
    assert [(engine, event) for engine, event, _ in changes] == [
        ("h100-0", "starting"), ("h100-0", "ready"), ("h100-0", "draining"), ("h100-0", "gone"),
    ]  # fmt: skip
    cold = CostModel(default_catalog().gpu("h100-80g"), default_catalog().model("llama-3-8b")).cold_start_s()
    times = [at for _, _, at in changes]
    assert times[:3] == [5.0, pytest.approx(5.0 + cold), 40.0]
    assert times[3] >= 40.0  # when its last request finished
