"""Hostile clients against a real `fleetserve serve`: stalled and lying bodies, endless chunked bodies, huge
headers, idle connections, and a rogue engine registered through the admin API. Each test also checks
that a well-formed request from another client address (127.0.0.2, still loopback) is served meanwhile."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import openai
import pytest
from tests.helpers import free_port, wait_until
from tests.integration.gateway_harness import Process, Processes, metric_value, running_processes

OTHER_CLIENT = "127.0.0.2"
FAST_LIMITS = {"body_timeout_s": 1.0, "header_timeout_s": 1.0, "max_pending_per_client": 8, "max_queue": 4}


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    yield from running_processes(tmp_path)


def other_client(url: str, **headers: str) -> openai.OpenAI:
    """The official client, connecting from another loopback address than the hostile sockets."""
    transport = httpx.HTTPTransport(local_address=OTHER_CLIENT)
    return openai.OpenAI(
        base_url=url + "/v1",
        api_key=headers.get("key", "unused"),
        max_retries=0,
        http_client=httpx.Client(transport=transport, timeout=10),
    )


def served_meanwhile(gateway: Process) -> None:
    answer = other_client(gateway.url).completions.create(model="test-model", prompt="x", max_tokens=2)
    assert answer.choices[0].text == "t0 t1"


def hostile_socket(gateway: Process, data: bytes) -> socket.socket:
    parts = urlsplit(gateway.url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=10)
    sock.sendall(data)
    return sock


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Everything the server sends until it closes: status, headers and body."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    sock.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in header_lines)
    return int(status_line.split()[1]), {k.lower(): v for k, v in headers.items()}, body


def assert_openai_error(status: int, headers: dict[str, str], body: bytes, expected: int) -> dict:
    assert status == expected, body
    assert headers["content-type"] == "application/json"
    error = json.loads(body)["error"]
    assert error["code"] == expected and error["message"]
    return error


def post_head(length: int | None = None, chunked: bool = False) -> bytes:
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {length}"
    return (
        f"POST /v1/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n{framing}\r\n\r\n"
    ).encode()


def test_stalled_bodies_do_not_take_queue_places_and_get_408(procs: Processes) -> None:
    upstream = procs.upstream("engine")
    gateway = procs.gateway([upstream], **FAST_LIMITS)
    body = json.dumps({"model": "test-model", "prompt": "stalled prompt text", "max_tokens": 2}).encode()
    # more stalled requests than the queue holds: before the fix every later request got 429
    stalled = [hostile_socket(gateway, post_head(len(body) + 40) + body[:20]) for _ in range(6)]
    chunked = hostile_socket(gateway, post_head(chunked=True) + b"5\r\nhello\r\n")
    served_meanwhile(gateway)
    for sock in [*stalled, chunked]:
        error = assert_openai_error(*read_response(sock), 408)
        assert "body" in error["message"]
    assert metric_value(gateway, "fleetserve_gateway_requests_total", status="408") == 7
    served_meanwhile(gateway)


def test_pending_connections_are_bounded_per_client(procs: Processes) -> None:
    upstream = procs.upstream("engine")
    gateway = procs.gateway([upstream], **{**FAST_LIMITS, "header_timeout_s": 5.0})
    holding = [hostile_socket(gateway, b"POST /v1/completions HTTP/1.1\r\nHost: gw\r\n") for _ in range(8)]
    refused = hostile_socket(gateway, b"")
    error = assert_openai_error(*read_response(refused), 503)
    assert "whole request" in error["message"]
    served_meanwhile(gateway)  # another address has its own allowance
    for sock in holding:
        sock.close()


def test_headers_that_never_end_or_are_huge_are_refused(procs: Processes) -> None:
    upstream = procs.upstream("engine")
    gateway = procs.gateway([upstream], **FAST_LIMITS)
    idle = hostile_socket(gateway, b"")  # sends nothing at all
    slow_headers = hostile_socket(gateway, b"GET /v1/models HTTP/1.1\r\nHost: gw\r\n")
    huge = hostile_socket(gateway, b"GET /v1/models HTTP/1.1\r\nHost: gw\r\nX-Big: " + b"a" * 100_000)
    served_meanwhile(gateway)
    assert_openai_error(*read_response(huge), 431)
    assert_openai_error(*read_response(slow_headers), 408)
    assert_openai_error(*read_response(idle), 408)
    served_meanwhile(gateway)


def test_idle_keep_alive_connections_are_closed(procs: Processes) -> None:
    upstream = procs.upstream("engine")
    gateway = procs.gateway([upstream], idle_timeout_s=0.5)
    sock = hostile_socket(gateway, b"GET /health HTTP/1.1\r\nHost: gw\r\n\r\n")
    status, _, body = read_response(sock)  # returns only once the server closed the idle connection
    assert status == 200 and json.loads(body) == {"status": "ok"}


def test_malformed_content_parts_get_a_json_answer_not_a_crash(procs: Processes) -> None:
    upstream = procs.upstream("engine")
    gateway = procs.gateway([upstream])
    for text in (None, True, 3):
        body = {
            "model": "test-model",
            "messages": [{"role": "user", "content": [{"type": "text", "text": text}]}],
        }
        response = httpx.post(gateway.url + "/v1/chat/completions", json=body, timeout=10)
        assert response.status_code < 500, response.text
        assert response.headers["content-type"].startswith("application/json")


def test_admin_api_needs_its_token_and_rogue_engines_never_see_client_keys(procs: Processes) -> None:
    real, rogue = procs.upstream("real"), procs.upstream("rogue")
    token = "admin-token-for-the-test-0123456789"
    token_file = procs.tmp_path / "admin.token"
    token_file.write_text(token + "\n")
    admin_port = free_port()
    gateway = procs.gateway(
        [real], router={"policy": "round_robin"}, admin_port=admin_port, admin_token_file=str(token_file)
    )
    admin = f"http://127.0.0.1:{admin_port}"
    spec = {"id": "rogue", "url": rogue.url, "model": "test-model"}
    for headers in ({}, {"Authorization": "Bearer wrong-token-wrong-token"}, {"Authorization": token}):
        refused = httpx.post(admin + "/engines", json=spec, headers=headers)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == 401
        assert httpx.delete(admin + "/engines/real", headers=headers).status_code == 401
    auth = {"Authorization": f"Bearer {token}"}
    added = httpx.post(admin + "/engines", json=spec, headers=auth)
    assert added.status_code == 201 and added.json()["forward_auth"] is False
    wait_until(lambda: metric_value(gateway, "fleetserve_engine_routable", engine="rogue") == 1)

    api = other_client(gateway.url, key="sk-client-secret-do-not-leak")
    for _ in range(4):  # round robin: both engines serve
        api.completions.create(model="test-model", prompt="x", max_tokens=1)
    assert httpx.get(rogue.url + "/control").json()["authorization"] is None
    assert httpx.get(real.url + "/control").json()["authorization"] == "Bearer sk-client-secret-do-not-leak"
    log = "".join(path.read_text() for path in procs.tmp_path.glob("gateway-*.log"))
    assert token not in log and "sk-client-secret" not in log
    assert "no token" not in log  # the start-up warning is only for an admin API without one


def test_dead_engines_are_ejected_and_logged_and_ready_follows(procs: Processes) -> None:
    first, second = procs.upstream("first"), procs.upstream("second")
    gateway = procs.gateway([first, second], eject_after_failures=5, health_interval_s=30)
    api = other_client(gateway.url)
    first.kill()
    second.kill()
    # the probe period is long: only the failed request can tell the gateway that nothing listens
    with pytest.raises(openai.APIStatusError) as failed:
        api.completions.create(model="test-model", prompt="x", max_tokens=1)
    assert failed.value.status_code in (502, 503)
    assert httpx.get(gateway.url + "/ready").status_code == 503
    log = "".join(path.read_text() for path in procs.tmp_path.glob("gateway-*.log"))
    assert "engine first ejected" in log and "engine second ejected" in log


def test_a_stream_cut_by_its_client_is_499_with_its_engine_and_after_done_a_success(procs: Processes) -> None:
    upstream = procs.upstream("slow", chunk_delay_ms=100)
    gateway = procs.gateway([upstream])
    body = {"model": "test-model", "prompt": "x", "stream": True, "max_tokens": 30}
    with httpx.stream("POST", gateway.url + "/v1/completions", json=body, timeout=10) as response:
        assert next(response.iter_bytes()).startswith(b"data: ")
    wait_until(lambda: metric_value(gateway, "fleetserve_gateway_requests_total", status="499") == 1)
    assert metric_value(gateway, "fleetserve_gateway_requests_total", status="499", engine="slow") == 1

    # a client that leaves as soon as it has [DONE], before the chunked body ends (guidellm does)
    httpx.post(upstream.url + "/control", json={"linger_after_done_s": 5})
    body["max_tokens"] = 3
    with httpx.stream("POST", gateway.url + "/v1/completions", json=body, timeout=10) as response:
        received = b""
        for chunk in response.iter_bytes():
            received += chunk
            if b"data: [DONE]" in received:
                break
    wait_until(
        lambda: metric_value(gateway, "fleetserve_gateway_requests_total", status="200", engine="slow") == 1
    )
    assert metric_value(gateway, "fleetserve_gateway_requests_total", status="499") == 1
