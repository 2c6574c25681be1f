"""The data that crosses the engine model's boundary: requests in, token outputs and KV events out.

Times are seconds on whatever clock the caller drives the model with.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

FinishReason = Literal["length", "stop", "abort", "error"]


@dataclass
class EngineRequest:
    """A request as the engine sees it. The engine generates exactly `output_len` tokens unless aborted;
    the caller decides that length (the emulator from max_tokens/stop/eos, the simulator from the trace)."""

    request_id: str
    prompt_token_ids: Sequence[int]
    output_len: int
    arrival_time: float
    adapter: str | None = None
    priority: int = 0  # lower runs first under the priority policy, as in vLLM
    # The caller's promise that no other request's prompt shares a block with this one (a trace request
    # without hash_ids): the engine then never reads the tokens, only their count, and caches the
    # prompt's blocks without hashing them. Prefix hits and block accounting are as with hashing.
    unique_prompt: bool = False
    # a migrated request's KV arrived with it: this many leading tokens need no prefill (model/migration.py)
    imported_tokens: int = 0

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)


@dataclass(frozen=True, slots=True)
class DecodingRequest:
    """A request in its decode phase: its context so far and the tokens it has left to produce."""

    request_id: str
    context_tokens: int
    tokens_left: int
    movable: bool = True  # live: the gateway can carry its stream to another engine
    priority: int = 0  # the engine's convention (vLLM's): lower is more urgent


@dataclass(frozen=True, slots=True)
class ExportedRequest:
    """What an engine hands over when a request migrates (its KV travels beside it)."""

    request_id: str
    prompt_len: int
    output_done: int
    output_left: int
    adapter: str | None
    priority: int
    arrival: float


class TokenOutput(NamedTuple):
    """Tokens one request produced in a step, in compact form: a skip-ahead over many decode iterations
    reports a count and the first and last token's times instead of one timestamp per token. Stepwise,
    `num_tokens` is 1 and both times are the iteration's end.

    A NamedTuple rather than a frozen dataclass: as immutable, and about three times cheaper to build,
    which counts when the simulator makes two per request (first token, finish) a million times over."""

    request_id: str
    num_tokens: int
    first_token_time: float  # time of the first of these new tokens
    last_token_time: float  # time of the last of these new tokens
    finished: bool = False
    finish_reason: FinishReason | None = None
    num_cached_prompt_tokens: int = 0  # set on the request's first output: prefix-cache hit length


@dataclass(frozen=True)
class BlockStored:
    """vLLM's BlockStored: full blocks that became cached, chained from `parent_block_hash`."""

    block_hashes: tuple[int, ...]
    parent_block_hash: int | None
    token_ids: tuple[int, ...]
    block_size: int
    lora_id: int | None = None
    medium: str | None = "GPU"
    lora_name: str | None = None


@dataclass(frozen=True)
class BlockRemoved:
    block_hashes: tuple[int, ...]
    medium: str | None = "GPU"


@dataclass(frozen=True)
class AllBlocksCleared:
    pass


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass(slots=True)
class StepResult:
    """What happened between the previous step and this one."""

    outputs: list[TokenOutput] = field(default_factory=list)
    kv_events: list[KVEvent] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)
    iterations: int = 0
