"""Prompt tokens made only when someone reads them.

The simulator hands every request's prompt to the routing policy and the engine model, but most never
look at the tokens: load-only policies read nothing, and the engine model needs only the count of a
prompt that shares no block with another (`EngineRequest.unique_prompt`). Expanding the tokens costs
more than routing the request, so they are expanded on first read, once, and shared by every reader.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import overload

from fleetserve.workload import TraceRequest, prompt_token_ids


class LazyPromptTokens(Sequence[int]):
    """The tokens `workload.prompt_token_ids` gives the request, as a list of Python ints (which the
    engine hashes much faster than numpy scalars), computed on first access. `len` needs no tokens."""

    __slots__ = ("_index", "_request", "_seed", "_tokens", "_vocab_size")

    def __init__(self, request: TraceRequest, vocab_size: int, index: int, seed: int) -> None:
        self._request = request
        self._vocab_size = vocab_size
        self._index = index
        self._seed = seed
        self._tokens: list[int] | None = None

    @property
    def tokens(self) -> list[int]:
        if self._tokens is None:
            array = prompt_token_ids(self._request, self._vocab_size, index=self._index, seed=self._seed)
            self._tokens = array.tolist()
        return self._tokens

    def __len__(self) -> int:
        return self._request.input_length

    @overload
    def __getitem__(self, index: int) -> int: ...

    @overload
    def __getitem__(self, index: slice) -> list[int]: ...

    def __getitem__(self, index: int | slice) -> int | list[int]:
        return self.tokens[index]

    def __iter__(self) -> Iterator[int]:
        return iter(self.tokens)
