"""The admin API's fleet actions answer clearly before anything is launched: unknown groups, groups
fleetserve does not start, engines whose program is missing, a gateway that starts nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
from starlette.testclient import TestClient
from tests.helpers import wait_until

from fleetserve.config import parse_fleet
from fleetserve.engines.actuator import LocalActuator
from fleetserve.engines.launcher import EngineLauncher
from fleetserve.gateway.admin import admin_app
from fleetserve.gateway.app import Gateway

FLEET = """
engines:
  - {name: l4, gpu: l4, model: llama-3-8b}
  - {name: big, kind: vllm, gpu: h100-80g, model: llama-3-8b, replicas: 0}
  - {name: theirs, url: "http://127.0.0.1:9", model: llama-3-8b}
"""


@pytest.fixture
def gateway(tmp_path: Path) -> Gateway:
    config = parse_fleet(FLEET)
    gateway = Gateway(config)
    gateway.use_actuator(LocalActuator(config, EngineLauncher(log_dir=tmp_path / "logs"), gateway, tmp_path))
    return gateway


def test_starting_an_unknown_or_external_group_is_a_404(gateway: Gateway) -> None:
    client = TestClient(admin_app(gateway))
    unknown = client.post("/engines", json={"group": "nope"})
    assert unknown.status_code == 404 and "groups: l4, big, theirs" in unknown.json()["error"]["message"]
    external = client.post("/engines", json={"group": "theirs"})
    assert external.status_code == 404 and "external" in external.json()["error"]["message"]


def test_a_group_whose_program_is_missing_is_a_503_that_says_what_to_install(gateway: Gateway) -> None:
    response = TestClient(admin_app(gateway)).post("/engines", json={"group": "big"})
    assert response.status_code == 503
    message = response.json()["error"]["message"]
    assert "cannot launch engine big-0 (vllm)" in message and "pip install vllm" in message
    assert gateway.engine_ids() == ["l4", "theirs"]  # nothing was registered


def test_a_drained_engine_takes_no_new_requests_and_leaves_when_its_last_one_ends(gateway: Gateway) -> None:
    engine = gateway.registry.get("l4")
    assert engine is not None
    engine.view.in_flight = 1  # a request is on it
    with TestClient(admin_app(gateway)) as client:
        assert client.post("/engines/nope/drain", json={}).status_code == 404
        assert client.post("/engines/l4/drain", json={"timeout_s": -1}).status_code == 400
        response = client.post("/engines/l4/drain", json={"timeout_s": 30})
        assert response.status_code == 202 and response.json()["draining"] is True
        assert gateway.views.build().engines["l4"].ready is False
        assert "l4" in gateway.engine_ids()
        engine.view.in_flight = 0  # it finished
        wait_until(lambda: "l4" not in gateway.engine_ids(), timeout=5)


def test_a_gateway_without_an_actuator_says_so() -> None:
    client = TestClient(admin_app(Gateway(parse_fleet(FLEET))))
    response = client.post("/engines", json={"group": "l4"})
    assert response.status_code == 409 and "--no-launch" in response.json()["error"]["message"]
    assert client.post("/engines/l4/drain", json={}).status_code == 409
