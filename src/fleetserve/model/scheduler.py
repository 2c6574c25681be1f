"""Continuous batching: which requests run in the next iteration and how many tokens each computes.

Modelled on vLLM v1's scheduler. Each iteration has a token budget (`max_num_batched_tokens`) and a
sequence cap (`max_num_seqs`). Running requests are served first: every decoding request computes one
token, then requests still in prefill get chunks of what is left of the budget. Waiting requests are
admitted after that, in FCFS or (priority, arrival) order, each with the largest chunk that fits, after
a prefix-cache lookup. When blocks run out the most recently admitted request (under the priority policy:
the lowest-priority one) is preempted: its blocks are freed and it goes back to the front of the queue to
be recomputed, as vLLM's recompute preemption does.

The scheduler decides *what* runs. Which blocks hold the KV is the KV cache manager's business, adapter
slots are the LoRA manager's, and time is the engine's: the scheduler only counts iterations.

Decoding requests are not touched one by one. They form a `DecodeSet` whose members' token counts are
derived from an iteration counter (`clock`), so an iteration costs O(requests that start or stop) and a
run of identical decode iterations can be skipped in O(1) (`quiet_iterations` / `skip`). Block growth
needs no per-request work either: a decoding request needs a new block exactly when its computed-token
count crosses a multiple of the block size, so members are bucketed by that phase.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields
from typing import Any, Literal

from fleetserve.errors import InputError, InternalError
from fleetserve.model.kvcache import KVCacheManager, hash_prompt_blocks
from fleetserve.model.lora import LoraManager
from fleetserve.model.types import EngineRequest

WAITING, RUNNING, FINISHED = 0, 1, 2


@dataclass(frozen=True)
class SchedulerConfig:
    """Engine-side knobs, with the field names of `fleetserve.config.EngineArgs` (and of vLLM)."""

    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    scheduling_policy: Literal["fcfs", "priority"] = "fcfs"
    max_loras: int = 4
    max_cpu_loras: int = 16
    max_lora_rank: int = 16

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.max_num_seqs < 1:
            raise InputError("block_size and max_num_seqs must be >= 1")
        if self.max_num_batched_tokens < self.max_num_seqs:
            # as in vLLM: every running sequence must be able to decode in the same iteration
            raise InputError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                f"max_num_seqs ({self.max_num_seqs})"
            )
        if self.scheduling_policy not in ("fcfs", "priority"):
            raise InputError(f"unknown scheduling_policy {self.scheduling_policy!r} (fcfs or priority)")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise InputError("gpu_memory_utilization must be in (0, 1]")

    @classmethod
    def from_args(cls, args: Any) -> SchedulerConfig:
        """From `fleetserve.config.EngineArgs` or any object with these attributes."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class Seq:
    """A request's scheduling state. While decoding, `num_computed` and `num_output` are the values at
    `decode_clock0`; the DecodeSet adds the iterations since."""

    __slots__ = (
        "adapter",
        "arrival",
        "block_hashes",
        "cached_hashes",
        "decode_clock0",
        "first_token_time",
        "imported",
        "in_decode",
        "num_blocks",
        "num_cached_prompt_tokens",
        "num_committed",
        "num_computed",
        "num_output",
        "num_reported",
        "order",
        "output_len",
        "phase",
        "priority",
        "prompt_len",
        "request",
        "request_id",
        "status",
        "unique",
        "unreported_since",
        "version",
    )

    def __init__(self, request: EngineRequest, order: int, block_hashes: list[int], unique: bool) -> None:
        self.request = request
        self.request_id = request.request_id
        self.prompt_len = request.prompt_len
        self.output_len = request.output_len
        self.adapter = request.adapter
        self.priority = request.priority
        self.arrival = request.arrival_time
        self.order = order
        self.block_hashes = block_hashes
        # a unique prompt's computed full blocks are cached without hashes: the first num_committed
        # blocks it holds, counted among its anonymous ones (see kvcache)
        self.unique = unique
        self.imported = request.imported_tokens  # KV that came with a migrated request, until admitted
        self.status = WAITING
        self.num_computed = 0
        self.num_output = 0
        self.num_blocks = 0
        self.cached_hashes: list[int] = []  # cached blocks this request holds a reference on
        self.num_committed = 0  # leading prompt blocks already hit or cached
        self.num_cached_prompt_tokens = 0
        self.in_decode = False
        self.decode_clock0 = 0
        self.phase = 0
        self.version = 0
        # output bookkeeping, kept here so the engine needs no side tables
        self.first_token_time: float | None = None
        self.num_reported = 0
        self.unreported_since: float | None = None

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens (valid when not decoding)."""
        return self.prompt_len + self.num_output

    def sort_key(self) -> tuple[int, float, int]:
        return (self.priority, self.arrival, self.order)


class WaitingQueue:
    """FCFS (a deque; preempted requests go back to the front) or priority order (a heap on
    (priority, arrival, admission order), where preempted requests simply sort back in)."""

    def __init__(self, policy: str) -> None:
        self.priority = policy == "priority"
        self._fifo: deque[Seq] = deque()
        self._heap: list[tuple[tuple[int, float, int], Seq]] = []
        self.num_tokens = 0  # uncomputed tokens of all waiting requests

    def __len__(self) -> int:
        return len(self._heap) if self.priority else len(self._fifo)

    def __bool__(self) -> bool:
        return bool(self._heap) if self.priority else bool(self._fifo)

    def __iter__(self) -> Iterator[Seq]:
        if self.priority:
            return iter(seq for _, seq in sorted(self._heap, key=lambda item: item[0]))
        return iter(self._fifo)

    def peek(self) -> Seq:
        return self._heap[0][1] if self.priority else self._fifo[0]

    def pop(self) -> Seq:
        seq = heapq.heappop(self._heap)[1] if self.priority else self._fifo.popleft()
        self.num_tokens -= seq.num_tokens
        return seq

    def add(self, seq: Seq) -> None:
        self._push(seq, front=False)

    def add_front(self, seq: Seq) -> None:
        self._push(seq, front=True)

    def restore(self, seqs: list[Seq]) -> None:
        """Put back requests popped and skipped in this pass, in their original order."""
        for seq in reversed(seqs):
            self._push(seq, front=True)

    def remove(self, seq: Seq) -> None:
        if self.priority:
            self._heap = [item for item in self._heap if item[1] is not seq]
            heapq.heapify(self._heap)
        else:
            self._fifo.remove(seq)
        self.num_tokens -= seq.num_tokens

    def _push(self, seq: Seq, front: bool) -> None:
        self.num_tokens += seq.num_tokens
        if self.priority:
            heapq.heappush(self._heap, (seq.sort_key(), seq))
        elif front:
            self._fifo.appendleft(seq)
        else:
            self._fifo.append(seq)


class DecodeSet:
    """Requests past prefill, advanced together one token per decode iteration.

    A member that joined at clock c0 with `num_computed` n0 has n0 + (clock - c0) computed tokens. It
    needs a new block in the iteration at clock c when that count is a multiple of the block size, i.e.
    when c is congruent to its phase (c0 - n0) modulo the block size.
    """

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.clock = 0  # decode iterations completed so far
        self.members: dict[str, Seq] = {}
        self.buckets = [0] * block_size  # members per phase
        self._context_base = 0  # sum over members of (n0 - c0 + 1): contexts sum to this + n * clock
        self._finishes: list[tuple[int, int, int, Seq]] = []  # (finish clock, order, version, seq)

    def __len__(self) -> int:
        return len(self.members)

    def computed(self, seq: Seq) -> int:
        return seq.num_computed + self.clock - seq.decode_clock0

    def output(self, seq: Seq) -> int:
        return seq.num_output + self.clock - seq.decode_clock0

    def total_context(self) -> int:
        """Sum of members' context lengths in the next iteration (computed tokens plus the new one)."""
        return self._context_base + len(self.members) * self.clock

    def blocks_needed(self, clock: int) -> int:
        """New blocks the iteration at `clock` needs."""
        return self.buckets[clock % self.block_size]

    def blocks_needed_over(self, first_clock: int, count: int) -> int:
        """New blocks the `count` iterations from `first_clock` need together (members unchanged)."""
        block_size, buckets = self.block_size, self.buckets
        full, rest = divmod(count, block_size)
        total = full * len(self.members)
        if rest:
            # the phases of the last partial cycle: a run of `rest` buckets, wrapping around at the end
            low = first_clock % block_size
            high = low + rest
            total += sum(buckets[low:high])
            if high > block_size:
                total += sum(buckets[: high - block_size])
        return total

    def next_finish_clock(self) -> int | None:
        heap = self._finishes
        while heap:
            finish_clock, _, version, seq = heap[0]
            if seq.in_decode and seq.version == version:
                return finish_clock
            heapq.heappop(heap)
        return None

    def enter(self, seq: Seq) -> None:
        seq.in_decode = True
        seq.decode_clock0 = self.clock
        seq.phase = (self.clock - seq.num_computed) % self.block_size
        self.buckets[seq.phase] += 1
        self._context_base += seq.num_computed - self.clock + 1
        self.members[seq.request_id] = seq
        finish_clock = self.clock + seq.output_len - seq.num_output
        heapq.heappush(self._finishes, (finish_clock, seq.order, seq.version, seq))

    def leave(self, seq: Seq) -> None:
        """Remove a member, writing its derived counts back into it."""
        elapsed = self.clock - seq.decode_clock0
        self.buckets[seq.phase] -= 1
        self._context_base -= seq.num_computed - seq.decode_clock0 + 1
        del self.members[seq.request_id]
        seq.num_computed += elapsed
        seq.num_output += elapsed
        seq.in_decode = False
        seq.version += 1

    def pop_finished(self) -> list[Seq]:
        """Members whose last token was produced by the iteration that just completed (still members:
        the caller removes them)."""
        done = []
        heap, clock = self._finishes, self.clock
        while heap and heap[0][0] <= clock:
            _, _, version, seq = heapq.heappop(heap)
            if seq.in_decode and seq.version == version:  # else superseded: it left the set since
                done.append(seq)
        return done


@dataclass(slots=True, init=False)
class ScheduledBatch:
    """One iteration's work: prefill chunks (request, tokens, tokens computed before) and one token for
    each of `num_decode` decoding requests whose contexts sum to `decode_context`."""

    prefills: list[tuple[Seq, int, int]]
    num_decode: int
    decode_context: int
    preempted: list[Seq]

    def __init__(self) -> None:
        # written out: the generated __init__ calls a factory per list, and there is one batch per iteration
        self.prefills = []
        self.num_decode = 0
        self.decode_context = 0
        self.preempted = []

    @property
    def empty(self) -> bool:
        return not self.prefills and not self.num_decode

    @property
    def pure_decode(self) -> bool:
        return not self.prefills and not self.preempted and self.num_decode > 0


@dataclass(slots=True, init=False)
class Completion:
    """What an iteration produced: `sampled` requests got a token from a finished prefill, every member of
    `decoded` (the decode set after the iteration) and of `finished` got one decode token unless it
    appears in `sampled`; `entered` joined the decode set."""

    sampled: list[Seq]
    finished: list[Seq]
    entered: list[Seq]
    decoded: bool
    decode_clock: int  # the clock value of the decode iteration that completed

    def __init__(self) -> None:
        # written out, as ScheduledBatch's: one per iteration
        self.sampled = []
        self.finished = []
        self.entered = []
        self.decoded = False
        self.decode_clock = 0


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, lora: LoraManager) -> None:
        self.config = config
        self.kv = kv
        self.lora = lora
        self.block_size = config.block_size
        self.waiting = WaitingQueue(config.scheduling_policy)
        self.running: dict[str, Seq] = {}  # admission order: the last one is preempted first
        self.prefilling: dict[str, Seq] = {}  # running requests whose prompt is not computed yet
        self.decode = DecodeSet(config.block_size)
        self.requests: dict[str, Seq] = {}  # every unfinished request
        self.num_preemptions = 0
        self.in_flight: ScheduledBatch | None = None  # the iteration scheduled and not yet completed
        self._decode_block_held = False  # members hold the block of the decode iteration in flight
        self._order = 0
        # quiet_iterations() of the in-flight batch, kept up to date by skip() until anything else changes
        self._quiet_batch: ScheduledBatch | None = None
        self._quiet_left = 0

    # ---- requests in and out ----------------------------------------------------------------------

    def add(self, request: EngineRequest) -> Seq:
        caching = self.kv.enable_prefix_caching
        unique = caching and request.unique_prompt
        hashes = (
            hash_prompt_blocks(request.prompt_token_ids, self.block_size, request.adapter)
            if caching and not unique
            else []
        )
        seq = Seq(request, self._order, hashes, unique)
        self._order += 1
        self.requests[seq.request_id] = seq
        self.waiting.add(seq)
        if seq.adapter is not None:
            self.lora.want(seq.adapter)
        return seq

    def abort(self, request_id: str) -> Seq | None:
        seq = self.requests.get(request_id)
        if seq is None:
            return None
        if seq.status == WAITING:
            self.waiting.remove(seq)
            if seq.adapter is not None:
                self.lora.unwant(seq.adapter)
            del self.requests[request_id]
            seq.status = FINISHED
        else:
            self._finish(seq)
        return seq

    @property
    def has_work(self) -> bool:
        return bool(self.requests)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def blocks_held(self, seq: Seq) -> int:
        if not seq.in_decode:
            return seq.num_blocks
        # a scheduled decode iteration already holds the block for the token it computes
        return cdiv(self.decode.computed(seq) + self._decode_block_held, self.block_size)

    def _release(self, seq: Seq) -> None:
        """Take a running request out of every running structure and free its blocks."""
        self._quiet_batch = None
        held = self.blocks_held(seq)
        if seq.in_decode:
            self.decode.leave(seq)
        else:
            self.prefilling.pop(seq.request_id, None)
        del self.running[seq.request_id]
        unfindable = seq.num_committed if seq.unique else 0
        self.kv.free(seq.cached_hashes, held - len(seq.cached_hashes) - unfindable, unfindable)
        seq.cached_hashes = []
        seq.num_blocks = 0
        seq.num_committed = 0
        if seq.adapter is not None:
            self.lora.release(seq.adapter)

    def _finish(self, seq: Seq) -> None:
        self._release(seq)
        seq.status = FINISHED
        del self.requests[seq.request_id]

    def _preempt(self, seq: Seq) -> None:
        if seq.unique:
            # it will look its prompt up again on readmission: from now on its blocks need identities
            seq.block_hashes = self.kv.private_hashes(seq.prompt_len // self.block_size, seq.num_committed)
            seq.cached_hashes = seq.block_hashes[: seq.num_committed]
            seq.unique = False
        self._release(seq)
        seq.status = WAITING
        seq.num_computed = 0
        self.num_preemptions += 1
        if seq.adapter is not None:
            self.lora.want(seq.adapter)
        self.waiting.add_front(seq)

    def _pick_victim(self) -> Seq:
        if self.config.scheduling_policy == "priority":
            return max(self.running.values(), key=Seq.sort_key)
        return self.running[next(reversed(self.running))]

    # ---- one iteration ----------------------------------------------------------------------------

    def schedule(self, now: float) -> ScheduledBatch:
        """Choose the next iteration's work and allocate its blocks. `now` only dates adapter loads."""
        if self.in_flight is not None:
            raise InternalError("an iteration is already in flight")
        kv, decode, block_size = self.kv, self.decode, self.block_size
        members = decode.members
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens

        # 1. every decoding request computes one token
        while members and not kv.allocate(decode.blocks_needed(decode.clock)):
            self._preempt_one(batch)
        self._decode_block_held = bool(members)
        budget -= len(members)

        # 2. requests in prefill continue, in admission order
        for seq in list(self.prefilling.values()) if self.prefilling else ():
            if budget <= 0:
                break
            if seq.status != RUNNING:
                continue  # preempted a moment ago
            chunk = min(seq.num_tokens - seq.num_computed, budget)
            new_blocks = cdiv(seq.num_computed + chunk, block_size) - seq.num_blocks
            while not kv.allocate(new_blocks):
                victim, refund = self._preempt_one(batch)
                if victim is seq:
                    break
                budget += refund
            if seq.status != RUNNING:
                break
            seq.num_blocks += new_blocks
            batch.prefills.append((seq, chunk, seq.num_computed))
            budget -= chunk

        # 3. admit waiting requests, unless this pass had to preempt
        if not batch.preempted and self.waiting:
            self._admit(batch, budget, now)

        batch.num_decode = len(members)
        batch.decode_context = decode.total_context()
        self.in_flight = batch if batch.prefills or members else None
        return batch

    def _preempt_one(self, batch: ScheduledBatch) -> tuple[Seq, int]:
        """Preempt the next victim and drop its work from the batch; returns it and the budget tokens
        its work had taken (a decoding request's token, or its prefill chunk)."""
        victim = self._pick_victim()
        refund = 1 if victim.in_decode else 0
        for index, (seq, chunk, _) in enumerate(batch.prefills):
            if seq is victim:
                del batch.prefills[index]
                refund = chunk
                break
        self._preempt(victim)
        batch.preempted.append(victim)
        return victim, refund

    def _admit(self, batch: ScheduledBatch, budget: int, now: float) -> None:
        config, kv, waiting, block_size = self.config, self.kv, self.waiting, self.block_size
        skipped: list[Seq] = []
        while waiting and budget > 0 and len(self.running) < config.max_num_seqs:
            seq = waiting.peek()
            if seq.adapter is not None and not self.lora.ready(seq.adapter, now):
                skipped.append(waiting.pop())
                continue
            num_tokens = seq.num_tokens
            hashes = seq.block_hashes  # none for a unique prompt or without prefix caching
            # at least the last token is recomputed: its logits give the next token
            hit_blocks = kv.count_cached_prefix(hashes, (num_tokens - 1) // block_size) if hashes else 0
            computed = hit_blocks * block_size
            if seq.imported > computed:  # its own blocks arrived with it: allocated here, not prefilled
                hit_blocks, computed = 0, min(seq.imported, num_tokens - 1)
            remaining = num_tokens - computed
            if not config.enable_chunked_prefill and remaining > budget:
                break
            chunk = min(remaining, budget)
            touched = hashes[:hit_blocks]
            new_blocks = cdiv(computed + chunk, block_size) - hit_blocks
            if not kv.can_allocate(new_blocks, touched):
                break
            waiting.pop()
            seq.imported = 0  # preempted later, it recomputes like any request
            if touched:
                kv.touch(touched)
            kv.allocate(new_blocks)
            kv.record_lookup(num_tokens, hit_blocks * block_size)
            if seq.num_output == 0:
                seq.num_cached_prompt_tokens = computed
            seq.status = RUNNING
            seq.cached_hashes = list(touched)
            seq.num_committed = hit_blocks
            seq.num_computed = computed
            seq.num_blocks = hit_blocks + new_blocks
            self.running[seq.request_id] = seq
            self.prefilling[seq.request_id] = seq
            if seq.adapter is not None:
                self.lora.unwant(seq.adapter)
                self.lora.acquire(seq.adapter)
            batch.prefills.append((seq, chunk, computed))
            budget -= chunk
        if skipped:
            waiting.restore(skipped)

    def complete(self) -> Completion:
        """Apply the in-flight iteration's results."""
        batch = self.in_flight
        if batch is None:
            raise InternalError("no iteration in flight")
        self.in_flight = None
        self._decode_block_held = False
        done = Completion()
        decode = self.decode
        if batch.num_decode and decode.members:
            done.decoded = True
            done.decode_clock = decode.clock
            decode.clock += 1
            for seq in decode.pop_finished():
                self._finish(seq)
                done.finished.append(seq)
        for seq, chunk, before in batch.prefills:
            if seq.status != RUNNING:
                continue  # aborted while the iteration ran
            seq.num_computed = before + chunk
            self._cache_full_blocks(seq)
            if seq.num_computed < seq.num_tokens:
                continue
            del self.prefilling[seq.request_id]
            seq.num_output += 1
            done.sampled.append(seq)
            if seq.num_output >= seq.output_len:
                self._finish(seq)
                done.finished.append(seq)
            else:
                decode.enter(seq)
                done.entered.append(seq)
        return done

    def _cache_full_blocks(self, seq: Seq) -> None:
        full = min(seq.num_computed, seq.prompt_len) // self.block_size
        start = seq.num_committed
        if full <= start:
            return
        seq.num_committed = full
        if seq.unique or not seq.block_hashes:  # a unique prompt, or prefix caching is off
            return
        block_size = self.block_size
        hashes = seq.block_hashes[start:full]
        parent = seq.block_hashes[start - 1] if start else None
        if seq.request.unique_prompt:  # a preempted unique prompt: private hashes, no tokens, no events
            seq.cached_hashes.extend(self.kv.cache_blocks(hashes, parent, (), seq.adapter, report=False))
            return
        tokens = seq.request.prompt_token_ids[start * block_size : full * block_size]
        seq.cached_hashes.extend(self.kv.cache_blocks(hashes, parent, tokens, seq.adapter))

    # ---- skipping identical decode iterations -----------------------------------------------------

    def quiet_iterations(self) -> int:
        """How many times in a row the in-flight pure-decode iteration can complete and be followed by an
        identical one: no request finishes and the blocks the followers need are free. (Admission stays
        impossible: the pass that built a pure-decode batch admitted nothing, and nothing it waited on
        improves while the batch is unchanged, except adapter loads, which the engine bounds by time.)"""
        batch, decode = self.in_flight, self.decode
        if batch is None:
            return 0
        if batch is self._quiet_batch:
            # a skip that stopped short leaves the rest of the run: nothing else touched blocks or members
            return self._quiet_left
        if not batch.pure_decode:
            return 0
        finish_clock = decode.next_finish_clock()
        # completing the in-flight iteration moves the clock to clock+1; none of the completions may
        # reach a finish clock
        limit = (finish_clock - decode.clock - 1) if finish_clock is not None else 1 << 62
        if limit <= 0:
            return 0
        free, n, block_size = self.kv.num_free_blocks, len(decode.members), self.block_size
        first = decode.clock + 1
        # each whole cycle of block_size iterations needs one block per member; walk the last cycle
        count = min(limit, (free // n) * block_size)
        needed = (count // block_size) * n
        while count < limit:
            needed += decode.buckets[(first + count) % block_size]
            if needed > free:
                break
            count += 1
        self._quiet_batch, self._quiet_left = batch, count
        return count

    def skip(self, count: int) -> None:
        """Complete `count` quiet iterations at once and put the next identical one in flight."""
        decode = self.decode
        first = decode.clock + 1
        if not self.kv.allocate(decode.blocks_needed_over(first, count)):
            raise InternalError("skip beyond the quiet iterations")
        decode.clock += count
        batch = self.in_flight
        assert batch is not None
        batch.decode_context = decode.total_context()
        if batch is self._quiet_batch:
            self._quiet_left -= count

    def decoding(self) -> Iterable[Seq]:
        return self.decode.members.values()
