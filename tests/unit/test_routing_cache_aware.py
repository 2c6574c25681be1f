from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.unit.routing_views import engine, fleet, request

from fleetserve.model.kvcache import hash_prompt_blocks
from fleetserve.routing import Decision, EngineView, FleetView, NoEngineAvailable, RequestInfo, make_policy
from fleetserve.routing.cache_aware import KVCostPolicy, PrefixAwarePolicy
from fleetserve.routing.prefix import PENDING_TTL_S, request_block_hashes
from fleetserve.routing.prefix_index import PrefixIndex

SYSTEM = list(range(1000, 1000 + 16 * 8))  # an 8-block shared system prompt


def route(policy, req: RequestInfo, view: FleetView, now: float = 0.0):
    decision = policy.choose(req, view, now)
    policy.on_dispatch(req, decision.engine_id, now)
    return decision


# ---- prefix helpers --------------------------------------------------------------------------------


def test_block_hashes_are_computed_once_and_cached_on_the_request() -> None:
    req = request("r", [*SYSTEM, 1, 2, 3], adapter="lora-a")
    hashes = request_block_hashes(req, 16)
    assert hashes == hash_prompt_blocks(req.prompt_token_ids, 16, "lora-a")
    assert len(hashes) == 8  # the 3-token tail is not a full block
    assert request_block_hashes(req, 16) is hashes
    assert request_block_hashes(RequestInfo("x", "m", prompt_len=40)) == []


@settings(max_examples=50, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["add", "remove", "clear"]),
            st.sampled_from(["a", "b", "c"]),
            st.lists(st.integers(0, 20), max_size=8),
        ),
        max_size=30,
    )
)
def test_engine_blocks_counts_what_each_engine_holds(ops: list) -> None:
    index = PrefixIndex()
    held: dict[str, set[int]] = {"a": set(), "b": set(), "c": set()}
    for op, engine_id, blocks in ops:
        if op == "add":
            index.add(blocks, engine_id, now=0.0)
            held[engine_id].update(blocks)
        elif op == "remove":
            index.remove(blocks, engine_id)
            held[engine_id].difference_update(blocks)
        else:
            index.clear_engine(engine_id)
            held[engine_id].clear()
    assert {e: index.engine_blocks(e) for e in held} == {e: len(b) for e, b in held.items()}


def test_engine_blocks_follows_lru_eviction() -> None:
    index = PrefixIndex(max_entries=4)
    index.add([1, 2, 3], "a", now=0.0)
    index.add([3, 4, 5], "b", now=1.0)  # five blocks in a four-block index: 1, the oldest, goes
    assert (index.engine_blocks("a"), index.engine_blocks("b")) == (2, 3)


# ---- prefix_aware ---------------------------------------------------------------------------------


def test_prefix_aware_follows_the_prefix_it_sent_before() -> None:
    policy = make_policy("prefix_aware", {}, seed=1)
    view = fleet(engine("a"), engine("b"), engine("c"))
    first = route(policy, request("1", SYSTEM + [1] * 20), view)
    assert first.reason == "smallest_tree"
    again = route(policy, request("2", SYSTEM + [2] * 20), view)
    assert again == Decision(first.engine_id, "cache_hit")


def test_prefix_aware_below_threshold_goes_to_the_smallest_tree() -> None:
    policy = PrefixAwarePolicy(cache_threshold=0.5, seed=0)
    view = fleet(engine("a"), engine("b"))
    for i in range(3):  # a learns three unrelated prompts, b one
        policy.on_dispatch(request(f"a{i}", [i] * 64), "a", 0.0)
    policy.on_dispatch(request("b0", SYSTEM[:32]), "b", 0.0)
    # 2 of 10 blocks match b (rate 0.2 < 0.5): go to the smaller tree, which is b here anyway...
    short_match = request("x", SYSTEM[:32] + [7] * 128)
    assert policy.choose(short_match, view, 0.0).reason == "smallest_tree"
    # ...and a's tree is larger, so even an a-prefix below the threshold goes to b
    decision = policy.choose(request("y", [0] * 16 + [9] * 144), view, 0.0)
    assert decision == Decision("b", "smallest_tree")


def test_prefix_aware_shortest_queue_when_imbalanced() -> None:
    policy = PrefixAwarePolicy(seed=0)
    policy.on_dispatch(request("warm", SYSTEM), "a", 0.0)
    busy_a = fleet(engine("a", in_flight=100), engine("b", in_flight=30))
    # max - min = 70 > 64 and 100 > 1.5 * 30: imbalanced, so the cache on a does not matter
    assert policy.choose(request("r", SYSTEM), busy_a, 0.0).engine_id == "b"
    assert policy.choose(request("r", SYSTEM), busy_a, 0.0).reason == "imbalanced"
    # a gap of 70 but a ratio of only 1.35: still balanced, the cache wins
    close = fleet(engine("a", in_flight=270), engine("b", in_flight=200))
    assert policy.choose(request("s", SYSTEM), close, 0.0).engine_id == "a"
    # capacity counts: 100 requests on an engine three times as fast is a normalised load of 33
    fast_a = fleet(engine("a", in_flight=100, capacity=3.0), engine("b", in_flight=30))
    assert policy.choose(request("t", SYSTEM), fast_a, 0.0) == Decision("a", "cache_hit")


def test_prefix_aware_reads_the_precise_index_and_leaves_it_alone() -> None:
    precise = PrefixIndex()
    precise.add(hash_prompt_blocks(SYSTEM, 16), "b", now=0.0)
    policy = PrefixAwarePolicy(seed=0)
    view = fleet(engine("a"), engine("b"), prefix_index=precise)
    decision = route(policy, request("r", SYSTEM + [5] * 16), view)
    assert decision.engine_id == "b" and decision.reason == "cache_hit"
    assert precise.engine_blocks("b") == 8  # the dispatch did not write the 9th block into it
    assert len(policy.prefixes.own) == 0


def test_precise_mode_counts_its_own_recent_dispatches_until_the_events_catch_up() -> None:
    """A burst sharing a new prefix: the engines have not reported it yet (their prefill has not run), so
    without the pending dispatches every request of the burst would look like a miss and scatter."""
    precise = PrefixIndex()  # empty: no engine has reported anything
    policy = PrefixAwarePolicy(seed=0)
    view = fleet(engine("a"), engine("b"), engine("c"), prefix_index=precise)
    first = route(policy, request("r0", SYSTEM + [1] * 16), view, now=0.0)
    follower = route(policy, request("r1", SYSTEM + [2] * 16), view, now=1.0)
    assert follower == Decision(first.engine_id, "cache_hit")
    assert len(precise) == 0  # still never written
    later = policy.choose(request("r2", SYSTEM + [3] * 16), view, PENDING_TTL_S + 2.0)
    assert later.reason != "cache_hit"  # the engines never confirmed it: the pending claim has expired


def test_prefix_aware_skips_unhealthy_and_other_models() -> None:
    policy = PrefixAwarePolicy(seed=0)
    policy.on_dispatch(request("warm", SYSTEM), "a", 0.0)
    view = fleet(engine("a", healthy=False), engine("b"), EngineView("c", model="other"))
    assert policy.choose(request("r", SYSTEM), view, 0.0) == Decision("b", "only_candidate")
    with pytest.raises(NoEngineAvailable):
        policy.choose(RequestInfo("r", model="none"), view, 0.0)


def test_unknown_parameter_names_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="cache_threshold"):
        make_policy("prefix_aware", {"threshold": 0.5})
    with pytest.raises(ValueError, match="cache_threshold"):
        PrefixAwarePolicy(cache_threshold=2.0)


# ---- kv_cost ----------------------------------------------------------------------------------------


def test_kv_cost_adds_uncached_prefill_and_active_blocks() -> None:
    policy = KVCostPolicy()
    engines = [engine("w1"), engine("w2"), engine("w3")]
    decoding = request("d", list(range(64)))  # 4 blocks decoding on w3, its prefill done
    route(policy, decoding, fleet(engines[2]))
    policy.on_first_token(decoding, "w3", 1.0)
    req = request("r", list(range(160)))  # 10 blocks
    matched = {"w1": 2, "w2": 5, "w3": 8}
    # 1.0 * uncached blocks (8, 5, 2) + active blocks (0, 0, 4) + the request's own 10
    assert policy.costs(req, engines, matched) == [18.0, 15.0, 16.0]
    assert KVCostPolicy(overlap_weight=0.0).costs(req, engines, matched) == [10.0, 10.0, 10.0]


def test_kv_cost_prefers_the_cached_engine_until_its_load_outweighs_the_cache() -> None:
    policy = KVCostPolicy(overlap_weight=2.0, seed=0)
    view = fleet(engine("a"), engine("b"))
    decisions = []
    for i in range(3):  # 9-block prompts sharing 8 blocks, each past its prefill before the next
        req = request(str(i), SYSTEM + [i] * 16)
        decisions.append(route(policy, req, view))
        policy.on_first_token(req, decisions[-1].engine_id, 0.0)
    first, second, third = (d.engine_id for d in decisions)
    # second: 2 * 1 uncached + (9 active + 9) = 20 on the cached engine, against 2 * 9 + 9 = 27
    assert second == first and decisions[1].reason == "lowest_cost"
    # third: 2 * 1 + (18 active + 9) = 29 there now, so the idle engine's 27 wins
    assert third != first


def test_kv_cost_bookkeeping_follows_the_request_lifecycle() -> None:
    policy = KVCostPolicy()
    view = fleet(engine("a"))
    req = request("1", list(range(100)))  # 6.25 -> 7 blocks
    route(policy, req, view)
    assert policy._prefill_tokens["a"] == 100 and policy._active_blocks["a"] == 7
    policy.on_first_token(req, "a", 1.0)
    assert policy._prefill_tokens["a"] == 0 and policy._active_blocks["a"] == 7
    policy.on_dispatch(req, "a", 1.0)  # a retry re-dispatches: counted once, not twice
    assert policy._active_blocks["a"] == 7
    policy.on_finish(req, "a", 2.0)
    policy.on_finish(req, "a", 2.0)
    assert policy._prefill_tokens["a"] == 0 and policy._active_blocks["a"] == 0


def test_kv_cost_divides_by_capacity() -> None:
    policy = KVCostPolicy()
    view = fleet(engine("slow"), engine("fast", capacity=3.0))
    for i in range(2):
        route(policy, request(f"f{i}", [i] * 64), fleet(engine("fast", capacity=3.0)))
    # fast holds two 4-block requests still in prefill: (8 + 4 prefill + 8 + 4 decode) / 3 = 8, the
    # same as the idle slow engine's 4 + 4; the tie goes to the engine caching fewer blocks
    assert policy.costs(request("x", [9] * 64), list(view.engines.values()), {}) == [8.0, 8.0]
    assert policy.choose(request("y", [8] * 64), view, 0.0) == Decision("slow", "lowest_cost")
    policy.on_first_token(request("f0", [0] * 64), "fast", 1.0)
    assert policy.choose(request("z", [7] * 64), view, 0.0) == Decision("fast", "lowest_cost")


def test_kv_cost_softmax_is_seeded_and_favours_low_cost() -> None:
    view = fleet(engine("a"), engine("b"), engine("c"))
    loaded = {"a": 0, "b": 20, "c": 60}

    def draws(seed: int) -> list[str]:
        policy = KVCostPolicy(temperature=0.5, seed=seed)
        policy._active_blocks.update(loaded)
        return [policy.choose(request(str(i), [i] * 32), view, 0.0).engine_id for i in range(400)]

    first = draws(7)
    assert first == draws(7)
    counts = Counter(first)
    assert counts["a"] > counts["b"] > counts["c"] > 0
    greedy = KVCostPolicy(seed=7)
    greedy._active_blocks.update(loaded)
    assert {greedy.choose(request(str(i), [i] * 32), view, 0.0).engine_id for i in range(50)} == {"a"}


def test_every_policy_decision_carries_a_reason() -> None:
    view = fleet(engine("a"), engine("b"))
    for name in ("prefix_aware", "kv_cost", "dualmap"):
        policy = make_policy(name, {}, seed=3)
        decision = route(policy, request("r", SYSTEM), view)
        assert decision.reason and decision.engine_id in view.engines
