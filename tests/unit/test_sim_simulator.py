import math
from dataclasses import dataclass, field

import pytest

from fleetserve.config import parse_fleet
from fleetserve.model.catalog import default_catalog
from fleetserve.model.cost import CostModel
from fleetserve.model.engine import EngineModel
from fleetserve.model.types import EngineRequest
from fleetserve.routing import Decision, FleetView, Policy, RequestInfo, make_policy
from fleetserve.sim import SimOptions, simulate
from fleetserve.workload import TraceRequest

ONE_H100 = """
engines:
  - {name: h100, gpu: h100-80g, model: llama-3-8b}
slo: {ttft_ms: 500, tpot_ms: 50}
"""

MIXED = """
engines:
  - {name: h100, gpu: h100-80g, model: llama-3-8b}
  - {name: l4, gpu: l4, model: llama-3-8b, replicas: 2}
  - {name: remote, url: "http://10.0.0.1:8000", model: llama-3-8b}
slo: {ttft_ms: 1000, tpot_ms: 100}
"""


def _trace(count: int, gap_ms: float, prompt: int = 400, output: int = 40) -> list[TraceRequest]:
    return [
        TraceRequest(
            timestamp_ms=i * gap_ms, input_length=prompt + 13 * (i % 7), output_length=output + i % 5
        )
        for i in range(count)
    ]


def _comparable(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k not in ("wall_s", "sim_requests_per_s")}


def test_one_request_ttft_is_the_prefill_time():
    catalog = default_catalog()
    cost = CostModel(catalog.gpu("h100-80g"), catalog.model("llama-3-8b"))
    trace = [TraceRequest(timestamp_ms=250.0, input_length=1000, output_length=1)]
    result = simulate(parse_fleet(ONE_H100), trace, "round_robin")
    prefill = cost.iteration_time([(1000, 0)], [])
    assert result["ttft_ms"]["p50"] == pytest.approx(prefill * 1000)
    assert result["e2e_ms"]["p50"] == pytest.approx(prefill * 1000)
    assert result["requests"] == result["completed"] == 1
    assert result["duration_s"] == pytest.approx(prefill)


def test_request_timings_are_the_engine_models():
    trace = [TraceRequest(timestamp_ms=0.0, input_length=500, output_length=40)]
    result = simulate(parse_fleet(ONE_H100), trace, "round_robin")
    engine = EngineModel.build("h100-80g", "llama-3-8b", report_every_token=False)
    engine.add_request(EngineRequest("0", list(range(500)), 40, 0.0), 0.0)
    outputs = engine.advance(math.inf).outputs
    first, last = outputs[0].first_token_time, outputs[-1].last_token_time
    assert result["ttft_ms"]["p50"] == pytest.approx(first * 1000)
    assert result["e2e_ms"]["p50"] == pytest.approx(last * 1000)
    assert result["tpot_ms"]["p50"] == pytest.approx((last - first) / 39 * 1000)
    assert result.requests.output_tokens.tolist() == [40]


def test_cost_is_price_times_tp_times_duration():
    fleet = parse_fleet(
        "engines:\n  - {name: big, gpu: h100-80g, model: llama-3-8b, tp: 2}\n"
        "  - {name: small, gpu: l4, model: llama-3-8b, replicas: 3}\n"
    )
    result = simulate(fleet, _trace(30, 100.0), "round_robin")
    catalog = default_catalog()
    per_hour = 2 * catalog.gpu("h100-80g").usd_per_hour + 3 * catalog.gpu("l4").usd_per_hour
    assert result["fleet"]["usd_per_hour"] == pytest.approx(per_hour)
    assert result["cost_usd"] == pytest.approx(per_hour * result["duration_s"] / 3600)
    tokens = int(result.requests.prompt_tokens.sum() + result.requests.output_tokens.sum())
    assert result["cost_per_million_tokens_usd"] == pytest.approx(result["cost_usd"] / tokens * 1e6)
    assert sum(e["cost_usd"] for e in result["per_engine"].values()) == pytest.approx(result["cost_usd"])


def test_unservable_requests_are_failed_not_dropped():
    trace = _trace(10, 50.0)
    trace.append(TraceRequest(timestamp_ms=20.0, input_length=100, output_length=5, model="other-model"))
    trace.append(TraceRequest(timestamp_ms=30.0, input_length=9000, output_length=10))  # > 8192 context
    result = simulate(parse_fleet(MIXED), trace, "least_request")
    assert result["requests"] == 12
    assert result["completed"] == 10
    assert result["failures"] == {"engine_rejected": 1, "model_not_served": 1}
    assert result["slo_attainment"] <= 10 / 12
    assert result["fleet"]["skipped"] and "remote" in result["fleet"]["skipped"][0]
    assert set(result["per_engine"]) == {"h100", "l4-0", "l4-1"}


def test_same_seed_same_result_and_seed_matters_for_random():
    fleet = parse_fleet(MIXED)
    trace = _trace(60, 40.0)
    first = simulate(fleet, trace, "random", seed=7)
    again = simulate(fleet, trace, "random", seed=7)
    other = simulate(fleet, trace, "random", seed=8)
    assert _comparable(first.summary) == _comparable(again.summary)
    assert first.requests.engine.tolist() != other.requests.engine.tolist()


def test_lazy_syncing_does_not_change_engine_timings():
    """round_robin ignores engine state, so how often the fleet is synced must not change anything the
    engines compute: skip-ahead over many iterations equals stepping through them."""
    fleet = parse_fleet(MIXED)
    trace = _trace(80, 30.0, prompt=900, output=60)
    exact = simulate(fleet, trace, "round_robin", options=SimOptions(sync_interval_s=0.0))
    lazy = simulate(fleet, trace, "round_robin", options=SimOptions(sync_interval_s=5.0))
    for name in ("first_token", "finish", "engine", "output_tokens"):
        assert getattr(exact.requests, name).tolist() == getattr(lazy.requests, name).tolist()
    # the same spans, summed in another order
    assert exact["itl_ms"] == pytest.approx(lazy["itl_ms"])


@dataclass
class RecordingPolicy(Policy):
    inner: Policy = field(default_factory=lambda: make_policy("least_request", {}))
    events: list[tuple[str, str, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.name = "recording"

    def choose(self, request: RequestInfo, view: FleetView, now: float) -> Decision:
        assert math.isclose(now, request.arrival_time)
        assert request.prompt_token_ids is not None and len(request.prompt_token_ids) == request.prompt_len
        return self.inner.choose(request, view, now)

    def on_dispatch(self, request: RequestInfo, engine_id: str, now: float) -> None:
        self.inner.on_dispatch(request, engine_id, now)
        self.events.append(("dispatch", request.request_id, now))

    def on_first_token(self, request: RequestInfo, engine_id: str, now: float) -> None:
        self.inner.on_first_token(request, engine_id, now)
        self.events.append(("first", request.request_id, now))

    def on_finish(self, request: RequestInfo, engine_id: str, now: float) -> None:
        self.inner.on_finish(request, engine_id, now)
        self.events.append(("finish", request.request_id, now))


def test_policy_hooks_see_every_request_in_order():
    policy = RecordingPolicy()
    result = simulate(parse_fleet(MIXED), _trace(40, 25.0), policy)
    assert result["policy"] == "recording"
    times: dict[str, dict[str, float]] = {}
    for kind, request_id, now in policy.events:
        assert kind not in times.setdefault(request_id, {})
        times[request_id][kind] = now
    assert len(times) == 40
    for request_id, seen in times.items():
        assert seen["dispatch"] <= seen["first"] <= seen["finish"]
        index = int(request_id)
        assert seen["first"] == pytest.approx(result.requests.first_token[index])


def test_views_carry_in_flight_and_the_engine_predictor():
    in_flight: list[int] = []
    predictions: list[float] = []

    class Spy(RecordingPolicy):
        def choose(self, request, view, now):
            in_flight.append(sum(e.in_flight for e in view.engines.values()))
            predictions.append(view.engines["h100"].predictor(1000, 0))
            assert view.engines["h100"].capacity > view.engines["l4-0"].capacity == 1.0
            return super().choose(request, view, now)

    simulate(parse_fleet(MIXED), _trace(30, 5.0), Spy())
    assert in_flight[0] == 0 and max(in_flight) > 3  # requests 5 ms apart pile up
    assert min(predictions) > 0 and max(predictions) > predictions[0]  # the queue makes TTFT longer


def test_load_series_and_utilisation():
    result = simulate(parse_fleet(MIXED), _trace(50, 20.0), "least_request")
    load = result["load_over_time"]
    assert len(load["t_s"]) >= 2
    assert set(load["in_flight"]) == set(result["per_engine"])
    assert max(max(series) for series in load["in_flight"].values()) > 0
    for engine in result["per_engine"].values():
        assert 0.0 <= engine["utilization"] <= 1.0
    assert any(engine["utilization"] > 0 for engine in result["per_engine"].values())


def test_a_gap_in_the_trace_is_jumped_not_ticked_through():
    early = _trace(10, 50.0)
    late = [
        TraceRequest(timestamp_ms=r.timestamp_ms + 36e5, input_length=r.input_length, output_length=5)
        for r in early
    ]
    result = simulate(parse_fleet(MIXED), early + late, "least_request", options=SimOptions(load_samples=50))
    assert result["completed"] == 20
    assert result["duration_s"] > 3600
    assert len(result["load_over_time"]["t_s"]) <= 60


def test_an_adapter_loaded_on_demand_shows_in_the_view():
    """Syncs compare adapters only once a request names one; an engine that loads one on demand must
    still show it in its view after the next sync."""
    seen: list[frozenset[str]] = []

    class ToH100(RecordingPolicy):
        def choose(self, request, view, now):
            seen.append(view.engines["h100"].adapters)
            return Decision("h100", "test")

    trace = [
        TraceRequest(timestamp_ms=i * 300.0, input_length=200, output_length=5, adapter="lora-x")
        for i in range(5)
    ]
    result = simulate(parse_fleet(MIXED), trace, ToH100())
    assert result["completed"] == 5
    assert "lora-x" not in seen[0] and "lora-x" in seen[-1]
