from __future__ import annotations

from fleetserve.routing import EngineView, FleetView, RequestInfo, make_policy
from fleetserve.routing.shared import AdapterResidency
from fleetserve.routing.slo import LoraAffinityPolicy

ADAPTERS = frozenset({"a1", "a2", "a3", "a4"})


def fleet(*engines: EngineView) -> FleetView:
    return FleetView({engine.engine_id: engine for engine in engines})


def engine(engine_id: str, **fields: object) -> EngineView:
    fields.setdefault("adapters", ADAPTERS)
    fields.setdefault("max_loras", 2)
    return EngineView(engine_id=engine_id, model="m", **fields)  # type: ignore[arg-type]


def request(request_id: str, adapter: str | None) -> RequestInfo:
    return RequestInfo(request_id=request_id, model="m", adapter=adapter, prompt_len=10)


def route(policy: LoraAffinityPolicy, req: RequestInfo, view: FleetView, first_token: bool = True):
    decision = policy.choose(req, view, 0.0)
    policy.on_dispatch(req, decision.engine_id, 0.0)
    if first_token:
        policy.on_first_token(req, decision.engine_id, 0.0)
    return decision


def test_scores_follow_llm_d_tiers() -> None:
    residency = AdapterResidency()
    full, loading = engine("full"), engine("loading")
    for adapter in ("a1", "a2"):
        req = request(f"r-{adapter}", adapter)
        residency.dispatched(req, "full")
        residency.first_token(req)
    residency.dispatched(request("pending", "a3"), "loading")
    assert residency.score(full, "a1") == 1.0
    assert residency.score(loading, "a3") == 0.6
    assert residency.score(loading, "a1") == 0.8  # one of its two slots is free
    assert residency.score(full, "a3") == 0.0  # both slots hold other adapters
    assert residency.score(full, None) == 1.0


def test_requests_for_an_adapter_gather_where_it_is_resident() -> None:
    policy = LoraAffinityPolicy(seed=0)
    view = fleet(engine("e1"), engine("e2"), engine("e3"))
    home = route(policy, request("first", "a1"), view)
    assert home.reason == "adapter_free_slot"
    view.engines[home.engine_id].in_flight = 5  # busier than the others, but holds the adapter
    again = route(policy, request("second", "a1"), view)
    assert again.engine_id == home.engine_id and again.reason == "adapter_resident"


def test_while_loading_a_second_request_follows_the_first() -> None:
    policy = LoraAffinityPolicy(seed=0)
    view = fleet(engine("e1", max_loras=1), engine("e2", max_loras=1))
    route(policy, request("x", "a2"), view)  # fills one engine's only slot with a2
    loading = route(policy, request("first", "a1"), view, first_token=False)
    follower = policy.choose(request("second", "a1"), view, 0.0)
    assert follower == loading.__class__(loading.engine_id, "adapter_loading")


def test_least_recently_used_adapters_leave_the_slots() -> None:
    policy = LoraAffinityPolicy()
    view = fleet(engine("only", max_loras=2))
    for name, adapter in (("1", "a1"), ("2", "a2"), ("3", "a3")):
        route(policy, request(name, adapter), view)
    assert policy.residency.score(view.engines["only"], "a1") == 0.0
    assert policy.residency.score(view.engines["only"], "a3") == 1.0


def test_ties_go_to_the_least_normalised_load() -> None:
    view = fleet(engine("big", capacity=4.0, in_flight=4), engine("small", in_flight=2))
    decision = make_policy("lora_affinity", {}).choose(request("r", None), view, 0.0)
    assert decision.engine_id == "big" and decision.reason == "adapter_resident"
