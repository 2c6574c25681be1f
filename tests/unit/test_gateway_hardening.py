"""The gateway's defences as pure code: admin-token rules in the fleet file, the pending-connection
counter, the raw error responses written before any ASGI cycle, and the last-resort 500 handler."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleetserve.config import ConfigError, is_loopback, parse_fleet
from fleetserve.gateway.admission import parse_request
from fleetserve.gateway.app import Gateway
from fleetserve.gateway.connections import ConnectionLimits, PendingConnections, raw_error_response
from fleetserve.protocol.errors import APIError

ENGINES = "engines:\n  - {name: e, url: 'http://127.0.0.1:9', model: m}\n"


def test_admin_api_off_loopback_needs_a_token_with_its_line() -> None:
    with pytest.raises(ConfigError) as error:
        parse_fleet(ENGINES + "gateway:\n  admin_port: 9000\n  admin_host: 0.0.0.0\n")
    assert "admin_token_file" in str(error.value) and "<fleet>:5: gateway.admin_host" in str(error.value)
    ok = parse_fleet(
        ENGINES + "gateway:\n  admin_port: 9000\n  admin_host: 0.0.0.0\n  admin_token: " + "t" * 16
    )
    assert ok.gateway.admin_secret == "t" * 16
    assert "tttt" not in repr(ok.gateway)  # a secret never reaches a log through the config's repr


def test_admin_token_file_is_read_relative_to_the_fleet_file(tmp_path: Path) -> None:
    (tmp_path / "admin.token").write_text("  a-long-enough-admin-token \n")
    config = parse_fleet(ENGINES + "gateway: {admin_token_file: admin.token}\n", base_dir=tmp_path)
    assert config.gateway.admin_secret == "a-long-enough-admin-token"
    with pytest.raises(ConfigError, match="cannot read admin token file"):
        parse_fleet(ENGINES + "gateway: {admin_token_file: missing.token}\n", base_dir=tmp_path)
    with pytest.raises(ConfigError, match="not both"):
        parse_fleet(
            ENGINES + f"gateway: {{admin_token_file: admin.token, admin_token: {'x' * 16}}}\n",
            base_dir=tmp_path,
        )


def test_fleet_file_engines_forward_auth_unless_told_not_to() -> None:
    config = parse_fleet(ENGINES)
    assert config.engines[0].forward_auth is True
    assert Gateway(config).registry.get("e").spec.forward_auth is True  # type: ignore[union-attr]
    assert (
        parse_fleet(ENGINES.replace("model: m", "model: m, forward_auth: false")).engines[0].forward_auth
        is False
    )


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.9.9.9", True), ("::1", True), ("localhost", True), ("0.0.0.0", False)],
)
def test_loopback_addresses(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


@given(st.lists(st.tuples(st.sampled_from("abc"), st.booleans()), max_size=60))
def test_pending_connections_never_exceed_their_bounds(steps: list[tuple[str, bool]]) -> None:
    pending = PendingConnections(ConnectionLimits(max_pending_connections=5, max_pending_per_client=2))
    inside: list[str] = []
    for client, enter in steps:
        if enter:
            if pending.enter(client) is None:
                inside.append(client)
        elif client in inside:
            inside.remove(client)
            pending.leave(client)
        assert pending.total == len(inside) <= 5
        assert all(count <= 2 for count in pending.by_client.values())
        assert sum(pending.by_client.values()) == pending.total


def test_raw_error_response_is_a_whole_openai_shaped_answer() -> None:
    raw = raw_error_response(APIError(503, "busy", headers={"Retry-After": "1"}))
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert b"connection: close" in head and b"Retry-After: 1" in head
    assert f"content-length: {len(body)}".encode() in head
    assert json.loads(body)["error"] == {
        "message": "busy",
        "type": "ServiceUnavailableError",
        "param": None,
        "code": 503,
    }


@pytest.mark.parametrize("text", [None, True, 3, 2.5, ["a"]])
def test_content_parts_with_odd_text_are_sized_not_crashed(text: Any) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": text}]}]}
    assert parse_request(json.dumps(body).encode(), "chat").prompt_len == 1


def _call(gateway: Gateway, path: str) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": path, "headers": []}
    asyncio.run(gateway(scope, receive, send))
    return sent


def test_a_bug_is_answered_as_json_500_with_an_incident_id(caplog: pytest.LogCaptureFixture) -> None:
    gateway = Gateway(parse_fleet(ENGINES))

    def broken() -> dict[str, Any]:
        raise TypeError("a bug")

    gateway.models.listing = broken  # type: ignore[method-assign]
    start, body = _call(gateway, "/v1/models")
    assert start["status"] == 500 and (b"content-type", b"application/json") in start["headers"]
    message = json.loads(body["body"])["error"]["message"]
    incident = message.split("incident ")[1].split(")")[0]
    assert incident in caplog.text and "a bug" in caplog.text and "a bug" not in message
