from __future__ import annotations

import pytest
from tests.unit.routing_views import engine, fleet, request

from fleetserve.routing import make_policy
from fleetserve.routing.scored import ScoredPolicy, spread_score

SYSTEM = list(range(1000, 1000 + 16 * 16))  # a 16-block shared prefix


def test_spread_score_maps_lowest_to_one_and_highest_to_zero() -> None:
    assert spread_score([2.0, 4.0, 3.0]) == [1.0, 0.0, 0.5]
    assert spread_score([5.0, 5.0]) == [1.0, 1.0]
    assert spread_score([None, 1.0]) == [0.0, 1.0]


def test_every_scorer_is_in_zero_one_and_higher_is_better() -> None:
    policy = ScoredPolicy(scorers={"queue": 1, "kv": 1, "prefix": 1, "lora": 1, "predicted_ttft": 1})
    busy = engine("busy", in_flight=6, running=6, kv_usage=0.9, predictor=lambda p, c: 0.002 * (p - c))
    idle = engine("idle", kv_usage=0.1, predictor=lambda p, c: 0.001 * (p - c))
    view = fleet(busy, idle)
    warm = request("warm", [*SYSTEM, 1])
    policy.on_dispatch(warm, "busy", 0.0)
    scores = policy.scores(request("r", [*SYSTEM, 2]), view, list(view.engines.values()), 0.0)
    for values in scores.values():
        assert all(0.0 <= v <= 1.0 for v in values)
    assert scores["queue"] == [0.0, 1.0]
    assert scores["kv"] == pytest.approx([0.1, 0.9])
    assert scores["prefix"] == [1.0, 0.0]
    assert scores["lora"] == [1.0, 1.0]
    assert scores["predicted_ttft"] == [1.0, 0.0]  # 16 uncached tokens at 2 ms beat 257 at 1 ms


def test_default_weights_let_a_long_prefix_hit_outweigh_moderate_load() -> None:
    policy = make_policy("scored", {"scorers": {"queue": 2, "kv": 2, "prefix": 3}})
    view = fleet(engine("holder", in_flight=2, kv_usage=0.5), engine("other", kv_usage=0.4))
    policy.on_dispatch(request("warm", [*SYSTEM, 1]), "holder", 0.0)
    decision = policy.choose(request("r", [*SYSTEM, 2]), view, 0.0)
    # holder: 0 + 2 * 0.5 + 3 = 4.0; other: 2 + 2 * 0.6 + 0 = 3.2
    assert (decision.engine_id, decision.reason) == ("holder", "scored_prefix")


def test_without_a_prefix_the_queue_decides() -> None:
    policy = ScoredPolicy()
    view = fleet(engine("a", in_flight=3), engine("b"))
    assert policy.choose(request("r", list(range(100))), view, 0.0) == policy.choose(
        request("r2", list(range(200, 300))), view, 0.0
    )
    decision = policy.choose(request("r3", list(range(400, 500))), view, 0.0)
    assert (decision.engine_id, decision.reason) == ("b", "scored_queue")


def test_weights_are_validated() -> None:
    with pytest.raises(ValueError, match="valid scorers"):
        make_policy("scored", {"scorers": {"queue": 1, "latency": 2}})
    with pytest.raises(ValueError, match="at least one"):
        make_policy("scored", {"scorers": {"queue": 0}})
    assert make_policy("scored", {"scorers": {"kv": 1, "queue": 0}}).weights == {"kv": 1.0}  # type: ignore[attr-defined]
