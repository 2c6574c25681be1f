"""Turn a trace request into concrete prompt tokens or text whose prefixes are shared exactly when the
trace says they are.

Each block id expands to a fixed pseudo-random block of tokens (a pure function of the id, the block size
and the vocabulary), so two requests whose `hash_ids` start alike get identical token prefixes, and the
request's last block is cut to fit its `input_length`. A request without `hash_ids` gets tokens no other
request shares, derived from its index in the trace and a seed. The mixing function is SplitMix64, written
out here so the tokens do not change between numpy versions.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from fleetserve.errors import InputError
from fleetserve.workload.trace import TraceRequest

DEFAULT_VOCAB_SIZE = 32000
# Expanded blocks kept in memory; 8192 blocks of 512 int32 tokens is 16 MiB.
BLOCK_CACHE_SIZE = 8192

_MASK64 = (1 << 64) - 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
# Separate key spaces, so a block id never collides with a request-unique token stream.
_BLOCK_DOMAIN = 0x426C6F636B000000
_UNIQUE_DOMAIN = 0x556E697175650000

# Words that are one token in common BPE vocabularies and in the emulator's tokenizer (which splits
# longer words into pieces of four letters); prompt text uses one word per token so the text's token count
# is close to the trace's input length.
_WORD_TEXT = """
    the of and to in is for on that by with as at from this be are or it was an which not but all can
    has have more one their will new its also than other about after first time were been two only over
    some would into may such these most when out many any where there up so no what then well used who
    them three our each could made because both under both just same people year work life world system
    part day way state long good high back small large light water place great point house group number
    city end home hand line name case field river power form music level order land game team book local
    school area water market news data song film side road model head body price plan line play view king
    war law age love fire light sound color story field door window paper money music table letter black
    white green red blue gold stone tree wood bird fish horse dog cat sea sky sun moon star rain snow wind
    cloud hill lake river road bridge tower train ship plane car bus street garden farm food bread milk tea
    wine salt sugar rice corn apple heart mind eye face voice word page class test rule idea fact truth"""
WORDS: tuple[str, ...] = tuple(word for word in dict.fromkeys(_WORD_TEXT.split()) if len(word) <= 4)


def _splitmix64(values: np.ndarray) -> np.ndarray:
    z = values + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def _mix_key(*parts: int) -> int:
    # Scalar SplitMix64 on Python ints (numpy scalars are slower here), chained over the parts.
    key = 0
    for part in parts:
        z = ((key ^ (part & _MASK64)) + 0x9E3779B97F4A7C15) & _MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        key = z ^ (z >> 31)
    return key


def _token_stream(key: int, start: int, count: int, vocab_size: int, first_token_id: int) -> np.ndarray:
    positions = np.arange(start, start + count, dtype=np.uint64) + np.uint64(key)
    span = np.uint64(vocab_size - first_token_id)
    return (_splitmix64(positions) % span).astype(np.int32) + np.int32(first_token_id)


@lru_cache(maxsize=BLOCK_CACHE_SIZE)
def block_token_ids(
    block_id: int, block_size: int, vocab_size: int = DEFAULT_VOCAB_SIZE, first_token_id: int = 0
) -> np.ndarray:
    """The tokens block `block_id` expands to: `block_size` ids in [first_token_id, vocab_size). Read-only."""
    tokens = _token_stream(_mix_key(_BLOCK_DOMAIN, block_id), 0, block_size, vocab_size, first_token_id)
    tokens.setflags(write=False)
    return tokens


def prompt_token_ids(
    request: TraceRequest,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    *,
    index: int = 0,
    seed: int = 0,
    first_token_id: int = 0,
) -> np.ndarray:
    """`request.input_length` token ids (int32) for the request at position `index` of a trace.

    Requests with equal leading `hash_ids` share those blocks' tokens. Tokens past the last listed block
    (a trace may list fewer blocks than the length needs) and the tokens of requests without `hash_ids`
    are unique to (`seed`, `index`). `first_token_id` keeps low ids (often special tokens) out.
    """
    if not 0 <= first_token_id < vocab_size:
        raise InputError(f"need 0 <= first_token_id < vocab_size, got {first_token_id} and {vocab_size}")
    length = request.input_length
    block_size = request.hash_block_size
    hash_ids = request.hash_ids or ()
    blocks_needed = -(-length // block_size)
    parts = [
        block_token_ids(block_id, block_size, vocab_size, first_token_id)
        for block_id in hash_ids[:blocks_needed]
    ]
    covered = len(parts) * block_size
    if covered < length:
        unique_key = _mix_key(_UNIQUE_DOMAIN, seed, index)
        parts.append(_token_stream(unique_key, covered, length - covered, vocab_size, first_token_id))
    if not parts:
        return np.zeros(0, dtype=np.int32)
    return np.concatenate(parts)[:length]


_WORD_ARRAY = np.array(WORDS, dtype=object)


def prompt_text(request: TraceRequest, *, index: int = 0, seed: int = 0) -> str:
    """Prompt text with one word per token, so requests sharing leading blocks share a text prefix."""
    token_ids = prompt_token_ids(request, vocab_size=len(WORDS), index=index, seed=seed)
    return " ".join(_WORD_ARRAY[token_ids].tolist())
