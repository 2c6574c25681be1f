"""What the emulated model 'writes': how many tokens an answer has, and which words.

Nothing is sampled from a language model, so the emulator decides the length up front:

- `ignore_eos` makes the answer exactly the output limit (max_tokens, or the room left in the context),
  finishing with "length", like vLLM;
- otherwise the answer has a "natural" length drawn from a log-normal distribution (median
  `median_tokens`) seeded by the request, capped by the limit ("length") and raised to `min_tokens`;
  an answer that ends before its limit finishes with "stop", as if the model emitted EOS.

Stop strings and stop token ids are honoured as vLLM honours them: the answer ends at the first token
that completes a stop string (the string itself is left out of the text) or is a stop token, with
`finish_reason` "stop" and `stop_reason` naming what matched.

Each word of the pseudo-text is one token of the engine's tokenizer: with the default tokenizer every
word is (a space and at most four letters); with a real tokenizer.json only the words it encodes as one
token are used. So the streamed text tokenizes back to exactly the `completion_tokens` the answer counts,
one chunk per token, and feeding an answer back as part of the next prompt, as a chat client does, costs
as many prompt tokens as it cost output tokens.
"""

from __future__ import annotations

import math
import random
import zlib
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from fleetserve.errors import InputError
from fleetserve.protocol.tokenizer import Tokenizer

_WORD_LIST = """
the of and to in is it that was for on are as with his they at be this from have or by one had not but
what all were when we can an your said if do will each how up out them then she many some so into
has more her two like him see time no make than been call who its now find long down day did get come
made may part over new take only know year live me back give most very our just name good man says word
much such turn here why ask went men read need land home us move try kind hand big high act put end does
well also play air away port form off line set own show farm draw few near real life open seem next hard
soon list song stop feet tree once fast face wood main bird book took room rock
"""
_WORDS = tuple(" " + word for word in _WORD_LIST.split())

NATURAL_SIGMA = 0.8
MIN_WORDS = 64  # fewer built-in words than this and the tokenizer's own word tokens are added


@dataclass(frozen=True)
class PlannedOutput:
    num_tokens: int
    finish_reason: str  # "length", "stop" or "tool_calls"
    stop_reason: str | int | None = None  # the stop string or stop token id that ended the answer


@dataclass(frozen=True)
class Vocabulary:
    """The words the pseudo-text draws from, each one token of the engine's tokenizer, with its id."""

    words: tuple[str, ...]
    ids: tuple[int, ...]

    WORDS: ClassVar[tuple[str, ...]] = _WORDS  # the built-in words, each with its leading space

    @classmethod
    def for_tokenizer(cls, tokenizer: Tokenizer) -> Vocabulary:
        """The built-in words the tokenizer encodes as one token each; a small vocabulary that has too
        few of them lends its own space-prefixed word tokens."""
        single = [(word, ids[0]) for word in _WORDS if len(ids := tokenizer.encode(word)) == 1]
        if len(single) < MIN_WORDS:
            known = {word for word, _ in single}
            single += [(w, tokenizer.encode(w)[0]) for w in tokenizer.word_tokens() if w not in known]
        if len(single) < 2:
            raise InputError("the tokenizer has fewer than two words that are one token each")
        return cls(tuple(word for word, _ in single), tuple(token for _, token in single))


def request_seed(prompt_token_ids: Sequence[int], seed: int | None) -> int:
    """The request's own seed, or one derived from its prompt: the same prompt gets the same answer."""
    if seed is not None:
        return seed
    return zlib.crc32(array("q", prompt_token_ids).tobytes())


def plan_output(
    seed: int, limit: int, min_tokens: int, ignore_eos: bool, median_tokens: float
) -> PlannedOutput:
    if ignore_eos:
        return PlannedOutput(limit, "length")
    rng = random.Random(seed)
    natural = max(1, round(rng.lognormvariate(math.log(median_tokens), NATURAL_SIGMA)), min_tokens)
    if natural >= limit:
        return PlannedOutput(limit, "length")
    return PlannedOutput(natural, "stop")


class PseudoText:
    """The words of one answer, produced in order, a few tokens at a time."""

    def __init__(self, seed: int, words: Sequence[str] = _WORDS) -> None:
        self._rng = random.Random(seed ^ 0x5EED)
        self._words = words

    def take(self, num_tokens: int) -> str:
        return "".join(self._rng.choices(self._words, k=num_tokens))

    def take_indices(self, num_tokens: int) -> list[int]:
        """The same draws as `take`, as positions in the vocabulary."""
        return self._rng.choices(range(len(self._words)), k=num_tokens)


class FixedText:
    """An answer decided up front (JSON, or text cut at a stop), handed out one token's piece at a time."""

    def __init__(self, pieces: Sequence[str]) -> None:
        self._pieces = pieces
        self._next = 0

    def take(self, num_tokens: int) -> str:
        start = self._next
        self._next += num_tokens
        return "".join(self._pieces[start : self._next])


def words_until_stop(
    seed: int,
    plan: PlannedOutput,
    vocabulary: Vocabulary,
    stops: Sequence[str],
    stop_token_ids: Sequence[int],
) -> tuple[PlannedOutput, FixedText]:
    """The pseudo-text of `plan`, ended at the first stop string or stop token as vLLM ends it."""
    indices = PseudoText(seed, vocabulary.words).take_indices(plan.num_tokens)
    pieces = [vocabulary.words[index] for index in indices]
    stop_ids = set(stop_token_ids)
    longest = max((len(stop) for stop in stops), default=0)
    text = ""
    for position, index in enumerate(indices):
        if vocabulary.ids[index] in stop_ids:
            return PlannedOutput(position + 1, "stop", vocabulary.ids[index]), FixedText(pieces[:position])
        before = len(text)
        text += pieces[position]
        # a stop string may start in an earlier piece: look back as far as the longest one reaches
        window = max(0, before - longest + 1)
        for stop in stops:
            found = text.find(stop, window)
            if found >= 0:
                return PlannedOutput(position + 1, "stop", stop), FixedText(
                    _clip(pieces[: position + 1], found)
                )
    return plan, FixedText(pieces)


def _clip(pieces: list[str], length: int) -> list[str]:
    """The pieces cut so that together they are the first `length` characters; the rest are empty."""
    out = []
    for piece in pieces:
        out.append(piece[: max(0, length)])
        length -= len(piece)
    return out
