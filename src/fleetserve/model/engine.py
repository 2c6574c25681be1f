"""The engine model: one inference engine's iterations in time, driven by whoever owns the clock.

`EngineModel` wires a `Scheduler` (what runs), a `KVCacheManager` (which blocks) and a `LoraManager`
(which adapters) to a `CostModel` (how long an iteration takes). It keeps at most one iteration in
flight: `step(now)` completes the iteration that ended by `now`, stamping its tokens with the end time,
and starts the next one at `now`. `advance(until)` does the same for every iteration ending by `until`
but skips runs of identical decode iterations in one move, which is what lets the simulator replay
millions of requests.

Outputs are compact `TokenOutput`s. With `report_every_token` (the emulator's need: it streams) every
request that got tokens appears in every step; without it (the simulator's) a request appears when its
first token is out and when it finishes, which keeps a step O(requests that start or stop).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fleetserve.errors import InputError
from fleetserve.model.kvcache import KVCacheManager
from fleetserve.model.lora import LoraManager
from fleetserve.model.scheduler import (
    FINISHED,
    Completion,
    ScheduledBatch,
    Scheduler,
    SchedulerConfig,
    Seq,
    cdiv,
)
from fleetserve.model.types import (
    DecodingRequest,
    EngineRequest,
    ExportedRequest,
    StepResult,
    TokenOutput,
)

if TYPE_CHECKING:
    from fleetserve.model.catalog import Catalog
    from fleetserve.model.cost import CostModel

# LoRA targets of a typical adapter: the four attention projections of every layer
_LORA_TARGETS_PER_LAYER = 4
_BF16_BYTES = 2


class RequestRejected(InputError):
    """A request the engine can never serve; the message says why."""


@dataclass(frozen=True)
class EngineMetrics:
    num_running: int
    num_waiting: int
    kv_usage: float  # fraction of KV blocks in use, 0..1
    num_gpu_blocks: int
    block_size: int
    prefix_cache_queries: int  # tokens looked up
    prefix_cache_hits: int  # tokens found
    num_preemptions: int
    running_lora_adapters: tuple[str, ...]
    waiting_lora_adapters: tuple[str, ...]
    max_loras: int


class EngineModel:
    def __init__(
        self,
        cost: CostModel,
        config: SchedulerConfig | None = None,
        *,
        num_gpu_blocks: int | None = None,
        report_every_token: bool = True,
        enable_kv_events: bool = True,
    ) -> None:
        self.cost = cost
        self.config = config = config if config is not None else SchedulerConfig()
        if num_gpu_blocks is None:
            num_gpu_blocks = cost.num_kv_blocks(config.block_size, config.gpu_memory_utilization)
        if num_gpu_blocks < 1:
            raise InputError(
                f"{cost.model.name} does not fit on {cost.tp} x {cost.gpu.name} at "
                f"gpu_memory_utilization={config.gpu_memory_utilization}: no memory left for the KV cache"
            )
        self.kv = KVCacheManager(
            num_gpu_blocks, config.block_size, config.enable_prefix_caching, enable_kv_events
        )
        model = cost.model
        # rank-r A and B matrices on each target: 2 * hidden * r parameters
        adapter_params = _LORA_TARGETS_PER_LAYER * model.layers * 2 * model.hidden_size * config.max_lora_rank
        adapter_bytes = adapter_params * _BF16_BYTES
        self.lora = LoraManager(config.max_loras, config.max_cpu_loras, cost.lora_load_time, adapter_bytes)
        self.scheduler = Scheduler(config, self.kv, self.lora)
        self.report_every_token = report_every_token
        # fixed for the engine's life; kept as plain attributes for the per-iteration paths
        self._lora_enabled = self.lora.enabled
        self._kv_events = enable_kv_events
        self._batch_start = 0.0
        self._batch_end = 0.0
        # when something changed (a request arrived, an adapter was loaded) while nothing was in flight
        self._poked_at: float | None = None
        self._changed = False  # something changed since the iteration in flight was scheduled
        # quiet mode: requests whose next token opens an unreported run, by the decode clock producing it
        self._awaiting_stamp: dict[int, list[Seq]] = {}

    @classmethod
    def build(
        cls,
        gpu: str,
        model: str,
        tp: int = 1,
        config: SchedulerConfig | None = None,
        catalog: Catalog | None = None,
        **options: bool,
    ) -> EngineModel:
        from fleetserve.model.catalog import default_catalog
        from fleetserve.model.cost import CostModel

        catalog = catalog if catalog is not None else default_catalog()
        return cls(CostModel(catalog.gpu(gpu), catalog.model(model), tp), config, **options)

    # ---- requests ---------------------------------------------------------------------------------

    def add_request(self, request: EngineRequest, now: float) -> None:
        self._check(request)
        self.scheduler.add(request)
        self._poke(now)

    def abort_request(self, request_id: str, now: float) -> None:
        if self.scheduler.abort(request_id) is not None:
            self._poke(now)

    # ---- migration (model/migration.py has how long the KV copy takes) ----------------------------

    def decoding(self) -> list[DecodingRequest]:
        """Requests past their prefill, as of the last iteration advanced to: what may migrate."""
        decode = self.scheduler.decode
        out = []
        for seq in decode.members.values():
            done = decode.output(seq)
            out.append(
                DecodingRequest(
                    seq.request_id, seq.prompt_len + done, seq.output_len - done, priority=seq.priority
                )
            )
        return out

    def export_request(
        self, request_id: str, now: float, result: StepResult | None = None
    ) -> ExportedRequest | None:
        """Take a decoding request off this engine (its blocks freed) to go on elsewhere; None when it
        is not decoding here (it finished, or was preempted back to the queue). Tokens it produced and
        this engine has not reported yet (quiet mode) are reported into `result` first."""
        scheduler = self.scheduler
        seq = scheduler.requests.get(request_id)
        if seq is None or not seq.in_decode:
            return None
        done = scheduler.decode.output(seq)  # the iteration in flight, if any, is not counted
        if done >= seq.output_len:
            return None
        unreported = done - seq.num_reported
        if unreported > 0:
            assert result is not None, "a quiet engine exports into a StepResult"
            last = self._batch_start if scheduler.in_flight is not None else now
            first = seq.unreported_since if seq.unreported_since is not None else last
            result.outputs.append(TokenOutput(request_id, unreported, first, last))
            seq.num_reported = done
        exported = ExportedRequest(
            request_id, seq.prompt_len, done, seq.output_len - done, seq.adapter, seq.priority, seq.arrival
        )
        scheduler.abort(request_id)
        self._poke(now)
        return exported

    def import_request(self, exported: ExportedRequest, now: float, *, with_kv: bool) -> None:
        """Go on with a request another engine exported: its context arrives as KV (`with_kv`: only the
        last token is computed again) or is prefilled here (recompute). Its blocks are its own: an
        imported context is not matched against this engine's prefix cache."""
        context = exported.prompt_len + exported.output_done
        request = EngineRequest(
            exported.request_id,
            range(context),  # unique_prompt: the engine reads the context's length only
            exported.output_left,
            now,
            exported.adapter,
            exported.priority,
            unique_prompt=True,
            imported_tokens=context - 1 if with_kv else 0,
        )
        self.add_request(request, now)

    def can_hold(self, context_tokens: int) -> bool:
        """Whether free blocks could take a context of this many tokens now."""
        return self.kv.can_allocate(cdiv(context_tokens, self.kv.block_size))

    def _check(self, request: EngineRequest) -> None:
        config, model = self.config, self.cost.model
        prompt_len, output_len = request.prompt_len, request.output_len
        if request.request_id in self.scheduler.requests:
            raise RequestRejected(f"request id {request.request_id!r} is already in use")
        if prompt_len < 1 or output_len < 1:
            raise RequestRejected("a request needs at least one prompt token and one output token")
        if prompt_len + output_len > model.max_context:
            raise RequestRejected(
                f"prompt ({prompt_len} tokens) plus output ({output_len} tokens) exceeds the maximum "
                f"context length of {model.name} ({model.max_context} tokens)"
            )
        # the last output token is sampled, never computed, so it needs no KV
        kv_tokens = prompt_len + output_len - 1
        if cdiv(kv_tokens, config.block_size) > self.kv.num_blocks:
            raise RequestRejected(
                f"{kv_tokens} tokens of KV never fit in this engine's KV cache "
                f"({self.kv.num_blocks * config.block_size} tokens)"
            )
        if not config.enable_chunked_prefill and kv_tokens > config.max_num_batched_tokens:
            raise RequestRejected(
                f"without chunked prefill a request of {kv_tokens} tokens exceeds the iteration budget "
                f"of {config.max_num_batched_tokens} tokens"
            )
        if request.adapter is not None and not self.lora.enabled:
            raise RequestRejected(f"adapter {request.adapter!r} requested but LoRA is disabled (max_loras=0)")

    # ---- adapters ---------------------------------------------------------------------------------

    def load_adapter(self, name: str, now: float, size_bytes: int | None = None) -> None:
        if not self.lora.enabled:
            raise InputError("LoRA is disabled on this engine (max_loras=0)")
        self.lora.register(name, size_bytes)
        self._poke(now)

    def unload_adapter(self, name: str) -> None:
        self.lora.unregister(name)

    @property
    def adapters(self) -> list[str]:
        return self.lora.names

    # ---- time -------------------------------------------------------------------------------------

    def _poke(self, now: float) -> None:
        self._changed = True
        if self.scheduler.in_flight is None:
            self._poked_at = now if self._poked_at is None else min(self._poked_at, now)

    def next_event_time(self) -> float | None:
        if self.scheduler.in_flight is not None:
            return self._batch_end
        if self._poked_at is not None:
            return self._poked_at
        if self.scheduler.has_work:
            return self.lora.next_load_completion()
        return None

    @property
    def idle(self) -> bool:
        return not self.scheduler.has_work

    def step(self, now: float) -> StepResult:
        result = StepResult()
        if self.scheduler.in_flight is not None and now < self._batch_end:
            return result
        self._step_into(now, result)
        return result

    def advance(self, until: float, result: StepResult | None = None) -> StepResult:
        """Complete every iteration that ends by `until`, starting the next one each time; adds what
        happened to `result` when given (the simulator recycles one), else to a new StepResult."""
        if result is None:
            result = StepResult()
        scheduler = self.scheduler
        while True:
            # next_event_time(), inlined: this loop runs for every touch of every simulated engine
            batch = scheduler.in_flight
            if batch is not None:
                when = self._batch_end
            elif self._poked_at is not None:
                when = self._poked_at
            elif scheduler.requests:
                when = self.lora.next_load_completion()
                if when is None:
                    break
            else:
                break
            if when > until:
                break
            if (
                batch is not None
                and not self._changed
                and not batch.prefills
                and not batch.preempted
                and self._skip_quiet_run(until, result)
            ):
                continue
            self._step_into(when, result)
        return result

    def _step_into(self, now: float, result: StepResult) -> None:
        """step(now) at an event time, adding what happened to `result`."""
        scheduler = self.scheduler
        if scheduler.in_flight is not None:
            done = scheduler.complete()
            result.iterations += 1
            self._report(done, self._batch_end, result)
        self._start(now, result)
        if self._kv_events and self.kv.has_events:
            result.kv_events.extend(self.kv.take_events())

    def _start(self, now: float, result: StepResult) -> None:
        self._poked_at = None
        self._changed = False
        scheduler = self.scheduler
        if not scheduler.requests:
            return
        lora = self.lora
        if self._lora_enabled and lora.next_load_completion() is not None:  # loads in progress
            lora.complete_loads(now)
        batch = scheduler.schedule(now)
        if batch.preempted:
            result.preempted.extend(seq.request_id for seq in batch.preempted)
        if scheduler.in_flight is None:  # nothing to run
            return
        self._batch_start = now
        self._batch_end = now + self._iteration_time(batch)

    def _iteration_time(self, batch: ScheduledBatch) -> float:
        n, context = batch.num_decode, batch.decode_context
        if not batch.prefills:
            return self.cost.decode_time(n, context)
        return self.cost.batch_time([(chunk, before) for _, chunk, before in batch.prefills], n, context)

    def _report(self, done: Completion, end: float, result: StepResult) -> None:
        outputs = result.outputs
        # requests that sampled a token at the end of their prefill report it below, not as a decode token
        sampled = done.sampled
        if done.decoded:
            if self.report_every_token:
                sampled_ids = {seq.request_id for seq in sampled}
                for seq in self.scheduler.decoding():
                    if seq.request_id not in sampled_ids:
                        outputs.append(TokenOutput(seq.request_id, 1, end, end))
                        seq.num_reported += 1
            elif self._awaiting_stamp:
                self._stamp(done.decode_clock, end)
        for seq in done.finished:
            if seq not in sampled:  # a few at most; Seq compares by identity
                outputs.append(self._final_output(seq, end))
        for seq in sampled:
            if (output := self._sampled_output(seq, end)) is not None:
                outputs.append(output)
        if done.entered and not self.report_every_token:
            awaiting = self._awaiting_stamp
            for seq in done.entered:
                awaiting.setdefault(seq.decode_clock0, []).append(seq)

    def _stamp(self, clock: int, end: float) -> None:
        """Quiet mode: date the first unreported token of requests whose run opened at `clock`."""
        for seq in self._awaiting_stamp.pop(clock, ()):
            if seq.in_decode and seq.decode_clock0 == clock and seq.unreported_since is None:
                seq.unreported_since = end

    def _sampled_output(self, seq: Seq, end: float) -> TokenOutput | None:
        """The token a request sampled at the end of its prefill (its first, or one after a preemption)."""
        finished = seq.status == FINISHED
        if seq.first_token_time is None:
            seq.first_token_time = end
            seq.num_reported = seq.num_output
            return TokenOutput(
                seq.request_id,
                1,
                end,
                end,
                finished,
                "length" if finished else None,
                seq.num_cached_prompt_tokens,
            )
        if self.report_every_token:
            seq.num_reported = seq.num_output
            return TokenOutput(seq.request_id, 1, end, end, finished, "length" if finished else None)
        if seq.unreported_since is None:
            seq.unreported_since = end
        return self._final_output(seq, end) if finished else None

    def _final_output(self, seq: Seq, end: float) -> TokenOutput:
        count = seq.num_output - seq.num_reported
        first = end if self.report_every_token or seq.unreported_since is None else seq.unreported_since
        seq.num_reported = seq.num_output
        return TokenOutput(seq.request_id, count, first, end, True, "length")

    def _skip_quiet_run(self, until: float, result: StepResult) -> bool:
        """Complete a run of identical decode iterations ending by `until` in one move; the caller checked
        that the iteration in flight is pure decode and nothing changed since it was scheduled. Returns
        False when the next event needs a real step."""
        scheduler = self.scheduler
        limit = scheduler.quiet_iterations()
        if limit == 0:
            return False
        horizon = until
        if self._lora_enabled and (load_done := self.lora.next_load_completion()) is not None:
            horizon = min(until, math.nextafter(load_done, -math.inf))
        batch = scheduler.in_flight
        assert batch is not None
        first_end = self._batch_end
        count, start, end = self.cost.decode_run(
            batch.num_decode, batch.decode_context, first_end, horizon, limit
        )
        if count == 0:
            return False
        clock = scheduler.decode.clock
        scheduler.skip(count)
        self._batch_start, self._batch_end = start, end
        result.iterations += count
        if self.report_every_token:
            for seq in scheduler.decoding():
                result.outputs.append(TokenOutput(seq.request_id, count, first_end, start))
                seq.num_reported += count
        elif self._awaiting_stamp:
            self._stamp(clock, first_end)
        if self._kv_events and self.kv.has_events:
            result.kv_events.extend(self.kv.take_events())
        return True

    # ---- observation ------------------------------------------------------------------------------

    @property
    def metrics(self) -> EngineMetrics:
        scheduler, kv = self.scheduler, self.kv
        return EngineMetrics(
            num_running=scheduler.num_running,
            num_waiting=len(scheduler.waiting),
            kv_usage=kv.usage,
            num_gpu_blocks=kv.num_blocks,
            block_size=kv.block_size,
            prefix_cache_queries=kv.stats.queries,
            prefix_cache_hits=kv.stats.hits,
            num_preemptions=scheduler.num_preemptions,
            running_lora_adapters=tuple(self.lora.running_names),
            waiting_lora_adapters=tuple(self.lora.waiting_names),
            max_loras=self.config.max_loras,
        )

    def reset_prefix_cache(self) -> bool:
        return self.kv.reset_prefix_cache()

    def predict_ttft(self, prompt_len: int, cached_tokens: int = 0, now: float | None = None) -> float:
        """Time to first token a request arriving now would see: the rest of the iteration in flight,
        then the prompts queued ahead and its own uncached tokens, computed in chunks of what the token
        budget leaves beside the running decode batch, plus, when the engine is full, the wait for the
        first running request to finish."""
        scheduler, config = self.scheduler, self.config
        decode = scheduler.decode
        n = len(decode)
        context = decode.total_context()
        elapsed = 0.0
        if scheduler.in_flight is not None:
            elapsed = self._batch_end - (self._batch_start if now is None else max(now, self._batch_start))
        finish = decode.next_finish_clock()
        if scheduler.num_running >= config.max_num_seqs and finish is not None:
            elapsed += (finish - decode.clock) * self.cost.decode_time(n, context)
        queued = scheduler.waiting.num_tokens + sum(
            seq.num_tokens - seq.num_computed for seq in scheduler.prefilling.values()
        )
        own = max(1, prompt_len - cached_tokens)
        chunk = max(1, config.max_num_batched_tokens - n)
        full_chunks, last = divmod(queued + own, chunk)
        if full_chunks:
            elapsed += full_chunks * self.cost.batch_time([(chunk, 0)], n, context)
        if last:
            elapsed += self.cost.batch_time([(last, min(cached_tokens, prompt_len - 1))], n, context)
        return elapsed
