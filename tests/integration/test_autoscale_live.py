"""Autoscaling on the live fleet, through the public entry points: `fleetserve serve` with emulated
engines as real processes, the official OpenAI client, the admin API and /metrics. A burst adds
engines and the quiet after it removes them with every request answered; a group at zero starts a
replica for the first request; a replica that dies before it is ready is counted and replaced; and the
live gateway and the simulator take the same decisions on the same scripted metrics."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import openai
import pytest
from tests.helpers import free_ports, wait_until
from tests.integration.gateway_harness import Process, fleet_with_admin, get_json, metric_value, start_serve

from fleetserve.autoscale.loop import AutoscaledGroup
from fleetserve.autoscale.mix import LengthBuckets
from fleetserve.config import FleetConfig
from fleetserve.engines.actuator import LocalActuator
from fleetserve.engines.fleet import launch_engines
from fleetserve.gateway.app import Gateway
from fleetserve.sim import SimOptions, simulate
from fleetserve.sim.planner import bucket_demand
from fleetserve.sim.profiles import ProfileStore, planned_options
from fleetserve.workload import TraceRequest

FAST = {"interval_s": 0.5, "stable_window_s": 3, "panic_window_s": 1.5, "scale_down_cooldown_s": 2}


def _states(admin: str, group: str) -> dict[str, str]:
    return {e["id"]: e["state"] for e in get_json(admin + "/engines")["engines"] if e["group"] == group}


def _events(admin: str) -> list[dict[str, Any]]:
    return get_json(admin + "/autoscale")["scale_events"]


def test_a_burst_through_serve_adds_engines_and_the_quiet_after_it_removes_them(tmp_path: Path) -> None:
    group = {
        "name": "l4",
        "gpu": "l4",
        "model": "llama-3-8b",
        "autoscale": {"policy": "kpa", "max_replicas": 3, "target": 4, **FAST},
    }
    serve, url, admin = start_serve(tmp_path, fleet_with_admin([group]))
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)

        def ask(index: int) -> int:
            stream = client.chat.completions.create(
                model="llama-3-8b",
                messages=[{"role": "user", "content": f"request {index}: tell me about the sea"}],
                max_tokens=80,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )
            return [chunk.usage for chunk in stream if chunk.usage][-1].completion_tokens

        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            answers_ = list(pool.map(ask, range(64)))
            peak = len(_states(admin, "l4"))
        assert answers_ == [80] * 64  # every request answered in full, through every scale event
        assert peak >= 2
        ups = [e for e in _events(admin) if e["to"] > e["from"]]
        assert ups and ups[0]["reason"] in ("scale", "panic", "bounds")
        wait_until(
            lambda: list(_states(admin, "l4").values()) == ["ready"], timeout=60, message=serve.output()
        )
        downs = [e for e in _events(admin) if e["to"] < e["from"]]
        assert downs and downs[-1]["to"] == 1
        gateway = Process(serve.popen, url, "gateway")
        assert metric_value(gateway, "fleetserve_engines", group="l4", state="ready") == 1
        assert metric_value(gateway, "fleetserve_autoscale_desired_replicas", group="l4") == 1
        assert metric_value(gateway, "fleetserve_autoscale_decisions_total", group="l4", direction="up")
        assert metric_value(gateway, "fleetserve_gateway_requests_total", status="200") == 64
        assert "autoscale l4: 1 -> " in serve.output()  # each decision is logged with its inputs
        # the replicas the quiet removed were drained and stopped: only the fleet file's one runs
        wait_until(lambda: len(serve.descendants()) <= 3, timeout=30, message="scaled-in processes stopped")
    finally:
        serve.kill()


def test_a_group_at_zero_starts_a_replica_for_the_first_request_and_returns_to_zero(tmp_path: Path) -> None:
    scaled = {"min_replicas": 0, "max_replicas": 1, **FAST, "stable_window_s": 2, "panic_window_s": 1}
    groups = [
        {"name": "l4", "gpu": "l4", "model": "llama-3-8b", "replicas": 0, "autoscale": scaled},
        {  # nothing starts this fast: its requests run out of time and get 503 with Retry-After
            "name": "slow",
            "gpu": "l4",
            "model": "qwen2.5-7b",
            "replicas": 0,
            "autoscale": {**scaled, "activation_timeout_s": 0.05},
        },
    ]
    serve, url, admin = start_serve(tmp_path, fleet_with_admin(groups), ready_path="/health")
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        assert {model.id for model in client.models.list()} == {"llama-3-8b", "qwen2.5-7b"}
        assert _states(admin, "l4") == {}
        answer = client.chat.completions.create(
            model="llama-3-8b", messages=[{"role": "user", "content": "hello"}], max_tokens=8
        )
        assert answer.usage is not None and answer.usage.completion_tokens == 8
        first = _events(admin)[0]
        assert (first["from"], first["to"], first["reason"]) == (0, 1, "activate")
        wait_until(lambda: _states(admin, "l4") == {}, timeout=60, message="back to zero:\n" + serve.output())
        assert _events(admin)[-1]["to"] == 0
        live = [(e["from"], e["to"], e["reason"]) for e in _events(admin) if e["group"] == "l4"]
        with pytest.raises(openai.APIStatusError) as refused:
            client.completions.create(model="qwen2.5-7b", prompt="hello", max_tokens=4)
        assert refused.value.status_code == 503
        assert refused.value.response.headers["retry-after"] == "5"
        assert "became ready within 0.05 s" in refused.value.message
    finally:
        serve.kill()
    # the twin, with the same fleet file and the same request (and one later, to keep its clock going
    # past the quiet), takes the same decisions: activate from zero, then back to zero
    config = FleetConfig.model_validate(fleet_with_admin(groups))
    trace = [TraceRequest(0.0, 16, 8), TraceRequest(120_000.0, 16, 8)]
    twin = [(e["from"], e["to"], e["reason"]) for e in simulate(config, trace).summary["scale_events"]]
    assert live == twin[: len(live)] == [(0, 1, "activate"), (1, 0, "scale")]


@pytest.mark.llamacpp
def test_a_replica_that_dies_before_it_is_ready_is_counted_and_replaced(tmp_path: Path) -> None:
    """A llama.cpp engine whose GGUF file is not a model exits while loading: the autoscaler counts it,
    starts another, and the healthy group beside it serves all along."""
    pytest.importorskip("llama_cpp")
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + bytes(4096))
    groups = [
        {"name": "ok", "gpu": "l4", "model": "llama-3-8b"},
        {
            "name": "broken",
            "kind": "llamacpp",
            "model": str(broken),
            "replicas": 0,
            "autoscale": {"min_replicas": 0, "max_replicas": 1, **FAST, "activation_timeout_s": 5},
        },
    ]
    serve, url, admin = start_serve(tmp_path, fleet_with_admin(groups), ready_path="/health")
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        with pytest.raises(openai.APIStatusError) as refused:
            client.completions.create(model=str(broken), prompt="hello", max_tokens=4)
        assert refused.value.status_code == 503
        report = get_json(admin + "/autoscale")
        assert report["never_ready"] >= 2, serve.output()  # failed, replaced, failed again
        assert "engine broken-0 of group broken did not start" in serve.output()
        answer = client.completions.create(model="llama-3-8b", prompt="hello", max_tokens=4)
        assert answer.usage is not None and answer.usage.completion_tokens == 4
    finally:
        serve.kill()


class ScriptedTotals:
    """A group's metric total as a script of (seconds after `origin`, value) steps: what both worlds
    read instead of their engines' metrics, so their decisions can be compared."""

    def __init__(self, steps: Sequence[tuple[float, float]]) -> None:
        self.steps = steps
        self.origin = 0.0

    def group_total(self, group: AutoscaledGroup, ready: Sequence[str], now: float) -> float | None:
        if not ready:
            return None
        return [value for at, value in self.steps if at <= now - self.origin][-1]


SCRIPT = [(0.0, 10.0), (3.0, 30.0), (7.0, 60.0), (11.0, 30.0), (14.0, 10.0)]
SCRIPT_END_S = 17.0


async def _live_decisions(config: FleetConfig) -> list[tuple[int, int, str]]:
    async with launch_engines(config) as launched:
        gateway = Gateway(config)
        actuator = LocalActuator(
            config, launched.launcher, gateway, launched.work_dir, launched=launched.engines
        )
        script = ScriptedTotals(SCRIPT)
        gateway.use_actuator(actuator, metric_source=script)
        assert gateway.autoscaling is not None
        script.origin = gateway.autoscaling.start
        await gateway.start()
        try:
            while asyncio.get_running_loop().time() < script.origin + SCRIPT_END_S:
                await asyncio.sleep(0.1)
            autoscaler = gateway.autoscaling.autoscaler
            return [(event.before, event.after, event.reason) for event in autoscaler.events]
        finally:
            await gateway.stop()
            await actuator.close()


def test_the_live_gateway_and_the_twin_scale_alike_on_the_same_scripted_metric() -> None:
    """The scripted total asks for 1, 2, 4, 2 and 1 replicas of 16 in flight each; the live gateway
    starts real engine processes (each ready when it answers), the simulator engine models with a
    1 s cold start. Both take the same decisions in the same order."""
    windows = {"interval_s": 0.5, "stable_window_s": 0.25, "panic_window_s": 0.25, "scale_down_cooldown_s": 0}
    group = {
        "name": "l4",
        "gpu": "l4",
        "model": "llama-3-8b",
        "cold_start_s": 1.0,
        "autoscale": {"policy": "kpa", "max_replicas": 4, "target": 16, **windows},
    }
    fleet = FleetConfig.model_validate(
        {"engines": [group], "emulator": {"base_port": free_ports(2)}, "gateway": {"health_interval_s": 0.2}}
    )
    live = asyncio.run(_live_decisions(fleet))

    trace = [TraceRequest(1000.0 * second, 64, 4) for second in range(int(SCRIPT_END_S) + 1)]
    result = simulate(fleet, trace, options=SimOptions(autoscale_metrics=ScriptedTotals(SCRIPT)))
    twin = [(e["from"], e["to"], e["reason"]) for e in result.summary["scale_events"]]
    assert live == twin == [(1, 2, "scale"), (2, 4, "scale"), (4, 2, "scale"), (2, 1, "scale")]


def test_serve_sizes_a_planned_group_by_its_traffic_and_routes_by_the_plan(tmp_path: Path) -> None:
    """A planned group on the live fleet: serve measures its profiles first, the first plan (after a
    window of traffic) sizes it for the load and gives the `planned` policy its routes, and the plan
    after the load has gone shrinks it again."""
    planned = {
        "policy": "planned",
        "min_replicas": 1,
        "max_replicas": 3,
        "interval_s": 0.5,
        "plan_window_s": 3,
    }
    group = {"name": "l4", "gpu": "l4", "model": "llama-3-8b", "autoscale": planned}
    fleet = fleet_with_admin([group], router={"policy": "planned", "debug_header": True})
    serve, url, admin = start_serve(tmp_path, fleet, "--profiles", str(tmp_path / "profiles"))
    try:
        assert "profiles: 36 measured, 0 from the cache" in serve.output()
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)

        prompt_tokens: dict[int, int] = {}

        def ask(index: int) -> str:
            raw = client.completions.with_raw_response.create(
                model="llama-3-8b", prompt=f"{index} " * 60, max_tokens=64, extra_body={"ignore_eos": True}
            )
            usage = raw.parse().usage
            assert usage is not None
            prompt_tokens[index] = usage.prompt_tokens
            return raw.headers["x-fleetserve-route"].split(";")[1]

        # an open loop, 24 requests a second for 7 s: twice one L4's profiled rate for this bucket
        with concurrent.futures.ThreadPoolExecutor(128) as pool:
            sent = []
            for index in range(168):
                sent.append(pool.submit(ask, index))
                time.sleep(1 / 24)  # the load's pace, not a synchronisation
            reasons = [future.result() for future in sent]
        grew = [e for e in _events(admin) if e["reason"] == "planned" and e["to"] > e["from"]]
        assert grew and grew[0]["to"] >= 2 and grew[0]["observed"] > 10, serve.output()  # req/s planned for
        assert "unplanned" in reasons[:8] and "planned" in reasons[-8:]  # routes once a plan exists
        wait_until(lambda: len(_states(admin, "l4")) == 1, timeout=60, message="shrunk:\n" + serve.output())
        live = [e["to"] for e in _events(admin) if e["reason"] == "planned"]
    finally:
        serve.kill()
    # the twin, with the same profiles and the same requests at the same pace, sizes the group alike
    trace = [TraceRequest(index * 1000 / 24, prompt_tokens[index], 64) for index in range(168)]
    trace.append(TraceRequest(30_000.0, 16, 8))  # keeps the twin's clock going past the quiet
    config = FleetConfig.model_validate(fleet)
    options = planned_options(
        config, bucket_demand(trace, LengthBuckets()), ProfileStore(tmp_path / "profiles")
    )
    result = simulate(config, trace, options=SimOptions(planned_options=options))
    twin = [e["to"] for e in result.summary["scale_events"] if e["reason"] == "planned"]
    assert max(live) == max(twin) and live[-1] == twin[-1] == 1, (live, twin)
