"""Tenants in the twin: quotas and the fair queue run as stages of the simulator's pipeline, and the
summary reports per tenant."""

from __future__ import annotations

import pytest
import yaml

from fleetserve.config import ConfigError, parse_fleet
from fleetserve.routing import make_policy
from fleetserve.sim.simulator import Simulator
from fleetserve.workload import TraceRequest
from fleetserve.workload.generators import UniformLengths, WorkloadSpec, generate


def fleet(**extra: object) -> str:
    return yaml.safe_dump(
        {
            "engines": [
                {"name": "a100", "kind": "emulated", "gpu": "a100-80g", "model": "llama-3-8b"},
                {"name": "l4", "kind": "emulated", "gpu": "l4", "model": "llama-3-8b"},
            ],
            **extra,
        }
    )


def run(text: str, trace: list[TraceRequest]) -> dict:
    return Simulator(parse_fleet(text), trace, make_policy("least_request", {})).run().summary


def test_quotas_refuse_in_the_twin_with_429s_per_tenant() -> None:
    tenants = [{"name": "capped", "limits": {"rpm": 5}}, {"name": "free"}]
    trace = [
        TraceRequest(timestamp_ms=500.0 * i, input_length=100, output_length=20, tenant=t)
        for i in range(20)
        for t in ("capped", "free")
    ]
    summary = run(fleet(tenants=tenants), trace)
    assert summary["per_tenant"]["capped"]["completed"] == 5
    assert summary["per_tenant"]["capped"]["rejected_429"] == 15
    assert summary["per_tenant"]["free"]["completed"] == 20
    assert summary["failures"] == {"quota": 15}


def test_a_tenant_may_use_only_its_models_in_the_twin() -> None:
    tenants = [{"name": "narrow", "models": ["qwen-72b"]}]
    trace = [TraceRequest(timestamp_ms=0.0, input_length=10, output_length=2, tenant="narrow")]
    assert run(fleet(tenants=tenants), trace)["failures"] == {"forbidden_model": 1}


def flood() -> list[TraceRequest]:
    spec = WorkloadSpec(
        rate=24.0,
        duration_s=60.0,
        tenants=3,
        tenant_shares=(10.0, 1.0, 1.0),
        input_lengths=UniformLengths(200, 800),
        output_lengths=UniformLengths(100, 300),
        seed=3,
    )
    return generate(spec)


def test_vtc_keeps_light_tenants_fast_while_one_floods_and_fifo_does_not() -> None:
    trace = flood()
    tenants = [{"name": f"tenant-{i}"} for i in range(3)]
    p99: dict[str, float] = {}
    for stage in ("vtc", "priority"):
        summary = run(
            fleet(tenants=tenants, pipeline=[{"stage": stage, "params": {"slots_per_engine": 8}}]), trace
        )
        p99[stage] = max(summary["per_tenant"][t]["ttft_ms"]["p99"] for t in ("tenant-1", "tenant-2"))
        assert 0 < summary["jain_fairness"] <= 1
    assert p99["vtc"] * 4 < p99["priority"]


def test_a_bad_tenant_block_names_the_key_and_its_line() -> None:
    text = fleet(tenants=[{"name": "ok"}, {"name": "bad", "weight": 0}])
    with pytest.raises(ConfigError) as error:
        parse_fleet(text, source="fleet.yaml")
    line = next(i for i, row in enumerate(text.splitlines(), 1) if "weight" in row)
    assert f"fleet.yaml:{line}: tenants[1].weight" in str(error.value)


def test_a_key_pasted_in_place_of_its_digest_is_refused_without_echoing_it() -> None:
    text = fleet(tenants=[{"name": "a", "key_sha256": ["sk-secret-key-value"]}])
    with pytest.raises(ConfigError) as error:
        parse_fleet(text)
    assert "sk-secret-key-value" not in str(error.value) and "64-character hex" in str(error.value)
