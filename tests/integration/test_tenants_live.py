"""Tenants through real gateway processes: keys with the official openai client, 403 and 429 shapes and
headers, one quota shared by two gateway replicas through a real redis-server, Redis killed and
restarted mid-run, VTC's order the same live and in the twin, and no key in any log or metric."""

from __future__ import annotations

import hashlib
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis as redis_lib
import yaml
from tests.helpers import free_port, wait_until
from tests.integration.gateway_harness import (
    FLEETSERVE,
    Process,
    Processes,
    get_json,
    metric_value,
    running_processes,
)

from fleetserve.config import parse_fleet
from fleetserve.routing import make_policy
from fleetserve.sim.simulator import Simulator
from fleetserve.workload import TraceRequest

KEY_A = "sk-fleetserve-team-a-4f1d2c"
KEY_B = "sk-fleetserve-team-b-9e8a7b"
KEYS = (KEY_A, KEY_B)
MESSAGES = [{"role": "user", "content": "hello"}]


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    yield from running_processes(tmp_path)


def tenants(rpm: int | None = None) -> list[dict[str, Any]]:
    return [
        {
            "name": "team-a",
            "key_sha256": [digest(KEY_A)],
            "models": ["test-model"],
            "limits": {"rpm": rpm} if rpm else {},
        },
        {"name": "team-b", "key_sha256": [digest(KEY_B)], "models": ["other-model"]},
    ]


def client(gateway: Process, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)


def test_keys_models_and_quota_headers_with_the_openai_client(procs: Processes) -> None:
    upstream = procs.upstream("e1")
    gateway = procs.gateway([upstream], fleet_extra={"auth": {"required": True}, "tenants": tenants(rpm=2)})
    raw = client(gateway, KEY_A).chat.completions.with_raw_response.create(
        model="test-model", messages=MESSAGES, max_tokens=3
    )
    assert raw.http_response.status_code == 200
    assert raw.headers["x-ratelimit-limit-requests"] == "2"
    assert raw.headers["x-ratelimit-remaining-requests"] == "1"
    assert raw.parse().usage.completion_tokens == 3  # type: ignore[union-attr]
    assert get_json(upstream.url + "/control")["authorization"] is None  # keys stay at the gateway

    with pytest.raises(openai.AuthenticationError) as wrong:
        client(gateway, "sk-not-a-key").chat.completions.create(model="test-model", messages=MESSAGES)
    assert wrong.value.status_code == 401 and wrong.value.code == "invalid_api_key"
    assert "sk-not-a-key" not in str(wrong.value)
    missing = httpx.post(
        gateway.url + "/v1/chat/completions", json={"model": "test-model", "messages": MESSAGES}
    )
    assert missing.status_code == 401 and missing.json()["error"]["type"] == "invalid_request_error"

    for asked in ("test-model", "no-such-model"):  # the same answer whether the model exists or not
        with pytest.raises(openai.PermissionDeniedError) as denied:
            client(gateway, KEY_B).chat.completions.create(model=asked, messages=MESSAGES)
        assert denied.value.code == "model_not_found"
        assert asked in str(denied.value) and "other-model" not in str(denied.value)

    client(gateway, KEY_A).chat.completions.create(model="test-model", messages=MESSAGES, max_tokens=2)
    with pytest.raises(openai.RateLimitError) as limited:
        client(gateway, KEY_A).chat.completions.create(model="test-model", messages=MESSAGES, max_tokens=2)
    response = limited.value.response
    assert limited.value.code == "rate_limit_exceeded"
    assert int(response.headers["retry-after"]) >= 1
    assert response.headers["x-ratelimit-remaining-requests"] == "0"
    assert metric_value(gateway, "fleetserve_tenant_refusals_total", tenant="team-a", reason="quota") == 1
    assert metric_value(gateway, "fleetserve_tenant_requests_total", tenant="team-a", status="200") == 2
    assert metric_value(gateway, "fleetserve_tenant_tokens_total", tenant="team-a", kind="output") == 5
    assert_no_key_leaked(procs, gateway)


def assert_no_key_leaked(procs: Processes, *gateways: Process) -> None:
    texts = [path.read_text(errors="replace") for path in procs.tmp_path.glob("*.log")]
    texts += [httpx.get(gateway.url + "/metrics").text for gateway in gateways]
    for key in KEYS:
        assert not any(key in text for text in texts)


def hammer(gateway: Process, count: int) -> list[int]:
    statuses: list[int] = []
    with httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {KEY_A}"}) as http:
        for _ in range(count):
            body = {"model": "test-model", "messages": MESSAGES, "max_tokens": 1}
            statuses.append(http.post("/v1/chat/completions", json=body).status_code)
    return statuses


def test_two_replicas_share_one_limit_and_survive_redis_restarting(procs: Processes) -> None:
    redis_port = free_port()
    redis = procs.redis(redis_port)
    upstream = procs.upstream("e1", chunk_delay_ms=1)
    extra = {"tenants": tenants(rpm=12), "redis": {"url": redis.url}}
    first, second = procs.gateway([upstream], fleet_extra=extra), procs.gateway([upstream], fleet_extra=extra)
    assert metric_value(first, "fleetserve_quota_shared") == 1

    results: dict[str, list[int]] = {}
    threads = [
        threading.Thread(target=lambda g=g, n=n: results.__setitem__(n, hammer(g, 10)))
        for n, g in (("first", first), ("second", second))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    statuses = results["first"] + results["second"]
    assert statuses.count(200) == 12 and statuses.count(429) == 8  # one limit, not one per replica

    redis.kill()
    # fail open: the replica counts alone (its own count starts at zero), and says so
    assert hammer(first, 1) == [200]
    assert metric_value(first, "fleetserve_quota_shared") == 0
    procs.redis(redis_port)  # empty: what it held is gone
    wait_until(lambda: metric_value(first, "fleetserve_quota_shared") == 1, timeout=20, message="resync")
    log = "".join(path.read_text() for path in procs.tmp_path.glob("gateway-*.log"))
    assert "Redis is unreachable" in log and "Redis answers again" in log
    # the request counted locally during the outage was added to the shared counts when Redis came back
    shared = redis_lib.Redis(port=redis_port)
    counted = sum(int(shared.get(key) or 0) for key in shared.scan_iter("fleetserve:{team-a}:r:*"))
    assert counted == 1
    assert_no_key_leaked(procs, first, second)


def test_fail_closed_refuses_while_redis_is_unreachable(procs: Processes) -> None:
    upstream = procs.upstream("e1")
    dead = f"redis://127.0.0.1:{free_port()}/0"
    extra = {"tenants": tenants(rpm=100), "redis": {"url": dead, "fail_closed": True}}
    gateway = procs.gateway([upstream], fleet_extra=extra)
    with pytest.raises(openai.InternalServerError) as refused:
        client(gateway, KEY_A).chat.completions.create(model="test-model", messages=MESSAGES)
    assert refused.value.status_code == 503 and refused.value.response.headers["retry-after"] == "1"


def test_vtc_orders_held_requests_the_same_live_and_in_the_twin(procs: Processes, tmp_path: Path) -> None:
    """One slot, a long request holding it, then three requests of tenant a and one of b: VTC serves
    a, b, a, a (FIFO would serve a, a, a, b), in the gateway and in the simulator alike."""
    pipeline = [{"stage": "vtc", "params": {"slots_per_engine": 1}}]
    upstream = procs.upstream("e1", chunk_delay_ms=20)
    gateway = procs.gateway([upstream], fleet_extra={"pipeline": pipeline})
    prompt = list(range(64))  # token ids: both clocks see the same 64 prompt tokens
    http = httpx.Client(base_url=gateway.url, timeout=30)

    def send(tenant: str, index: int, max_tokens: int) -> None:
        body = {"model": "test-model", "prompt": prompt, "max_tokens": max_tokens, "user": f"{tenant}{index}"}
        http.post("/v1/completions", json=body, headers={"x-fleetserve-tenant": tenant})

    arrivals = [("c", 0, 60), ("a", 1, 4), ("a", 2, 4), ("a", 3, 4), ("b", 4, 4)]
    threads = []
    for held, (tenant, index, max_tokens) in enumerate(arrivals):
        thread = threading.Thread(target=send, args=(tenant, index, max_tokens))
        thread.start()
        threads.append(thread)
        wait_until(lambda held=held: (metric_value(gateway, "fleetserve_gateway_requests_held") or 0) == held)
    for thread in threads:
        thread.join()
    live = get_json(upstream.url + "/control")["seen"]

    fleet = parse_fleet(
        yaml.safe_dump(
            {
                "engines": [{"name": "e1", "kind": "emulated", "gpu": "a100-80g", "model": "llama-3-8b"}],
                "pipeline": pipeline,
            }
        )
    )
    trace = [
        TraceRequest(timestamp_ms=10.0 * order, input_length=64, output_length=max_tokens, tenant=tenant)
        for order, (tenant, _, max_tokens) in enumerate(arrivals)
    ]
    result = Simulator(fleet, trace, make_policy("least_request", {})).run()
    started = result.requests.first_token
    twin = [
        f"{arrivals[i][0]}{arrivals[i][1]}" for i in sorted(range(len(arrivals)), key=lambda i: started[i])
    ]
    assert live == twin == ["c0", "a1", "b4", "a2", "a3"]


def test_tenant_keys_do_not_open_the_admin_api_and_adapter_paths_are_refused(procs: Processes) -> None:
    upstream = procs.upstream("e1")
    admin_port, token = free_port(), "admin-token-0123456789abcdef"
    gateway = procs.gateway(
        [upstream],
        fleet_extra={"auth": {"required": True}, "tenants": tenants()},
        admin_port=admin_port,
        admin_token=token,
    )
    admin = f"http://127.0.0.1:{admin_port}/engines"
    assert httpx.get(admin).status_code == 401
    assert httpx.get(admin, headers={"Authorization": f"Bearer {KEY_A}"}).status_code == 401
    owner = {"Authorization": f"Bearer {token}"}
    assert httpx.get(admin, headers=owner).status_code == 200
    for bad in ("../../etc/passwd", "/abs/path", "org/../x", "~root"):
        engine = {"id": "x", "url": upstream.url, "model": "test-model", "adapters": [bad]}
        refused = httpx.post(admin, json=engine, headers=owner)
        assert refused.status_code == 400 and "is not a name" in refused.json()["error"]["message"]
    assert_no_key_leaked(procs, gateway)


def test_a_key_stored_in_redis_by_the_cli_is_honoured_within_a_sync_interval(procs: Processes) -> None:
    redis = procs.redis()
    upstream = procs.upstream("e1")
    extra = {
        "auth": {"required": True},
        "tenants": tenants(),
        "redis": {"url": redis.url, "sync_interval_s": 0.2},
    }
    gateway = procs.gateway([upstream], fleet_extra=extra)
    made = subprocess.run(
        [str(FLEETSERVE), "tenant", "key", "--name", "team-b", "--redis", redis.url],
        capture_output=True,
        text=True,
        check=True,
    )
    new_key = made.stdout.split("): ", 1)[1].split()[0]
    body = {"model": "test-model", "messages": MESSAGES}

    def status() -> int:
        headers = {"Authorization": f"Bearer {new_key}"}
        return httpx.post(gateway.url + "/v1/chat/completions", json=body, headers=headers).status_code

    wait_until(
        lambda: status() == 403, timeout=10, message="the key is known (team-b may not use test-model)"
    )
    texts = [path.read_text(errors="replace") for path in procs.tmp_path.glob("*.log")]
    assert not any(new_key in text for text in texts)
