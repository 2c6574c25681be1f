from __future__ import annotations

from collections import Counter

from fleetserve.routing import EngineView, FleetView, RequestInfo, make_policy
from fleetserve.routing.slo import SessionPolicy


def fleet(*names: str) -> FleetView:
    return FleetView({name: EngineView(engine_id=name, model="m") for name in names})


def request(request_id: str, session: str | None) -> RequestInfo:
    return RequestInfo(request_id=request_id, model="m", prompt_len=10, session=session)


def owners(policy: SessionPolicy, view: FleetView, sessions: list[str]) -> dict[str, str]:
    return {s: policy.choose(request(f"r-{s}", s), view, 0.0).engine_id for s in sessions}


SESSIONS = [f"user-{i}" for i in range(400)]


def test_a_session_always_lands_on_the_same_engine_whatever_the_load() -> None:
    policy = SessionPolicy()
    view = fleet("a", "b", "c", "d")
    first = policy.choose(request("1", "alice"), view, 0.0)
    view.engines[first.engine_id].in_flight = 50
    again = policy.choose(request("2", "alice"), view, 1.0)
    assert again == first and first.reason == "session_owner"


def test_sessions_spread_over_the_engines() -> None:
    counts = Counter(owners(SessionPolicy(), fleet("a", "b", "c", "d"), SESSIONS).values())
    assert set(counts) == {"a", "b", "c", "d"} and min(counts.values()) > 400 / 4 / 2


def test_failover_moves_only_the_down_engines_sessions_and_they_come_back() -> None:
    policy = SessionPolicy()
    view = fleet("a", "b", "c", "d")
    before = owners(policy, view, SESSIONS)
    view.engines["b"].healthy = False
    during = owners(policy, view, SESSIONS)
    moved = {s for s in SESSIONS if before[s] != during[s]}
    assert moved == {s for s in SESSIONS if before[s] == "b"}
    assert "b" not in during.values()
    failover = policy.choose(request("x", next(iter(moved))), view, 0.0)
    assert failover.reason == "session_failover"
    view.engines["b"].healthy = True
    assert owners(policy, view, SESSIONS) == before


def test_adding_an_engine_remaps_only_sessions_it_takes() -> None:
    policy = SessionPolicy()
    before = owners(policy, fleet("a", "b", "c", "d"), SESSIONS)
    after = owners(policy, fleet("a", "b", "c", "d", "e"), SESSIONS)
    changed = {s for s in SESSIONS if before[s] != after[s]}
    assert changed and all(after[s] == "e" for s in changed)
    assert len(changed) < len(SESSIONS) / 3


def test_requests_without_a_session_go_to_the_least_loaded() -> None:
    view = fleet("a", "b")
    view.engines["a"].in_flight = 3
    decision = make_policy("session", {"virtual_nodes": 50}).choose(request("r", None), view, 0.0)
    assert (decision.engine_id, decision.reason) == ("b", "no_session")
