from __future__ import annotations

import pytest

from fleetserve.config import ConfigError, parse_fleet

EXAMPLE = """\
engines:
  - {name: h100, gpu: h100-80g, model: llama-3-8b, replicas: 2, tp: 1}
  - {name: l4, gpu: l4, model: llama-3-8b, replicas: 4}
  - {name: smol, kind: llamacpp, model: smollm2-135m, replicas: 1}
  - {name: prod, url: "http://127.0.0.1:9000", gpu: a100-80g, model: llama-3-8b, dialect: vllm}
router: {policy: least_request, params: {}}
slo: {ttft_ms: 1000, tpot_ms: 100}
gateway: {port: 8000}
"""


def test_issue_example_validates_and_expands_replicas() -> None:
    config = parse_fleet(EXAMPLE)
    instances = config.instances()
    assert [i.engine_id for i in instances] == [
        "h100-0", "h100-1", "l4-0", "l4-1", "l4-2", "l4-3", "smol", "prod",
    ]  # fmt: skip
    assert config.engines[3].kind == "external"
    assert instances[-1].url == "http://127.0.0.1:9000"
    ports = [i.port for i in instances if i.port is not None]
    assert len(set(ports)) == len(ports) == 7


def test_error_names_key_and_line() -> None:
    bad = EXAMPLE.replace("replicas: 4", "replicas: -1")
    with pytest.raises(ConfigError) as info:
        parse_fleet(bad, source="fleet.yaml")
    message = str(info.value)
    assert "engines[1].replicas" in message
    assert "fleet.yaml:3" in message


def test_unknown_key_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"gateway\.prot"):
        parse_fleet(EXAMPLE.replace("port: 8000", "prot: 8000"))


def test_external_engine_needs_url_and_emulated_needs_gpu() -> None:
    with pytest.raises(ConfigError, match="needs a gpu"):
        parse_fleet("engines:\n  - {name: a, model: llama-3-8b}\n")
    with pytest.raises(ConfigError, match="needs a url"):
        parse_fleet("engines:\n  - {name: a, kind: external, model: m}\n")


def test_duplicate_names_and_non_mapping() -> None:
    with pytest.raises(ConfigError, match="unique"):
        parse_fleet("engines:\n  - {name: a, gpu: l4, model: m}\n  - {name: a, gpu: l4, model: m}\n")
    with pytest.raises(ConfigError, match="mapping"):
        parse_fleet("- 1\n- 2\n")


def test_a_bad_policy_is_reported_with_its_line_beside_other_errors() -> None:
    text = "engines:\n  - {name: e, url: 'http://x:1', model: m, replicas: -1}\nrouter:\n  policy: fastest\n"
    with pytest.raises(ConfigError) as error:
        parse_fleet(text)
    message = str(error.value)
    assert "<fleet>:2: engines[0].replicas" in message
    assert "<fleet>:4: router.policy: Value error, unknown routing policy 'fastest'" in message
    with pytest.raises(ConfigError, match=r"<fleet>:3: router: .*cache_threshold"):
        parse_fleet(
            "engines:\n  - {name: e, url: 'http://x:1', model: m}\n"
            "router: {policy: prefix_aware, params: {cache_threshold: 3}}\n"
        )
