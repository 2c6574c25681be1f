"""The emulator's tokenizer and pseudo-text: deterministic, prefix-stable, one word per token."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from fleetserve.engines.emulator.text import PseudoText, plan_output, request_seed
from fleetserve.protocol.tokenizer import HashTokenizer, chat_prompt

TOKENIZER = HashTokenizer(32000)


@given(st.text(max_size=200), st.text(max_size=200))
def test_a_shared_text_prefix_gives_a_shared_token_prefix(prefix: str, suffix: str) -> None:
    # as with byte-pair encoders, only the piece at the point where the texts diverge may differ
    whole = TOKENIZER.encode(prefix + suffix)
    stable = TOKENIZER.encode(prefix)[:-1]
    assert whole[: len(stable)] == stable


@given(st.text(max_size=300))
def test_ids_are_in_the_vocabulary_and_deterministic(text: str) -> None:
    ids = TOKENIZER.encode(text)
    assert all(256 <= token < 32000 for token in ids)
    assert ids == HashTokenizer(32000).encode(text)
    assert (len(ids) == 0) == (text == "")


def test_about_four_characters_per_token_on_english() -> None:
    text = "The quick brown fox jumps over the lazy dog while the farmer watches from the field. " * 10
    assert 2.5 < len(text) / len(TOKENIZER.encode(text)) < 5


@given(st.integers(min_value=0, max_value=2**32), st.integers(min_value=1, max_value=300))
def test_pseudo_text_has_one_token_per_word(seed: int, count: int) -> None:
    text = PseudoText(seed).take(count)
    assert len(TOKENIZER.encode(text)) == count
    assert PseudoText(seed).take(count) == text


@given(
    st.integers(min_value=0, max_value=2**32),
    st.integers(min_value=1, max_value=5000),
    st.integers(min_value=0, max_value=5000),
)
def test_planned_length_respects_limit_and_min_tokens(seed: int, limit: int, min_tokens: int) -> None:
    min_tokens = min(min_tokens, limit)
    plan = plan_output(seed, limit, min_tokens, ignore_eos=False, median_tokens=128)
    assert max(1, min_tokens) <= plan.num_tokens <= limit
    assert plan.finish_reason == ("length" if plan.num_tokens == limit else "stop")
    assert plan_output(seed, limit, min_tokens, ignore_eos=True, median_tokens=128).num_tokens == limit


def test_same_prompt_same_answer_unless_seeded() -> None:
    assert request_seed([1, 2, 3], None) == request_seed([1, 2, 3], None)
    assert request_seed([1, 2, 3], None) != request_seed([1, 2, 4], None)
    assert request_seed([1, 2, 3], 7) == 7


def test_chat_prompt_keeps_earlier_turns_as_prefix() -> None:
    first = chat_prompt([("user", "hello")])
    second = chat_prompt([("user", "hello"), ("assistant", "hi there"), ("user", "more")])
    assert second.startswith(first.removesuffix("<|assistant|>\n"))
