"""Ties go to the fastest engine, and no policy queues a request on an engine while another sits idle."""

from __future__ import annotations

import pytest

from fleetserve.routing import EngineView, FleetView, RequestInfo, make_policy

# examples/hetero-fleet.yaml's capacities relative to the L4 (the engine model's figures)
CAPACITY = {"h100": 4.3, "a100": 3.76, "l4": 1.0}
TIE_BREAKING = [
    "least_request", "least_kv", "power_of_two", "prefix_aware", "kv_cost", "laps", "slo_aware", "scored",
]  # fmt: skip


def idle_fleet(**load: tuple[int, int]) -> FleetView:
    engines = {}
    for kind, count in (("h100", 4), ("a100", 4), ("l4", 8)):
        for index in range(count):
            engine_id = f"{kind}-{index}"
            in_flight, waiting = load.get(engine_id.replace("-", "_"), (0, 0))
            engines[engine_id] = EngineView(
                engine_id, "m", gpu=kind, capacity=CAPACITY[kind], in_flight=in_flight, waiting=waiting
            )
    return FleetView(engines)


def request(index: int, prompt: int = 64) -> RequestInfo:
    return RequestInfo(
        f"r{index}", "m", prompt_len=prompt, prompt_token_ids=list(range(index, index + prompt))
    )


@pytest.mark.parametrize("name", TIE_BREAKING)
def test_an_idle_fleet_serves_sequential_requests_on_its_fastest_gpus(name: str) -> None:
    policy = make_policy(name, seed=3)
    chosen = []
    for index in range(30):  # each finishes before the next arrives, so the fleet is idle every time
        decision = policy.choose(request(index), idle_fleet(), float(index))
        policy.on_dispatch(request(index), decision.engine_id, float(index))
        policy.on_finish(request(index), decision.engine_id, float(index) + 0.5)
        chosen.append(decision.engine_id)
    if name == "power_of_two":  # two random candidates, the faster of the pair: an L4 only if both are
        assert sum(engine.startswith("l4") for engine in chosen) < 13
    else:
        assert all(engine.startswith("h100") for engine in chosen), chosen


@pytest.mark.parametrize("name", ["prefix_aware", "kv_cost", "dualmap", "scored"])
def test_cache_aware_policies_send_to_an_idle_engine_rather_than_queue(name: str) -> None:
    policy = make_policy(name, seed=1)
    prompt = request(0, prompt=512)
    # learn that h100-0 holds the prompt, then let it queue while everything else is idle
    first = policy.choose(prompt, idle_fleet(), 0.0)
    policy.on_dispatch(prompt, first.engine_id, 0.0)
    holder = first.engine_id.replace("-", "_")
    again = RequestInfo("again", "m", prompt_len=512, prompt_token_ids=list(range(512)))
    fleet = idle_fleet(**{holder: (6, 3)})
    decision = policy.choose(again, fleet, 1.0)
    chosen = fleet.engines[decision.engine_id]
    assert decision.engine_id != first.engine_id and chosen.in_flight == chosen.waiting == 0
    if decision.reason == "idle_engine":  # the guard chose: the fastest of the idle engines
        assert decision.engine_id.startswith("h100")
