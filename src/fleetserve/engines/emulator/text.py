"""What the emulated model 'writes': how many tokens an answer has, and which words.

Nothing is sampled from a language model, so the emulator decides the length up front:

- `ignore_eos` makes the answer exactly the output limit (max_tokens, or the room left in the context),
  finishing with "length", like vLLM;
- otherwise the answer has a "natural" length drawn from a log-normal distribution (median
  `median_tokens`) seeded by the request, capped by the limit ("length") and raised to `min_tokens`;
  an answer that ends before its limit finishes with "stop", as if the model emitted EOS.

Stop strings and stop token ids are accepted but never matched: the pseudo-text is not meant to be read.
Each word of the pseudo-text is one token of the default tokenizer (a space and at most four letters),
so feeding an answer back as part of the next prompt, as a chat client does, costs as many prompt tokens
as it cost output tokens.
"""

from __future__ import annotations

import math
import random
import zlib
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

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


@dataclass(frozen=True)
class PlannedOutput:
    num_tokens: int
    finish_reason: str  # "length" or "stop"


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

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed ^ 0x5EED)

    def take(self, num_tokens: int) -> str:
        return "".join(self._rng.choices(_WORDS, k=num_tokens))
