"""The live fleet view's TTFT predictor: the engine model's prefill time plus the backlog ahead."""

import pytest

from fleetserve.config import EngineDescription
from fleetserve.fleet.registry import EngineRegistry
from fleetserve.fleet.state import EngineHealth, EngineMetrics, EngineState
from fleetserve.fleet.view import TYPICAL_QUEUED_PROMPT_TOKENS, ViewBuilder
from fleetserve.model.catalog import default_catalog
from fleetserve.model.cost import CostModel
from fleetserve.routing import EngineView


def view_of(gpu: str | None, *, in_flight: int = 0, running: int = 0, waiting: int = 0) -> EngineView:
    registry = EngineRegistry()
    state = EngineState(
        EngineDescription(id="e", url="http://e", model="llama-3-8b", gpu=gpu), EngineHealth(3, 5.0)
    )
    state.metrics = EngineMetrics(running=running, waiting=waiting)
    state.view.in_flight = in_flight
    registry.add(state)
    return ViewBuilder(registry).build().engines["e"]


def cost(gpu: str) -> CostModel:
    catalog = default_catalog()
    return CostModel(catalog.gpu(gpu), catalog.model("llama-3-8b"))


def test_an_idle_engine_predicts_its_own_prefill() -> None:
    predictor = view_of("h100-80g").predictor
    assert predictor is not None
    assert predictor(2048, 0) == pytest.approx(cost("h100-80g").prefill_time(2048))


def test_cached_tokens_shorten_the_prediction_and_slower_gpus_lengthen_it() -> None:
    h100, l4 = view_of("h100-80g").predictor, view_of("l4").predictor
    assert h100 is not None and l4 is not None
    assert h100(4096, 3072) < h100(4096, 0)
    assert l4(4096, 0) > 3 * h100(4096, 0)


def test_backlog_counts_scraped_waiting_or_unreported_dispatches_whichever_is_larger() -> None:
    typical = cost("h100-80g").prefill_time(TYPICAL_QUEUED_PROMPT_TOKENS)
    idle = view_of("h100-80g").predictor
    scraped = view_of("h100-80g", in_flight=3, running=3, waiting=2).predictor
    unreported = view_of("h100-80g", in_flight=6, running=1, waiting=2).predictor
    assert idle is not None and scraped is not None and unreported is not None
    assert scraped(512, 0) - idle(512, 0) == pytest.approx(2 * typical)
    assert unreported(512, 0) - idle(512, 0) == pytest.approx(5 * typical)


def test_engines_the_catalog_does_not_know_have_no_predictor() -> None:
    assert view_of(None).predictor is None
    assert view_of("no-such-gpu").predictor is None
