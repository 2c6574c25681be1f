from __future__ import annotations

from collections import Counter

from fleetserve.routing import Decision, EngineView, FleetView, RequestInfo, make_policy
from fleetserve.routing.dualmap import DualMapPolicy, HashRing, PrefixBranching

SYSTEM = list(range(500, 500 + 16 * 8))


def fleet(*engines: EngineView) -> FleetView:
    return FleetView({engine.engine_id: engine for engine in engines})


def engines(count: int, **fields: object) -> list[EngineView]:
    return [EngineView(engine_id=f"e{i}", model="m", **fields) for i in range(count)]  # type: ignore[arg-type]


def request(request_id: str, tokens: list[int] | None, **fields: object) -> RequestInfo:
    return RequestInfo(
        request_id=request_id,
        model="m",
        prompt_len=len(tokens) if tokens else 100,
        prompt_token_ids=tokens,
        **fields,  # type: ignore[arg-type]
    )


def prefix(i: int) -> list[int]:
    return [i] * 16 * 8 + [7] * 40


def test_requests_sharing_a_prefix_get_the_same_two_distinct_candidates() -> None:
    policy = DualMapPolicy(prefix_blocks=8)
    ids = [e.engine_id for e in engines(8)]
    pairs = set()
    for suffix in range(20):
        req = request(str(suffix), SYSTEM + [suffix] * 50)
        policy.prefixes.match(req, fleet(*engines(8)), engines(8), 0.0)  # fills block_hashes
        pairs.add(policy.pair(req, ids))
    assert len(pairs) == 1
    first, second = pairs.pop()
    assert first != second


def test_distinct_prefixes_spread_over_the_fleet() -> None:
    policy = DualMapPolicy()
    view = fleet(*engines(8))
    chosen = Counter()
    for i in range(2000):
        req = request(str(i), prefix(i))
        decision = policy.choose(req, view, 0.0)
        chosen[decision.engine_id] += 1
    assert set(chosen) == set(view.engines)
    assert max(chosen.values()) < 2 * min(chosen.values())


def test_adding_an_engine_remaps_only_keys_it_takes_over() -> None:
    keys = [(i * 0x9E3779B97F4A7C15) & (2**64 - 1) for i in range(5000)]
    before = HashRing([f"e{i}" for i in range(10)], "primary", 128)
    after = HashRing([f"e{i}" for i in range(11)], "primary", 128)
    moved = [key for key in keys if before.owner(key) != after.owner(key)]
    assert all(after.owner(key) == "e10" for key in moved)
    assert 0.03 < len(moved) / len(keys) < 2 / 11
    # and removing it again restores every key's owner
    assert all(
        before.owner(key) == HashRing([f"e{i}" for i in range(10)], "primary", 128).owner(key) for key in keys
    )


def test_removing_an_engine_moves_only_its_own_requests() -> None:
    policy = DualMapPolicy()
    full = [e.engine_id for e in engines(6)]
    smaller = [e for e in full if e != "e3"]
    moved = stayed = 0
    for i in range(1000):
        req = request(str(i), prefix(i))
        policy.prefixes.match(req, fleet(*engines(6)), engines(6), 0.0)
        before, after = policy.pair(req, full), policy.pair(req, smaller)
        if "e3" in before:
            moved += 1
            kept = set(before) - {"e3"}
            assert kept <= set(after)  # the surviving candidate stays a candidate
        else:
            stayed += 1
            assert before == after
    assert moved and stayed


def test_the_cache_affinity_candidate_wins_over_a_lighter_one() -> None:
    policy = make_policy("dualmap", {})
    view = fleet(*engines(8))
    first = policy.choose(request("1", SYSTEM + [1] * 30), view, 0.0)
    policy.on_dispatch(request("1", SYSTEM + [1] * 30), first.engine_id, 0.0)
    assert first.reason == "power_of_two"
    # make the cached engine a little busier than every other: affinity still wins
    loaded = fleet(
        *(
            EngineView(e.engine_id, "m", in_flight=2 if e.engine_id == first.engine_id else 0)
            for e in engines(8)
        )
    )
    again = policy.choose(request("2", SYSTEM + [2] * 30), loaded, 0.0)
    assert again == Decision(first.engine_id, "cache_affinity")


def test_slo_breach_on_the_affinity_candidate_falls_back_to_the_lighter_one() -> None:
    policy = DualMapPolicy()
    req = request("1", SYSTEM + [1] * 30, ttft_slo_ms=500.0)
    view = fleet(*engines(4))
    policy.prefixes.match(req, view, engines(4), 0.0)
    cached, other = policy.pair(req, list(view.engines))
    policy.on_dispatch(req, cached, 0.0)

    def slow(prompt_len: int, cached_tokens: int) -> float:
        return 2.0 if cached_tokens < prompt_len else 0.1

    def fast(prompt_len: int, cached_tokens: int) -> float:
        return 0.1

    def view_with(predictor) -> FleetView:
        return fleet(
            *(
                EngineView(
                    e.engine_id,
                    "m",
                    in_flight=3 if e.engine_id == cached else 1,
                    predictor=predictor if e.engine_id == cached else fast,
                )
                for e in engines(4)
            )
        )

    ok = policy.choose(request("2", SYSTEM + [2] * 30, ttft_slo_ms=5000.0), view_with(slow), 0.0)
    assert ok == Decision(cached, "cache_affinity")
    breach = policy.choose(request("3", SYSTEM + [3] * 30, ttft_slo_ms=500.0), view_with(slow), 0.0)
    assert breach == Decision(other, "slo_fallback")
    # the policy's own default SLO applies to requests without one
    strict = DualMapPolicy(ttft_slo_ms=500.0)
    strict.prefixes = policy.prefixes
    assert strict.choose(request("4", SYSTEM + [4] * 30), view_with(slow), 0.0).reason == "slo_fallback"


def test_a_hotspot_sheds_to_the_other_candidate() -> None:
    policy = DualMapPolicy(hotspot_factor=2.0, hotspot_min_load=4.0)
    req = request("1", SYSTEM + [1] * 30)
    view = fleet(*engines(8))
    policy.prefixes.match(req, view, engines(8), 0.0)
    cached, other = policy.pair(req, list(view.engines))
    policy.on_dispatch(req, cached, 0.0)

    def view_with(load: int) -> FleetView:
        return fleet(
            *(
                EngineView(e.engine_id, "m", in_flight=load if e.engine_id == cached else 1)
                for e in engines(8)
            )
        )

    assert policy.choose(request("2", SYSTEM + [2] * 30), view_with(3), 0.0).reason == "cache_affinity"
    # 12 requests against a mean of 2.4: a hotspot
    assert policy.choose(request("3", SYSTEM + [3] * 30), view_with(12), 0.0) == Decision(other, "hotspot")


def test_without_tokens_a_session_still_sticks() -> None:
    policy = DualMapPolicy()
    ids = [e.engine_id for e in engines(16)]
    pairs = {policy.pair(request(str(i), None, session="chat-42"), ids) for i in range(10)}
    assert len(pairs) == 1
    spread = {policy.pair(request(str(i), None), ids)[0] for i in range(200)}
    assert len(spread) > 8


def test_one_candidate() -> None:
    policy = DualMapPolicy()
    assert policy.choose(request("1", SYSTEM), fleet(*engines(1)), 0.0) == Decision("e0", "only_candidate")


def test_a_prefix_every_request_starts_with_does_not_pin_them_all_to_one_pair() -> None:
    """Every prompt starts with the same system prompt (as every Mooncake request does), from a cold start:
    once enough requests have shown it is common, the key moves past it and distinct conversations spread
    over the fleet again."""
    policy = DualMapPolicy(prefix_blocks=2)
    view = fleet(*engines(8))
    shared = SYSTEM + [1] * 16 * 4  # 12 blocks every request starts with
    chosen = Counter()
    for conversation in range(400):
        req = request(str(conversation), shared + [conversation + 10_000] * 16 * 3)
        decision = route(policy, req, view)
        if conversation >= 3:  # three conversations show the system prompt is common
            chosen[decision.engine_id] += 1
    assert len(chosen) >= 6, chosen


def test_a_conversation_keeps_its_key_across_turns() -> None:
    policy = DualMapPolicy(prefix_blocks=2)
    ids = [e.engine_id for e in engines(8)]
    view = fleet(*engines(8))
    shared = SYSTEM + [1] * 16 * 4
    for other in range(3):  # three conversations show the system prompt is common
        route(policy, request(f"w{other}", shared + [other + 500] * 48), view)
    turn = shared + [7] * 48
    pairs = set()
    for number in range(5):  # each turn extends the last
        req = request(f"t{number}", turn)
        route(policy, req, view)
        pairs.add(policy.pair(req, ids, policy.branching.common_blocks(req.block_hashes or ())))
        turn = turn + [number + 900] * 32
    assert len(pairs) == 1


def test_the_common_prefix_ends_where_prompts_branch_enough() -> None:
    branching = PrefixBranching(fanout=3, max_entries=100)
    for suffix in (10, 11, 12):  # three prompts share [1, 2] and go on differently
        branching.record([1, 2, suffix, suffix + 100])
    assert branching.common_blocks([1, 2, 10, 110, 7]) == 2
    assert branching.common_blocks([5, 1, 2]) == 0  # leading blocks only
    for _ in range(5):  # one prompt, again and again, never branches
        branching.record([1, 2, 10, 110, 7])
    assert branching.common_blocks([1, 2, 10, 110, 7]) == 2
    bounded = PrefixBranching(fanout=1, max_entries=2)
    bounded.record([1, 2, 3, 4])  # parents 1, 2, 3: the oldest, 1, is forgotten
    assert bounded.common_blocks([1, 2]) == 0 and bounded.common_blocks([2, 3, 4]) == 2


def route(policy: DualMapPolicy, req: RequestInfo, view: FleetView) -> Decision:
    decision = policy.choose(req, view, 0.0)
    policy.on_dispatch(req, decision.engine_id, 0.0)
    return decision


def test_rings_weighted_by_capacity_give_a_faster_engine_more_keys() -> None:
    ring = HashRing({"h100": 3.0, "l4": 1.0}, "primary", 128)
    owners = Counter(ring.owner((i * 0x9E3779B97F4A7C15) & (2**64 - 1)) for i in range(20_000))
    assert 2.2 < owners["h100"] / owners["l4"] < 4.0
