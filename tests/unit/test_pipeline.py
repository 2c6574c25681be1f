"""The request path and the priority stage: pure code, driven here by hand as either clock drives it."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetserve.named import BadParameters, UnknownName
from fleetserve.pipeline import PROCEED, Hold, Refuse, Refused, RequestPath
from fleetserve.pipeline.priority import PriorityQueueStage
from fleetserve.pipeline.registry import make_stage
from fleetserve.routing import EngineView, FleetView, Policy, make_policy
from fleetserve.routing.base import Decision, RequestInfo


def fleet(*capacities: float, model: str = "m") -> FleetView:
    return FleetView(
        {f"e{i}": EngineView(f"e{i}", model, capacity=capacity) for i, capacity in enumerate(capacities)}
    )


class Recorder(Policy):
    """least_request that writes down every hook call."""

    name = "recorder"

    def __init__(self) -> None:
        self.inner = make_policy("least_request")
        self.calls: list[tuple[str, str, str]] = []

    def choose(self, request: RequestInfo, view: FleetView, now: float) -> Decision:
        return self.inner.choose(request, view, now)

    def on_dispatch(self, request: RequestInfo, engine_id: str, now: float) -> None:
        self.calls.append(("dispatch", request.request_id, engine_id))

    def on_first_token(self, request: RequestInfo, engine_id: str, now: float) -> None:
        self.calls.append(("first_token", request.request_id, engine_id))

    def on_finish(self, request: RequestInfo, engine_id: str, now: float) -> None:
        self.calls.append(("finish", request.request_id, engine_id))


def test_a_session_counts_in_flight_on_the_view_and_runs_every_hook_once() -> None:
    policy = Recorder()
    path = RequestPath(policy, ttft_slo_ms=500.0)
    view = fleet(1.0, 1.0)
    session = path.open("r1", "m", prompt_len=10, arrival=1.0)
    assert session.info.ttft_slo_ms == 500.0 and session.admit(view, 1.0) is PROCEED
    decision = session.choose(view, 1.0)
    session.dispatched(1.0)
    assert view.engines[decision.engine_id].in_flight == 1
    session.first_token(1.5)
    session.finished(2.0, 200, 5, 1.0)
    session.finished(2.0, 200, 5, 1.0)  # twice changes nothing
    assert view.engines[decision.engine_id].in_flight == 0
    assert [call[0] for call in policy.calls] == ["dispatch", "first_token", "finish"]


def test_a_retry_is_one_more_attempt_with_its_own_hooks() -> None:
    policy = Recorder()
    view = fleet(1.0, 1.0)
    session = RequestPath(policy).open("r", "m")
    first = session.choose(view, 0.0).engine_id
    session.dispatched(0.0)
    session.attempt_ended(0.1)
    others = FleetView({k: v for k, v in view.engines.items() if k != first})
    second = session.choose(others, 0.1).engine_id
    session.dispatched(0.1)
    session.finished(0.2, 200)
    assert first != second and all(engine.in_flight == 0 for engine in view.engines.values())
    assert [c[0] for c in policy.calls] == ["dispatch", "finish", "dispatch", "finish"]


def test_no_engine_and_a_shedding_policy_become_refusals_with_reasons() -> None:
    session = RequestPath(make_policy("least_request")).open("r", "other-model")
    with pytest.raises(Refused) as caught:
        session.choose(fleet(1.0), 0.0)
    assert (caught.value.refusal.status, caught.value.refusal.reason) == (503, "no_engine")


def test_the_priority_stage_lets_requests_through_while_the_fleet_has_room() -> None:
    stage = PriorityQueueStage(slots_per_engine=2)
    path = RequestPath(make_policy("least_request"), [stage])
    view = fleet(1.0, 1.5)  # 2 + 3 slots
    sessions = [path.open(str(i), "m") for i in range(6)]
    verdicts = [session.admit(view, 0.0) for session in sessions]
    assert verdicts[:5] == [PROCEED] * 5
    assert isinstance(verdicts[5], Hold) and verdicts[5].until == 30.0 and path.held == 1


def test_held_requests_go_on_by_priority_then_arrival_as_requests_finish() -> None:
    stage = PriorityQueueStage(slots_per_engine=1, max_wait_s=100)
    path = RequestPath(make_policy("least_request"), [stage])
    view = fleet(1.0)
    blocker = path.open("blocker", "m")
    assert blocker.admit(view, 0.0) is PROCEED
    waiting = [
        path.open(name, "m", priority=priority)
        for name, priority in (("low", 0), ("high-1", 5), ("mid", 2), ("high-2", 5))
    ]
    assert all(isinstance(session.admit(view, 1.0), Hold) for session in waiting)
    order = []
    current = blocker
    for now in range(2, 6):
        current.finished(float(now), 200)
        (released,) = path.release(view, float(now))
        assert released.admit(view, float(now)) is PROCEED  # no stage after this one
        order.append(released.info.request_id)
        current = released
    assert order == ["high-1", "high-2", "mid", "low"]
    assert path.release(view, 9.0) == [] and path.held == 0


def test_a_held_request_whose_wait_runs_out_is_refused_and_frees_nothing() -> None:
    stage = PriorityQueueStage(slots_per_engine=1, max_wait_s=10)
    path = RequestPath(make_policy("least_request"), [stage])
    view = fleet(1.0)
    path.open("a", "m").admit(view, 0.0)
    late = path.open("b", "m")
    late.admit(view, 1.0)
    assert path.next_deadline() == 11.0 and path.expired(10.9) == []
    ((session, refusal),) = path.expired(11.0)
    assert session is late and (refusal.status, refusal.reason) == (503, "queue_timeout")
    session.finished(11.0, refusal.status)  # a stage that refused it learns nothing
    assert path.held == 0 and math.isinf(path.next_deadline())


def test_sheddable_requests_are_refused_at_once_when_they_would_wait() -> None:
    path = RequestPath(make_policy("least_request"), [PriorityQueueStage(slots_per_engine=1)])
    view = fleet(1.0)
    assert path.open("a", "m", priority=-1).admit(view, 0.0) is PROCEED  # room: shedding only when full
    verdict = path.open("b", "m", priority=-1).admit(view, 0.0)
    assert isinstance(verdict, Refuse) and verdict.reason == "shed"


def test_models_wait_apart() -> None:
    stage = PriorityQueueStage(slots_per_engine=1)
    path = RequestPath(make_policy("least_request"), [stage])
    view = FleetView({"a": EngineView("a", "m1"), "b": EngineView("b", "m2")})
    path.open("x", "m1").admit(view, 0.0)
    assert isinstance(path.open("y", "m1").admit(view, 0.0), Hold)
    assert path.open("z", "m2").admit(view, 0.0) is PROCEED


def test_unready_engines_give_no_slots() -> None:
    stage = PriorityQueueStage(slots_per_engine=4)
    view = fleet(1.0, 2.0)
    view.engines["e1"].ready = False  # starting or draining
    assert stage.slots("m", view) == 4


def test_stages_are_built_by_name_with_checked_parameters() -> None:
    assert isinstance(make_stage("priority", {"slots_per_engine": 3}), PriorityQueueStage)
    with pytest.raises(UnknownName, match="valid stages: priority"):
        make_stage("cache")
    with pytest.raises(BadParameters, match="valid parameters: max_wait_s, shed_below, slots_per_engine"):
        make_stage("priority", {"slots": 3})
    with pytest.raises(BadParameters, match="slots_per_engine must be at least 1"):
        make_stage("priority", {"slots_per_engine": 0})


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(-1, 3)), min_size=1, max_size=60), st.integers(1, 3))
def test_the_queue_never_exceeds_its_slots_and_releases_in_order(
    steps: list[tuple[bool, int]], slots: int
) -> None:
    """Random arrivals (with priorities) and finishes: what is through never exceeds the slots, each
    release is the best waiting request, and nothing is lost: every request is through, waiting, shed
    or finished."""
    stage = PriorityQueueStage(slots_per_engine=slots, max_wait_s=1e9)
    path = RequestPath(make_policy("least_request"), [stage])
    view = fleet(1.0)
    through: list = []
    waiting: dict[str, tuple[int, int]] = {}  # id -> (-priority, arrival)
    opened = shed = finished = 0
    for step, (arrive, priority) in enumerate(steps):
        now = float(step)
        if arrive or not through:
            opened += 1
            session = path.open(str(step), "m", priority=priority)
            verdict = session.admit(view, now)
            if verdict is PROCEED:
                through.append(session)
            elif isinstance(verdict, Hold):
                waiting[session.info.request_id] = (-priority, step)
            else:
                shed += 1
        else:
            through.pop(0).finished(now, 200)
            finished += 1
            for released in path.release(view, now):
                best = min(waiting.values())
                assert waiting.pop(released.info.request_id) == best
                through.append(released)
        assert len(through) <= slots
        assert path.held == len(waiting)
    assert len(through) + len(waiting) + shed + finished == opened
