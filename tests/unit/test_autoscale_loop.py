"""The fleet's autoscaling loop (the object both clocks drive), the membership record it reads, the
activator stage that holds requests while a group at zero starts a replica, and scale to zero in the
twin."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from fleetserve.autoscale.activator import ActivatorStage
from fleetserve.autoscale.loop import AutoscaledGroup, FleetAutoscaler
from fleetserve.config import ConfigError, FleetConfig, parse_fleet
from fleetserve.control import EngineChange, EngineEvent, FleetActuator, next_engine_id
from fleetserve.control.members import FleetMembers
from fleetserve.pipeline import Hold, Proceed
from fleetserve.routing.base import EngineView, FleetView, RequestInfo
from fleetserve.sim import simulate
from fleetserve.workload import TraceRequest

GROUP = {"name": "l4", "gpu": "l4", "model": "llama-3-8b"}


class ScriptedActuator(FleetActuator):
    """Engines that come up when the test says so: a pure stand-in for an actuator, since this tests
    the loop's arithmetic; the live and simulated actuators are tested with real processes and the
    simulator."""

    def __init__(self) -> None:
        super().__init__()
        self.live: set[str] = set()
        self.log: list[tuple[str, str]] = []

    def start(self, group: str, now: float) -> str:
        engine_id = next_engine_id(group, self.live)
        self.live.add(engine_id)
        self.log.append(("start", engine_id))
        self._emit(EngineChange(engine_id, group, EngineEvent.STARTING, now))
        return engine_id

    def ready(self, engine_id: str, group: str, now: float) -> None:
        self._emit(EngineChange(engine_id, group, EngineEvent.READY, now))

    def drain(self, engine_id: str, now: float, timeout_s: float | None = None) -> None:
        self.log.append(("drain", engine_id))
        self._emit(EngineChange(engine_id, "l4", EngineEvent.DRAINING, now))

    def stop(self, engine_id: str, now: float) -> None:
        self.log.append(("stop", engine_id))
        self.live.discard(engine_id)
        self._emit(EngineChange(engine_id, "l4", EngineEvent.GONE, now))

    def manages(self, engine_id: str) -> bool:
        return engine_id in self.live


class Totals:
    """A scripted group total: the value of the last step at or before `now`."""

    def __init__(self, steps: Sequence[tuple[float, float]]) -> None:
        self.steps = steps

    def group_total(self, group: AutoscaledGroup, ready: Sequence[str], now: float) -> float | None:
        return [value for at, value in self.steps if at <= now][-1] if ready else None


class Idle:
    def reading(self, engine_id: str, name: str, now: float) -> float:
        return 0.0

    def in_flight(self, engine_id: str) -> int:
        return 0


def loop(
    autoscale: dict, source: Totals | None = None, demand: dict[str, int] | None = None
) -> tuple[FleetAutoscaler, ScriptedActuator, FleetMembers]:
    config = FleetConfig.model_validate({"engines": [{**GROUP, "autoscale": autoscale}]})
    actuator = ScriptedActuator()
    members = FleetMembers()
    actuator.subscribe(members.record)
    for instance in config.instances():
        members.adopt(instance.engine_id, "l4", 0.0)
        actuator.live.add(instance.engine_id)
    counts = {} if demand is None else demand
    autoscaler = FleetAutoscaler(
        config.autoscaled_groups(),
        actuator,
        members,
        Idle(),
        0.0,
        lambda model: counts.get(model, 0),
        source,
    )
    return autoscaler, actuator, members


def test_members_follow_the_actuator_events() -> None:
    members = FleetMembers()
    members.adopt("a", "g", 0.0)
    members.record(EngineChange("b", "g", EngineEvent.STARTING, 1.0))
    assert members.counts() == {("g", "starting"): 1, ("g", "ready"): 1, ("g", "draining"): 0}
    members.record(EngineChange("b", "g", EngineEvent.READY, 3.0))
    members.record(EngineChange("a", "g", EngineEvent.DRAINING, 4.0))
    members.record(EngineChange("a", "g", EngineEvent.READY, 5.0))  # a drain is final
    assert [(m.engine_id, m.state, m.since) for m in members.of_group("g")] == [
        ("a", EngineEvent.DRAINING, 4.0),
        ("b", EngineEvent.READY, 3.0),
    ]
    members.record(EngineChange("a", "g", EngineEvent.GONE, 6.0))
    assert members.get("a") is None and len(members.all()) == 1


def test_the_loop_follows_a_scripted_metric_up_and_down() -> None:
    autoscale = {"policy": "kpa", "max_replicas": 8, "target": 10, "interval_s": 1, "stable_window_s": 1,
                 "panic_window_s": 1, "scale_down_cooldown_s": 0}  # fmt: skip
    autoscaler, actuator, members = loop(autoscale, Totals([(0, 10), (3, 30), (6, 8)]))
    for now in range(10):
        autoscaler.run(float(now))
        for member in members.of_group("l4"):
            if member.state is EngineEvent.STARTING and now - member.since >= 1:
                actuator.ready(member.engine_id, "l4", float(now))
    moves = [(event.at, event.before, event.after, event.reason) for event in autoscaler.events]
    # at 4 the replica started at 3 is not ready yet, so one step may only double the 1 ready
    assert moves == [(3.0, 1, 2, "scale"), (5.0, 2, 3, "scale"), (6.0, 3, 1, "scale")]
    # shed: the replica still starting first, then the idlest ready one
    assert actuator.log == [("start", "l4-0"), ("start", "l4-1"), ("stop", "l4-1"), ("drain", "l4-0")]
    assert autoscaler.cold_starts == 2


def test_a_group_at_zero_starts_a_replica_as_soon_as_a_request_waits() -> None:
    demand: dict[str, int] = {}
    autoscale = {"policy": "kpa", "min_replicas": 0, "max_replicas": 2, "interval_s": 60}
    autoscaler, actuator, _ = loop(autoscale, demand=demand)
    actuator.stop("l4", 0.0)  # the group's one replica is gone
    assert autoscaler.activate(1.0) == []  # nothing waits: nothing to do before the next round
    demand["llama-3-8b"] = 3
    (event,) = autoscaler.activate(2.0)
    assert (event.before, event.after, event.reason, event.observed) == (0, 1, "activate", 3.0)
    assert actuator.log[-1] == ("start", "l4-0")
    assert autoscaler.activate(3.0) == []  # one is starting already


def view(*engines: EngineView) -> FleetView:
    return FleetView({engine.engine_id: engine for engine in engines})


def request(model: str = "m", request_id: str = "r0") -> RequestInfo:
    return RequestInfo(request_id=request_id, model=model)


def test_the_activator_holds_requests_until_a_replica_of_their_model_is_ready() -> None:
    stage = ActivatorStage(timeouts_s={"m": 30.0})
    assert isinstance(stage.admit(request("other"), view(), 0.0), Proceed)
    held = stage.admit(request("m", "r1"), view(), 1.0)
    assert isinstance(held, Hold) and held.until == 31.0
    assert (held.on_timeout.status, held.on_timeout.reason, held.on_timeout.retry_after_s) == (
        503,
        "cold_start",
        5.0,
    )
    starting = EngineView("m-0", "m", ready=False)
    assert isinstance(stage.admit(request("m", "r2"), view(starting), 2.0), Hold)
    assert stage.waiting("m") == 2 and stage.release(view(starting), 3.0) is None
    up = view(EngineView("m-0", "m"))
    assert [stage.release(up, 4.0).request_id, stage.release(up, 4.0).request_id] == ["r1", "r2"]  # type: ignore[union-attr]
    assert stage.release(up, 4.0) is None
    assert isinstance(stage.admit(request("m", "r3"), up, 5.0), Proceed)
    stage.admit(request("m", "r4"), view(), 6.0)
    stage.withdraw(request("m", "r4"))
    assert stage.waiting("m") == 0


def test_scale_to_zero_is_configured_per_group_and_adds_the_activator() -> None:
    config = parse_fleet(
        "engines:\n  - {name: l4, gpu: l4, model: llama-3-8b, replicas: 0,\n"
        "     autoscale: {min_replicas: 0, activation_timeout_s: 45}}\n"
        "  - {name: h100, gpu: h100-80g, model: llama-3-70b}\n"
    )
    assert config.activation_timeouts() == {"llama-3-8b": 45.0}
    (stage,) = config.stages()
    assert isinstance(stage, ActivatorStage)
    assert FleetConfig.model_validate({"engines": [GROUP]}).stages() == []
    with pytest.raises(
        ConfigError,
        match=r"fleet.yaml:6: engines\[0\].autoscale.activation_timeout_s: Input should be greater than 0",
    ):
        parse_fleet(
            "engines:\n  - name: l4\n    gpu: l4\n    model: llama-3-8b\n    autoscale:\n"
            "      activation_timeout_s: 0\n",
            "fleet.yaml",
        )


def test_in_the_twin_a_group_scales_from_zero_serves_and_returns_to_zero() -> None:
    """Two bursts 20 minutes apart on a group that starts at zero: each first request waits for a cold
    start, every request is served, and the quiet in between brings the group back to zero."""
    burst = [TraceRequest(i * 200.0, 256, 32) for i in range(20)]
    later = [TraceRequest(1_200_000 + i * 200.0, 256, 32) for i in range(20)]
    group = {
        **GROUP,
        "replicas": 0,
        "cold_start_s": 30,
        "autoscale": {"min_replicas": 0, "max_replicas": 2, "stable_window_s": 120, "panic_window_s": 60,
                      "scale_down_cooldown_s": 60, "target": 8},
    }  # fmt: skip
    result = simulate(FleetConfig.model_validate({"engines": [group]}), burst + later)
    summary = result.summary
    assert summary["completed"] == 40
    events = summary["scale_events"]
    assert [(e["from"], e["to"], e["reason"]) for e in events if e["reason"] == "activate"] == [
        (0, 1, "activate"),
        (0, 1, "activate"),
    ]
    assert any(e["to"] == 0 for e in events if 0 < e["t_s"] < 1200)
    ttft = sorted(result.requests.first_token[:20] - result.requests.arrival[:20])
    assert ttft[0] >= 20  # even the last of the burst waited for most of the cold start
    assert ttft[-1] == pytest.approx(30.0, abs=1.0)  # the first waited for all of it


def test_in_the_twin_a_request_that_waits_longer_than_the_activation_timeout_gets_503() -> None:
    group = {
        **GROUP,
        "replicas": 0,
        "cold_start_s": 60,
        "autoscale": {"min_replicas": 0, "activation_timeout_s": 10},
    }
    trace = [TraceRequest(0.0, 256, 32), TraceRequest(65_000.0, 256, 32)]
    summary = simulate(FleetConfig.model_validate({"engines": [group]}), trace).summary
    assert summary["failures"] == {"cold_start": 1}
    assert summary["completed"] == 1  # the second came after the replica was up
