import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetserve.workload.prompts import WORDS, block_token_ids, prompt_text, prompt_token_ids
from fleetserve.workload.trace import TraceRequest

BLOCK = 16

block_lists = st.lists(st.integers(min_value=0, max_value=2**40), min_size=0, max_size=6)


def request_for(blocks: list[int], tail: int) -> TraceRequest:
    # `tail` tokens of the last block are used (1..BLOCK), as in a trace whose prompt ends mid-block.
    length = max(0, (len(blocks) - 1) * BLOCK + tail) if blocks else tail
    return TraceRequest(0.0, length, 1, hash_ids=tuple(blocks), hash_block_size=BLOCK)


@settings(max_examples=150, deadline=None)
@given(
    shared=block_lists,
    rest_a=block_lists,
    rest_b=block_lists,
    tail_a=st.integers(1, BLOCK),
    tail_b=st.integers(1, BLOCK),
)
def test_equal_leading_blocks_give_equal_token_prefixes(
    shared: list[int], rest_a: list[int], rest_b: list[int], tail_a: int, tail_b: int
) -> None:
    a = request_for(shared + rest_a, tail_a)
    b = request_for(shared + rest_b, tail_b)
    tokens_a = prompt_token_ids(a, index=0)
    tokens_b = prompt_token_ids(b, index=1)
    assert len(tokens_a) == a.input_length and len(tokens_b) == b.input_length
    common_blocks = 0
    for block_a, block_b in zip(a.hash_ids, b.hash_ids, strict=False):
        if block_a != block_b:
            break
        common_blocks += 1
    shared_tokens = min(common_blocks * BLOCK, a.input_length, b.input_length)
    assert np.array_equal(tokens_a[:shared_tokens], tokens_b[:shared_tokens])
    if common_blocks * BLOCK < min(a.input_length, b.input_length):
        # The first differing block differs somewhere (16 tokens over a 32k vocabulary).
        end = (common_blocks + 1) * BLOCK
        assert not np.array_equal(tokens_a[shared_tokens:end], tokens_b[shared_tokens:end])


@settings(max_examples=50, deadline=None)
@given(shared=block_lists, extra=st.integers(0, 40))
def test_text_prefix_is_shared_with_the_blocks(shared: list[int], extra: int) -> None:
    a = TraceRequest(0, len(shared) * BLOCK + extra, 1, hash_ids=(*shared, 1), hash_block_size=BLOCK)
    b = TraceRequest(0, len(shared) * BLOCK + extra, 1, hash_ids=(*shared, 2), hash_block_size=BLOCK)
    text_a, text_b = prompt_text(a, index=0), prompt_text(b, index=1)
    words_a, words_b = text_a.split(), text_b.split()
    assert len(words_a) == a.input_length
    assert words_a[: len(shared) * BLOCK] == words_b[: len(shared) * BLOCK]
    assert set(words_a) <= set(WORDS)


def test_requests_without_hash_ids_get_unique_tokens_per_index_and_seed() -> None:
    request = TraceRequest(0, 256, 1)
    first = prompt_token_ids(request, index=0)
    assert np.array_equal(first, prompt_token_ids(request, index=0))
    assert np.mean(first == prompt_token_ids(request, index=1)) < 0.01
    assert np.mean(first == prompt_token_ids(request, index=0, seed=9)) < 0.01


def test_blocks_beyond_the_listed_hash_ids_are_filled_uniquely() -> None:
    short_listing = TraceRequest(0, 40, 1, hash_ids=(7,), hash_block_size=BLOCK)
    tokens = prompt_token_ids(short_listing)
    assert len(tokens) == 40
    assert np.array_equal(tokens[:BLOCK], block_token_ids(7, BLOCK))
    other = prompt_token_ids(short_listing, index=5)
    assert np.array_equal(other[:BLOCK], tokens[:BLOCK])
    assert not np.array_equal(other[BLOCK:], tokens[BLOCK:])


def test_tokens_respect_the_vocabulary_and_the_reserved_low_ids() -> None:
    request = TraceRequest(0, 5000, 1, hash_ids=tuple(range(10)))
    tokens = prompt_token_ids(request, vocab_size=1000, first_token_id=3)
    assert tokens.dtype == np.int32
    assert tokens.min() >= 3 and tokens.max() < 1000
    # Close to uniform over the vocabulary: every id shows up.
    assert len(np.unique(tokens)) > 990


def test_cached_blocks_are_read_only() -> None:
    block = block_token_ids(123, BLOCK)
    assert not block.flags.writeable
    assert block_token_ids(123, BLOCK) is block
