from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from fleetserve.routing.prefix_index import BYTES_PER_ENTRY, PrefixIndex


def test_match_reports_longest_prefix_per_engine() -> None:
    index = PrefixIndex()
    index.record([1, 2, 3, 4], "a", now=0.0)
    index.record([1, 2, 9], "b", now=0.0)
    assert index.match([1, 2, 3, 4, 5]) == {"a": 4, "b": 2}
    assert index.match([7, 1, 2]) == {}
    assert index.engines_holding(2) == ["a", "b"]


def test_lru_bound_evicts_least_recently_used() -> None:
    index = PrefixIndex(max_entries=3)
    index.record([1, 2, 3], "a", now=0.0)
    index.record([1], "a", now=1.0)  # touch 1: now 2 is the oldest
    index.record([4], "b", now=2.0)
    assert len(index) == 3
    assert index.engines_holding(2) == []
    assert index.match([1]) == {"a": 1}
    assert index.stats().evicted_lru == 1


def test_byte_bound_caps_entries() -> None:
    index = PrefixIndex(max_entries=10**6, max_bytes=10 * BYTES_PER_ENTRY)
    index.record(list(range(50)), "a", now=0.0)
    assert len(index) == 10
    assert index.stats().approx_bytes <= 10 * BYTES_PER_ENTRY


def test_ttl_expires_untouched_blocks() -> None:
    index = PrefixIndex(ttl_s=10.0)
    index.record([1, 2], "a", now=0.0)
    index.record([3], "a", now=8.0)
    assert index.match([1, 2], now=11.0) == {}
    assert index.match([3], now=11.0) == {"a": 1}
    assert index.stats().evicted_ttl == 2


def test_remove_and_clear_engine_free_slots() -> None:
    index = PrefixIndex()
    index.add([1, 2, 3], "a", now=0.0)
    index.add([1, 2], "b", now=0.0)
    index.remove([2], "a")
    assert index.match([1, 2, 3]) == {"a": 1, "b": 2}
    index.clear_engine("b")
    assert index.match([1, 2, 3]) == {"a": 1}
    index.clear_engine("a")
    assert len(index) == 0
    index.add([5], "c", now=0.0)  # reuses a freed slot
    assert index.stats().engines == 1 and index.match([5]) == {"c": 1}


@settings(max_examples=60, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["add", "remove"]),
            st.sampled_from(["a", "b", "c"]),
            st.lists(st.integers(0, 12), min_size=1, max_size=6),
        ),
        max_size=30,
    ),
    query=st.lists(st.integers(0, 12), max_size=8),
)
def test_match_agrees_with_a_plain_set_model(ops: list, query: list[int]) -> None:
    index = PrefixIndex()
    held: dict[str, set[int]] = {"a": set(), "b": set(), "c": set()}
    for op, engine, blocks in ops:
        if op == "add":
            index.add(blocks, engine, now=0.0)
            held[engine].update(blocks)
        else:
            index.remove(blocks, engine)
            held[engine].difference_update(blocks)
    expected = {}
    for engine, blocks in held.items():
        length = 0
        while length < len(query) and query[length] in blocks:
            length += 1
        if length:
            expected[engine] = length
    assert index.match(query) == expected
    assert len(index) == len(set().union(*held.values()))
