"""The pipeline's priority stage and a fleet that changes shape, driven through the public entry points
(`fleetserve serve`, the OpenAI client, the admin API) and through the simulator (`simulate`, a fleet
script) with the same scripted input: both worlds must serve the same requests in the same order on the
same engines.

The live side is made deterministic by sending requests one after another (or, for the queue, by
waiting until the gateway says each one is held before sending the next), so that order and placement
depend on the decisions alone, not on timing."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import openai
from tests.helpers import wait_until
from tests.integration.gateway_harness import (
    Process,
    fleet_with_admin,
    get_json,
    metric_value,
    post_json,
    start_serve,
)

from fleetserve.config import FleetConfig
from fleetserve.control import parse_fleet_script
from fleetserve.sim import SimOptions, simulate
from fleetserve.workload import TraceRequest

PROMPT_TOKENS = 40  # about what the gateway estimates for PROMPT (its length / 4 + 1)
PROMPT = "x" * (4 * (PROMPT_TOKENS - 1))


def _fleet(engines: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return fleet_with_admin(engines, router={"policy": "round_robin", "debug_header": True}, **extra)


def _complete(client: openai.OpenAI, max_tokens: int, priority: int | None = None) -> str:
    """One completion; returns the engine that served it (the gateway's debug header)."""
    headers = {} if priority is None else {"x-fleetserve-priority": str(priority)}
    raw = client.completions.with_raw_response.create(
        model="llama-3-8b",
        prompt=PROMPT,
        max_tokens=max_tokens,
        extra_body={"ignore_eos": True},
        extra_headers=headers,
    )
    raw.parse()
    return raw.headers["x-fleetserve-route"].split(";")[0]


def _routable(admin: str) -> set[str]:
    return {e["id"] for e in get_json(admin + "/engines")["engines"] if e["health"] == "healthy"}


PRIORITIES = (0, 5, 2, 5)  # served: both 5s in arrival order, then 2, then 0


def test_the_priority_queue_orders_the_same_requests_alike_live_and_in_the_twin(tmp_path: Path) -> None:
    pipeline = [{"stage": "priority", "params": {"slots_per_engine": 1, "max_wait_s": 120}}]
    group = {"name": "l4", "gpu": "l4", "model": "llama-3-8b", "time_scale": 2.0}
    fleet = _fleet([group], pipeline=pipeline)
    serve, url, _ = start_serve(tmp_path, fleet)
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        gateway = Process(serve.popen, url, "gateway")
        finished: list[int] = []
        lock = threading.Lock()

        def send(index: int, max_tokens: int, priority: int) -> None:
            _complete(client, max_tokens, priority)
            with lock:
                finished.append(index)

        blocker = threading.Thread(target=send, args=(-1, 48, 0))
        blocker.start()
        wait_until(lambda: metric_value(gateway, "fleetserve_gateway_requests_in_flight") == 1, timeout=20)
        threads = []
        for index, priority in enumerate(PRIORITIES):
            thread = threading.Thread(target=send, args=(index, 4, priority))
            thread.start()
            threads.append(thread)
            wait_until(
                lambda n=index + 1: metric_value(gateway, "fleetserve_gateway_requests_held") == n, timeout=20
            )
        blocker.join(timeout=120)
        for thread in threads:
            thread.join(timeout=120)
        assert finished[0] == -1, "the blocker finished after requests queued behind it"
        live_order = finished[1:]
    finally:
        serve.kill()

    config = FleetConfig.model_validate({**fleet, "engines": [group]})
    trace = [TraceRequest(0.0, PROMPT_TOKENS, 48)] + [
        TraceRequest(10.0 * (i + 1), PROMPT_TOKENS, 4, priority=p) for i, p in enumerate(PRIORITIES)
    ]
    result = simulate(config, trace, "round_robin")
    first_tokens = result.requests.first_token[1:]
    sim_order = sorted(range(len(PRIORITIES)), key=lambda i: first_tokens[i])
    assert live_order == sim_order == [1, 3, 2, 0]


def test_a_scripted_scale_out_and_in_places_requests_alike_live_and_in_the_twin(tmp_path: Path) -> None:
    groups = [
        {"name": "l4", "gpu": "l4", "model": "llama-3-8b"},
        {"name": "h100", "gpu": "h100-80g", "model": "llama-3-8b", "replicas": 0, "cold_start_s": 1.0},
    ]
    fleet = _fleet(groups)
    serve, url, admin = start_serve(tmp_path, fleet)
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        live = [_complete(client, 4) for _ in range(4)]
        started = post_json(admin + "/engines", {"group": "h100"})
        assert started == {"id": "h100-0", "group": "h100", "state": "starting"}
        wait_until(lambda: _routable(admin) == {"l4", "h100-0"}, timeout=60, message=serve.output())
        live += [_complete(client, 4) for _ in range(4)]
        drained = post_json(admin + "/engines/l4/drain", {})
        assert drained["draining"] is True
        wait_until(lambda: _routable(admin) == {"h100-0"}, timeout=30, message=serve.output())
        live += [_complete(client, 4) for _ in range(4)]
    finally:
        serve.kill()

    config = FleetConfig.model_validate({**fleet, "engines": groups})
    trace = [TraceRequest(1000.0 * t, PROMPT_TOKENS, 4) for t in (*range(4), *range(10, 14), *range(20, 24))]
    script = parse_fleet_script([{"at_s": 4, "start": "h100"}, {"at_s": 15, "drain": "l4"}])
    result = simulate(config, trace, "round_robin", options=SimOptions(fleet_script=script))
    ids = list(result["per_engine"])
    twin = [ids[index] for index in result.requests.engine]
    assert live == twin
    assert live[:4] == ["l4"] * 4 and set(live[4:8]) == {"l4", "h100-0"} and live[8:] == ["h100-0"] * 4
