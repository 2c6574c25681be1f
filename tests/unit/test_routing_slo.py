from __future__ import annotations

import pytest
from tests.unit.routing_views import engine, fleet, request

from fleetserve.config import EngineArgs
from fleetserve.fleet.view import TTFTEstimate
from fleetserve.model.catalog import default_catalog
from fleetserve.model.cost import CostModel
from fleetserve.model.engine import EngineModel
from fleetserve.model.scheduler import SchedulerConfig
from fleetserve.routing import EngineView, RejectRequest, make_policy
from fleetserve.routing.slo import SLOAwarePolicy

SYSTEM = list(range(1000, 1000 + 16 * 32))  # a 32-block shared prefix


def per_token(seconds: float):
    """A predictor that charges `seconds` per uncached prompt token."""
    return lambda prompt_len, cached: seconds * max(1, prompt_len - cached)


def test_picks_the_fastest_predicted_engine() -> None:
    policy = SLOAwarePolicy()
    view = fleet(engine("slow", predictor=per_token(0.003)), engine("fast", predictor=per_token(0.001)))
    decision = policy.choose(request("r", list(range(500))), view, 0.0)
    assert decision.engine_id == "fast" and decision.reason == "lowest_ttft"


def test_cached_prefix_makes_the_slower_engine_faster() -> None:
    policy = SLOAwarePolicy()
    view = fleet(engine("slow", predictor=per_token(0.002)), engine("fast", predictor=per_token(0.001)))
    first = request("first", [*SYSTEM, 1])
    policy.on_dispatch(first, "slow", 0.0)  # the approximate index learns that slow holds the prefix
    policy.on_finish(first, "slow", 1.0)
    # slow recomputes ~16 tokens at 2 ms, fast all 530 at 1 ms
    assert policy.choose(request("second", [*SYSTEM, 2, 3]), view, 1.0).engine_id == "slow"


def test_the_view_predictor_sees_in_flight_requests_the_engine_has_not_reported() -> None:
    # the gateway's predictor counts max(waiting, in_flight - running) typical prompts ahead
    catalog = default_catalog()
    cost = CostModel(catalog.gpu("h100-80g"), catalog.model("llama-3-8b"))

    def live(in_flight: int, running: int) -> EngineView:
        queued = max(0, in_flight - running)
        predictor = TTFTEstimate(cost, cost.prefill_time(1024), queued)
        return engine(f"e{in_flight}-{running}", in_flight=in_flight, running=running, predictor=predictor)

    policy = SLOAwarePolicy()
    burst, reported, idle = live(4, 0), live(4, 4), live(0, 0)
    predicted = policy.estimator.predict(request("r", list(range(500))), [burst, reported, idle], {})
    assert predicted[reported.engine_id] == pytest.approx(predicted[idle.engine_id])
    assert predicted[burst.engine_id] > predicted[idle.engine_id] + 3 * cost.prefill_time(1024) * 0.99
    view = fleet(burst, idle)
    assert policy.choose(request("r2", list(range(500))), view, 0.0).engine_id == idle.engine_id


def test_unmeetable_slo_is_rejected_with_429_only_when_asked() -> None:
    view = fleet(engine("a", predictor=per_token(0.01)))
    req = request("r", list(range(200)))  # 2 s everywhere
    rejecting = SLOAwarePolicy(ttft_slo_ms=1000, reject_when_unmeetable=True)
    with pytest.raises(RejectRequest) as caught:
        rejecting.choose(req, view, 0.0)
    assert caught.value.status == 429 and "1000 ms" in caught.value.message
    assert SLOAwarePolicy(ttft_slo_ms=1000).choose(req, view, 0.0).reason == "slo_unmeetable"
    # the request's own objective wins over the fleet's
    loose = request("loose", list(range(200)), ttft_slo_ms=5000.0)
    assert rejecting.choose(loose, view, 0.0).reason == "lowest_ttft"


def test_engines_without_a_predictor_rank_last_by_load() -> None:
    policy = SLOAwarePolicy(seed=0)
    view = fleet(engine("x", in_flight=2), engine("y"), engine("z", predictor=per_token(10.0)))
    assert policy.choose(request("r", [1, 2, 3]), view, 0.0).engine_id == "z"
    del view.engines["z"]  # type: ignore[attr-defined]
    decision = policy.choose(request("r2", [1, 2, 3]), view, 0.0)
    assert decision == decision.__class__("y", "no_prediction")


def test_engine_model_predictor_prefers_the_faster_gpu() -> None:
    catalog = default_catalog()
    model = catalog.model("llama-3-8b")

    def predictor(gpu: str):
        cost = CostModel(catalog.gpu(gpu), model)
        return EngineModel(cost, SchedulerConfig.from_args(EngineArgs())).predict_ttft

    view = fleet(engine("l4", predictor=predictor("l4")), engine("h100", predictor=predictor("h100-80g")))
    assert make_policy("slo_aware", {}).choose(request("r", list(range(4000))), view, 0.0).engine_id == "h100"
