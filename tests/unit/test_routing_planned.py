"""The `planned` routing policy: a plan's per-bucket shares, least-loaded within a GPU type, spill-over."""

from __future__ import annotations

from collections import Counter

import pytest
from tests.unit.routing_views import engine, fleet

from fleetserve.errors import InputError
from fleetserve.routing import RequestInfo, make_policy

SHORT = "in:0-128,out:0-32"


def ask(prompt_len: int = 50, max_tokens: int = 10) -> RequestInfo:
    return RequestInfo("r", "m", prompt_len=prompt_len, max_output_tokens=max_tokens)


def test_a_bucket_is_shared_between_types_in_the_planned_proportions() -> None:
    policy = make_policy("planned", {"routes": {SHORT: {"l4": 3.0, "h100-80g": 1.0}}})
    view = fleet(engine("l4-0", gpu="l4"), engine("l4-1", gpu="l4"), engine("h100", gpu="h100-80g"))
    picks = Counter(policy.choose(ask(), view, 0.0).engine_id for _ in range(40))
    assert picks["h100"] == 10
    assert picks["l4-0"] + picks["l4-1"] == 30


def test_within_a_type_the_least_loaded_engine_wins() -> None:
    policy = make_policy("planned", {"routes": {SHORT: {"l4": 1.0}}})
    view = fleet(engine("l4-0", gpu="l4", in_flight=3), engine("l4-1", gpu="l4", in_flight=1))
    decision = policy.choose(ask(), view, 0.0)
    assert (decision.engine_id, decision.reason) == ("l4-1", "planned")


def test_a_saturated_type_spills_over_to_the_next_best() -> None:
    """Every L4 has requests queued: the request goes to the type with the most profiled capacity for
    its bucket among the others, not to the plan's other bucket's type."""
    params = {
        "routes": {SHORT: {"l4": 1.0}},
        "capacities": {SHORT: {"l4": 5.0, "a100-80g": 20.0, "h100-80g": 40.0}},
    }
    policy = make_policy("planned", params)
    view = fleet(
        engine("l4", gpu="l4", waiting=2),
        engine("a100", gpu="a100-80g"),
        engine("h100", gpu="h100-80g"),
    )
    decision = policy.choose(ask(), view, 0.0)
    assert (decision.engine_id, decision.reason) == ("h100", "spill_over")
    # with a predicted TTFT under the SLO the L4 is not saturated, queue or not
    predicted = make_policy("planned", params | {"ttft_slo_ms": 500.0})
    view.engines["l4"].predictor = lambda prompt, cached: 0.2
    assert predicted.choose(ask(), view, 0.0).engine_id == "l4"
    view.engines["l4"].predictor = lambda prompt, cached: 0.8
    assert predicted.choose(ask(), view, 0.0).reason == "spill_over"


def test_without_a_known_output_the_prompt_length_row_decides() -> None:
    routes = {SHORT: {"l4": 1.0}, "in:0-128,out:512+": {"h100-80g": 1.0}, "in:512-1024,out:0-32": {"l4": 1.0}}
    policy = make_policy("planned", {"routes": routes})
    view = fleet(engine("l4", gpu="l4"), engine("h100", gpu="h100-80g"))
    picks = Counter(policy.choose(ask(max_tokens=0), view, 0.0).engine_id for _ in range(10))
    assert picks == {"l4": 5, "h100": 5}
    # a bucket the plan never saw, on a row it did: the row; a row it never saw: least loaded
    assert policy.choose(ask(prompt_len=600, max_tokens=900), view, 0.0).engine_id == "l4"
    assert policy.choose(ask(prompt_len=5000), view, 0.0).reason == "unplanned"


def test_bad_routes_are_clear_errors() -> None:
    with pytest.raises(InputError, match=r"routes\['in:0-128,out:0-32'\]\['l4'\] must be a rate"):
        make_policy("planned", {"routes": {SHORT: {"l4": -1}}})
    with pytest.raises(InputError, match="must map GPU type"):
        make_policy("planned", {"routes": {SHORT: 3}})
