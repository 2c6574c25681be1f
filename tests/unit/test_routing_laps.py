from __future__ import annotations

import pytest

from fleetserve.routing import EngineView, FleetView, RequestInfo, make_policy
from fleetserve.routing.laps import LAPSPolicy


def fleet(*engines: EngineView) -> FleetView:
    return FleetView({engine.engine_id: engine for engine in engines})


def engine(engine_id: str, **fields: object) -> EngineView:
    return EngineView(engine_id=engine_id, model="m", **fields)  # type: ignore[arg-type]


def request(request_id: str, prompt_len: int) -> RequestInfo:
    return RequestInfo(request_id=request_id, model="m", prompt_len=prompt_len)


def test_prompts_split_by_length_at_the_threshold() -> None:
    policy = LAPSPolicy(seed=0)
    view = fleet(engine("a"), engine("b"), engine("c"), engine("d"))
    short = policy.choose(request("s", 256), view, 0.0)
    long = policy.choose(request("l", 257), view, 0.0)
    lanes = policy.lanes("m")
    assert short.reason == "short_lane" and lanes[short.engine_id] == "short"
    assert long.reason == "long_lane" and lanes[long.engine_id] == "long"
    assert sorted(lanes.values()) == ["long", "long", "short", "short"]


def test_initial_split_weighs_capacity() -> None:
    # one H100-like engine holds 3/6 of the capacity: it alone makes the short lane's half
    policy = LAPSPolicy(short_fraction=0.5)
    view = fleet(engine("big", capacity=3.0), engine("l1"), engine("l2"), engine("l3"))
    policy.choose(request("r", 10), view, 0.0)
    assert policy.lanes("m") == {"big": "short", "l1": "long", "l2": "long", "l3": "long"}


def test_small_short_fraction_still_leaves_each_lane_an_engine() -> None:
    policy = LAPSPolicy(short_fraction=0.1)
    policy.choose(request("r", 10), fleet(engine("a"), engine("b")), 0.0)
    assert sorted(policy.lanes("m").values()) == ["long", "short"]


def test_least_normalised_load_within_the_lane() -> None:
    policy = LAPSPolicy(short_fraction=0.5)
    view = fleet(engine("a", capacity=2.0), engine("b", capacity=2.0), engine("c"), engine("d"))
    policy.choose(request("warm", 10), view, 0.0)
    long_lane = [e for e, lane in policy.lanes("m").items() if lane == "long"]
    busy, idle = long_lane
    view.engines[busy].in_flight = 3
    assert policy.choose(request("x", 1000), view, 0.0).engine_id == idle


def test_rebalance_moves_one_engine_to_the_busy_lane_at_most_every_interval() -> None:
    policy = LAPSPolicy(short_fraction=0.5, rebalance_interval_s=5.0)
    view = fleet(*(engine(name) for name in "abcdef"))

    def long_lane_size_after(now: float, name: str) -> int:
        req = request(name, 5000)  # long prompts pile up on the long lane; the short lane stays idle
        policy.on_dispatch(req, policy.choose(req, view, now).engine_id, now)
        return list(policy.lanes("m").values()).count("long")

    assert long_lane_size_after(0.0, "first") == 3  # no backlog anywhere yet
    assert long_lane_size_after(0.0, "second") == 4  # now the long lane is busy and the short one idle
    assert long_lane_size_after(4.9, "third") == 4  # inside the interval
    assert long_lane_size_after(5.0, "fourth") == 5
    assert long_lane_size_after(20.0, "fifth") == 5  # the short lane keeps its last engine


def test_no_move_while_the_backlogs_are_within_the_ratio() -> None:
    policy = LAPSPolicy(rebalance_interval_s=0.0)
    view = fleet(engine("a"), engine("b"), engine("c"), engine("d"))
    for name, tokens in (("s", 200), ("l", 300)):  # 300 < 2 * 200: balanced enough
        req = request(name, tokens)
        policy.on_dispatch(req, policy.choose(req, view, 0.0).engine_id, 0.0)
    policy.choose(request("next", 10), view, 1.0)
    assert sorted(policy.lanes("m").values()) == ["long", "long", "short", "short"]


def test_finished_requests_stop_counting_so_no_move_happens() -> None:
    policy = LAPSPolicy(rebalance_interval_s=0.0)
    view = fleet(engine("a"), engine("b"), engine("c"), engine("d"))
    req = request("l", 5000)
    decision = policy.choose(req, view, 0.0)
    policy.on_dispatch(req, decision.engine_id, 0.0)
    policy.on_finish(req, decision.engine_id, 1.0)
    policy.choose(request("s", 10), view, 2.0)
    assert sorted(policy.lanes("m").values()) == ["long", "long", "short", "short"]


def test_a_lane_without_live_engines_borrows_the_other() -> None:
    policy = LAPSPolicy()
    view = fleet(engine("a"), engine("b"))
    policy.choose(request("r", 10), view, 0.0)
    short_engine = next(e for e, lane in policy.lanes("m").items() if lane == "short")
    view.engines[short_engine].healthy = False
    decision = policy.choose(request("s", 10), view, 1.0)
    assert decision.reason == "short_lane_borrowed" and decision.engine_id != short_engine


def test_registry_builds_it_and_checks_params() -> None:
    policy = make_policy("laps", {"threshold": 128, "short_fraction": 0.3}, seed=1)
    assert isinstance(policy, LAPSPolicy) and policy.threshold == 128
    with pytest.raises(ValueError, match="short_fraction"):
        make_policy("laps", {"short_fraction": 1.5})
