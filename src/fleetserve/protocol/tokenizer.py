"""Prompt text to token ids, without downloading anything.

The default `HashTokenizer` splits text the way byte-pair encoders roughly do (a word piece of up to four
letters with its leading space, digits in threes, punctuation runs, whitespace) and hashes each piece
into the model's vocabulary. It is deterministic across processes and prefix-stable: two prompts that
share a text prefix share the token prefix (up to the piece boundary where they diverge), which is what
prefix caching and cache-aware routing need. About 3.5 characters make a token, close to real tokenizers
on English text. A real `tokenizer.json` can be used instead through the `tokenizers` package.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Protocol

from fleetserve.errors import InputError

_PIECE = re.compile(r" ?[^\W\d_]{1,4}| ?\d{1,3}| ?(?:[^\w\s]|_){1,4}|\s+(?!\S)|\s+")
_WORD_TOKEN = re.compile(r" [a-z]{2,8}")
_RESERVED_IDS = 256  # low ids stay free for special tokens, as in real vocabularies


class Tokenizer(Protocol):
    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def pieces(self, text: str) -> list[str]:
        """`text` cut where its tokens begin: one string per token, together the whole text."""
        ...

    def word_tokens(self) -> list[str]:
        """Words of the vocabulary that are one token each (a space, then letters)."""
        ...


class HashTokenizer:
    def __init__(self, vocab_size: int) -> None:
        if vocab_size <= _RESERVED_IDS:
            raise InputError(f"vocab_size must exceed {_RESERVED_IDS}, got {vocab_size}")
        self._vocab_size = vocab_size
        span = vocab_size - _RESERVED_IDS

        @lru_cache(maxsize=1 << 16)
        def piece_id(piece: str) -> int:
            return _RESERVED_IDS + zlib.crc32(piece.encode()) % span

        self._piece_id = piece_id

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def encode(self, text: str) -> list[int]:
        piece_id = self._piece_id
        return [piece_id(piece) for piece in _PIECE.findall(text)]

    def pieces(self, text: str) -> list[str]:
        return _PIECE.findall(text)

    def word_tokens(self) -> list[str]:
        return []  # every word of up to four letters with its space is one piece already


class JsonTokenizer:
    """A Hugging Face `tokenizer.json`, for token counts that match a real model exactly."""

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        self._tokenizer = HFTokenizer.from_file(str(path))

    @property
    def vocab_size(self) -> int:
        return int(self._tokenizer.get_vocab_size())

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def pieces(self, text: str) -> list[str]:
        # cut at each token's end offset, so spaces a tokenizer leaves out of its offsets stay in a piece
        ends = [end for _, end in self._tokenizer.encode(text, add_special_tokens=False).offsets]
        if not ends:
            return []
        ends[-1] = len(text)
        starts = [0, *ends[:-1]]
        return [text[start:end] for start, end in zip(starts, ends, strict=True)]

    def word_tokens(self) -> list[str]:
        words = []
        for token_id in range(self.vocab_size):
            text = self._tokenizer.decode([token_id])
            if _WORD_TOKEN.fullmatch(text) and self.encode(text) == [token_id]:
                words.append(text)
        return words


def load_tokenizer(vocab_size: int, tokenizer_file: str | Path | None = None) -> Tokenizer:
    return json_tokenizer(tokenizer_file) if tokenizer_file else HashTokenizer(vocab_size)


def json_tokenizer(path: str | Path) -> JsonTokenizer:
    """The tokenizer of `path`, loaded once per process while the file is unchanged: the fleet file's
    validation, the gateway and every emulated replica of a model share one. Raises OSError when the
    file cannot be read, ValueError when it is not a tokenizer.json."""
    resolved = Path(path).absolute()
    stat = resolved.stat()  # OSError (e.g. FileNotFoundError) for a missing file
    return _cached_json_tokenizer(str(resolved), stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=16)
def _cached_json_tokenizer(path: str, mtime_ns: int, size: int) -> JsonTokenizer:
    try:
        return JsonTokenizer(path)
    except Exception as exc:  # the tokenizers package raises bare Exceptions for a malformed file
        raise InputError(f"not a Hugging Face tokenizer.json ({exc})") from exc


def chat_prompt(
    messages: Sequence[tuple[str, str]], *, add_generation_prompt: bool = True, continue_final: bool = False
) -> str:
    """A generic chat template over (role, text) pairs, ending with the assistant's turn. Templates of
    real models differ in their markers, not in the property that matters here: a conversation that
    grows by turns keeps its earlier turns as a prefix. `continue_final` leaves the last message open,
    so the answer goes on from its text (vLLM's continue_final_message)."""
    parts = [f"<|{role}|>\n{text}\n" for role, text in messages]
    if continue_final and parts:
        parts[-1] = parts[-1][:-1]
    if add_generation_prompt:
        parts.append("<|assistant|>\n")
    return "".join(parts)
