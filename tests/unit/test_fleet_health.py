from fleetserve.fleet.health import parse_model_list
from fleetserve.fleet.state import EngineHealth, HealthState


def fresh(after: int = 3, duration: float = 5.0) -> EngineHealth:
    return EngineHealth(eject_after_failures=after, eject_duration_s=duration)


def healthy(after: int = 3, duration: float = 5.0) -> EngineHealth:
    health = fresh(after, duration)
    health.probe_succeeded(0.0)
    return health


def test_a_starting_engine_gets_no_traffic_until_its_first_good_probe() -> None:
    health = fresh()
    for t in range(10):
        health.probe_failed(float(t))  # still loading: not a fault, no ejection
    assert health.state is HealthState.STARTING and not health.routable and not health.ready
    health.probe_succeeded(10.0)
    assert health.state is HealthState.HEALTHY and health.routable and health.ready


def test_ejected_after_n_consecutive_request_failures() -> None:
    health = healthy(after=3)
    health.request_failed(1.0)
    health.request_failed(1.1)
    assert health.routable
    health.request_failed(1.2)
    assert health.state is HealthState.EJECTED and not health.routable
    assert health.ejected_until == 6.2


def test_a_success_breaks_the_run_of_failures() -> None:
    health = healthy(after=2)
    health.request_failed(1.0)
    health.request_succeeded(1.1)
    health.request_failed(1.2)
    assert health.routable


def test_good_probes_do_not_hide_failing_requests() -> None:
    health = healthy(after=2)
    health.request_failed(1.0)
    health.probe_succeeded(1.5)
    health.request_failed(2.0)
    assert health.state is HealthState.EJECTED


def test_probe_failures_eject_too() -> None:
    health = healthy(after=2)
    health.probe_failed(1.0)
    health.probe_failed(2.0)
    assert health.state is HealthState.EJECTED


def test_half_open_recovery_needs_a_good_probe_after_the_ejection_time() -> None:
    health = healthy(after=1, duration=5.0)
    health.request_failed(10.0)
    health.probe_succeeded(12.0)  # too early: still ejected
    assert health.state is HealthState.EJECTED
    health.tick(15.0)
    assert health.state is HealthState.HALF_OPEN and not health.routable
    health.probe_succeeded(15.1)
    assert health.state is HealthState.HEALTHY and health.routable


def test_failing_in_half_open_ejects_again_for_longer() -> None:
    health = healthy(after=1, duration=5.0)
    health.request_failed(0.0)
    assert health.ejected_until == 5.0
    health.probe_failed(5.0)  # half-open trial fails
    assert health.state is HealthState.EJECTED and health.ejected_until == 15.0
    health.probe_failed(15.0)
    assert health.ejected_until == 15.0 + 20.0
    health.probe_succeeded(35.0)
    health.request_succeeded(36.0)
    health.request_failed(40.0)  # a recovered engine starts again from the base duration
    assert health.ejected_until == 45.0


def test_model_list_parsing_finds_adapters_by_parent_or_root() -> None:
    body = {
        "object": "list",
        "data": [
            {"id": "llama", "root": "/weights/llama", "parent": None},
            {"id": "sql", "root": "/adapters/sql", "parent": "llama"},
            {"id": "chat", "root": "llama"},
            {"no-id": True},
        ],
    }
    entries = parse_model_list(body)
    assert entries is not None
    assert [(e.id, e.parent) for e in entries] == [("llama", None), ("sql", "llama"), ("chat", "llama")]
    assert parse_model_list({"error": "x"}) is None
