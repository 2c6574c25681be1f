import pytest

from fleetserve.config import EngineDescription
from fleetserve.fleet.registry import EngineRegistry
from fleetserve.fleet.state import EngineHealth, EngineMetrics, EngineState, ModelEntry
from fleetserve.fleet.view import ViewBuilder


def engine(engine_id: str, gpu: str | None = None, model: str = "llama-3-8b", **kw: object) -> EngineState:
    spec = EngineDescription(id=engine_id, url=f"http://e/{engine_id}", model=model, gpu=gpu, **kw)
    return EngineState(spec, EngineHealth(3, 5.0))


def test_health_changes_never_touch_in_flight_counts() -> None:
    registry = EngineRegistry()
    state = engine("a")
    registry.add(state)
    for _ in range(3):
        state.view.in_flight += 1  # as the request path counts a dispatch
    state.health.probe_succeeded(0.0)
    for t in range(5):
        state.health.request_failed(float(t))
    state.health.tick(100.0)
    state.health.probe_succeeded(100.0)
    assert state.in_flight == 3
    state.view.in_flight -= 1
    assert state.in_flight == 2


def test_add_and_remove_at_run_time() -> None:
    registry = EngineRegistry()
    registry.add(engine("a"))
    version = registry.version
    with pytest.raises(ValueError, match="already exists"):
        registry.add(engine("a"))
    removed = registry.remove("a")
    assert removed.removed and "a" not in registry and registry.version > version


def test_capacity_comes_from_the_cost_model_relative_to_the_slowest() -> None:
    registry = EngineRegistry()
    for state in (engine("h100", "h100-80g"), engine("l4", "l4"), engine("mystery", "no-such-gpu")):
        registry.add(state)
    view = ViewBuilder(registry).build()
    assert view.engines["l4"].capacity == 1.0
    assert view.engines["h100"].capacity > 3.0  # an H100 serves several times an L4's tokens/s
    assert view.engines["mystery"].capacity == 1.0


def test_view_carries_health_metrics_adapters_and_exclusions() -> None:
    registry = EngineRegistry()
    ready = engine("ready", adapters=("cfg",))
    ready.health.probe_succeeded(0.0)
    ready.models = (ModelEntry("llama-3-8b", None, {}), ModelEntry("found", "llama-3-8b", {}))
    ready.metrics = EngineMetrics(running=2, waiting=1, kv_usage=0.4, num_gpu_blocks=100, block_size=32)
    registry.add(ready)
    registry.add(engine("starting"))
    view = ViewBuilder(registry).build()
    seen = view.engines["ready"]
    assert (seen.healthy, seen.ready, seen.running, seen.waiting, seen.kv_usage) == (True, True, 2, 1, 0.4)
    assert (seen.num_gpu_blocks, seen.block_size) == (100, 32)
    assert seen.adapters == {"cfg", "found"}
    assert (view.engines["starting"].healthy, view.engines["starting"].ready) == (False, False)
    assert list(ViewBuilder(registry).build(exclude={"ready"}).engines) == ["starting"]
