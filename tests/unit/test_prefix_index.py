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


def test_lru_bound_evicts_least_recently_used_tail_first() -> None:
    index = PrefixIndex(max_entries=3)
    index.record([1, 2, 3], "a", now=0.0)  # a prompt ages tail first: 3 is the oldest, 1 the newest
    index.record([4], "b", now=1.0)
    assert len(index) == 3
    assert index.engines_holding(3) == []
    assert index.match([1, 2, 3]) == {"a": 2}
    index.record([4], "b", now=2.0)  # touch 4: now 2 is the oldest
    index.record([5], "b", now=3.0)
    assert index.engines_holding(2) == []
    assert index.match([1, 2, 3]) == {"a": 1}
    assert index.stats().evicted_lru == 2


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


def chain(blocks: list[int]) -> list[int]:
    """Chained hashes of a prompt made of these block contents: each names its whole prefix."""
    return [hash(tuple(blocks[: i + 1])) & (2**64 - 1) for i in range(len(blocks))]


@settings(max_examples=100, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["add", "evict_tail"]),
            st.sampled_from(["a", "b", "c"]),
            st.lists(st.integers(0, 3), min_size=1, max_size=6),
            st.integers(1, 6),
        ),
        max_size=30,
    ),
    query=st.lists(st.integers(0, 3), max_size=8),
)
def test_match_agrees_with_a_plain_set_model(ops: list, query: list[int]) -> None:
    """Engines store prompts and evict a block only when none of their deeper blocks extends it (vLLM
    frees a request's blocks tail first): match must report, per engine, exactly the leading blocks of the
    query it holds."""
    index = PrefixIndex()
    held: dict[str, set[tuple[int, ...]]] = {"a": set(), "b": set(), "c": set()}  # prefixes, as contents
    for op, engine, blocks, tail in ops:
        prefixes = [tuple(blocks[: i + 1]) for i in range(len(blocks))]
        if op == "add":
            index.add(chain(blocks), engine, now=0.0)
            held[engine].update(prefixes)
            continue
        for prefix in reversed(prefixes[-tail:]):  # deepest first, while nothing deeper depends on it
            extended = any(
                len(other) > len(prefix) and other[: len(prefix)] == prefix for other in held[engine]
            )
            if prefix not in held[engine] or extended:
                break
            index.remove(chain(list(prefix))[-1:], engine)
            held[engine].discard(prefix)
    query_hashes = chain(query)
    expected = {}
    for engine, prefixes in held.items():
        length = 0
        while length < len(query) and tuple(query[: length + 1]) in prefixes:
            length += 1
        if length:
            expected[engine] = length
    assert index.match(query_hashes) == expected
    assert len(index) == len(set().union(*held.values()))


@settings(max_examples=200, deadline=None)
@given(
    prompts=st.lists(
        st.tuples(st.sampled_from("abcd"), st.lists(st.integers(0, 5), min_size=1, max_size=12)),
        max_size=12,
    ),
    probe=st.lists(st.integers(0, 5), min_size=1, max_size=40),
    capacity=st.integers(1, 40),
)
def test_galloping_match_equals_a_block_by_block_walk(
    prompts: list[tuple[str, list[int]]], probe: list[int], capacity: int
) -> None:
    """Prompts recorded under LRU eviction: the galloping walk must find for every engine exactly the
    leading blocks it holds."""
    index = PrefixIndex(max_entries=capacity)
    for now, (engine, blocks) in enumerate(prompts):
        index.record(chain(blocks), engine, now=float(now))
    hashes = chain(probe)
    expected = {}
    for engine in "abcd":
        held = 0
        while held < len(hashes) and engine in index.engines_holding(hashes[held]):
            held += 1
        if held:
            expected[engine] = held
    assert index.match(hashes) == expected
