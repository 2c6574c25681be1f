"""How long one engine iteration takes, built from the operators of one decoder layer.

An iteration runs every scheduled token (prefill chunks and one token per decoding sequence) through the
model once. Its time is

    layers x (non-attention operators(T) + per-layer overhead + 2 all-reduces(T))
    + embedding(T) + LM head(S) + S x per-sequence overhead
    + layers x attention

for T tokens in S sequences. The non-attention operators (QKV, output and MLP GEMMs, norms, rotary
embedding, activation, residual add) are rooflines with fitted efficiency curves (model/operators.py),
fitted on Vidur's public A100 and A40 profiles. Attention, which those profiles do not cover, is the max
of its FLOPs (query-key pairs, causal mask included) at a fitted share of the tensor peak and the KV
bytes every sequence reads at a fitted share of the HBM bandwidth. The all-reduce comes from the
interconnect, fitted on Vidur's collective profiles; the overheads and attention efficiencies on
end-to-end A100 prefill and decode times. None of the parameters depends on the GPU
(scripts/calibrate_cost_model.py fits them, data/calibration.yaml ships them), so the model predicts a
GPU it never saw from its catalog entry alone.

The simulator calls this in its inner loop, so everything that depends only on T or S is computed once
per engine and kept (bounded), and an iteration costs two dictionary lookups and a few multiplications.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

from fleetserve.errors import InputError
from fleetserve.model.catalog import BF16_BYTES, GpuSpec, ModelSpec
from fleetserve.model.operators import (
    ALLREDUCES_PER_LAYER,
    LayerShapes,
    all_reduce_time,
    embedding_time,
    layer_operator_times,
    lm_head_time,
)
from fleetserve.model.params import CostParams, default_cost_params

# the shape capacity_tokens_per_s is measured at: a full decode batch at a typical chat context
REFERENCE_BATCH = 64
REFERENCE_CONTEXT = 1024
REFERENCE_MEMORY_UTILIZATION = 0.9
# Seconds from process start to serving, weights aside: CUDA initialisation, KV-cache allocation and
# CUDA-graph capture. An ASSUMPTION of the order vLLM's start-up logs show on one GPU (tens of seconds),
# overridable per engine group with the fleet file's `cold_start_s`.
ENGINE_START_S = 20.0
# per-engine memo of token- and sequence-count costs: a batch never exceeds this in practice, and beyond
# it costs are computed each time rather than kept, so memory stays bounded
MEMO_LIMIT = 1 << 16


class UnsupportedParallelism(InputError):
    """A tensor-parallel degree the model cannot be split by."""


@dataclass(frozen=True)
class PrefillBreakdown:
    """Where a prefill iteration's time goes, seconds. Per decoder layer: `operators` (by name),
    `attention`, `all_reduce`; once per iteration: `embedding`, `lm_head`, `overhead` (host-side)."""

    layers: int
    operators: dict[str, float]
    attention: float
    all_reduce: float
    embedding: float
    lm_head: float
    overhead: float

    @property
    def layer_non_attention(self) -> float:
        return sum(self.operators.values())

    @property
    def total(self) -> float:
        layer = self.layer_non_attention + self.attention + self.all_reduce
        return self.layers * layer + self.embedding + self.lm_head + self.overhead


class CostModel:
    """Iteration times of one engine: `model` on `tp` GPUs of type `gpu`. All times are seconds."""

    def __init__(self, gpu: GpuSpec, model: ModelSpec, tp: int = 1, params: CostParams | None = None) -> None:
        if tp < 1:
            raise UnsupportedParallelism(f"tensor-parallel degree must be >= 1, got {tp}")
        if model.heads % tp != 0:
            raise UnsupportedParallelism(
                f"{model.name} has {model.heads} attention heads, which tp={tp} does not divide evenly"
            )
        self.gpu = gpu
        self.model = model
        self.tp = tp
        self.params = params if params is not None else default_cost_params()
        p = self.params
        self._shapes = LayerShapes.of(model, tp)
        self._weight_bytes_per_gpu = model.weight_bytes / tp
        # K and V of the KV heads this GPU holds (replicated ones included), every layer
        self._kv_bytes_per_token_per_gpu = (
            2 * model.layers * self._shapes.kv_heads_per_gpu * model.head_dim * BF16_BYTES
        )
        # attention over all layers: 4 FLOPs per head dimension per (query, key) pair (QK^T and PV)
        attention_flops_per_pair = 4.0 * model.layers * self._shapes.attention_width
        self._attention_s_per_pair = attention_flops_per_pair / (
            gpu.bf16_tflops * 1e12 * p.attention_compute_efficiency
        )
        self._attention_s_per_kv_token = self._kv_bytes_per_token_per_gpu / (
            gpu.hbm_gbps * 1e9 * p.attention_memory_efficiency
        )
        # engines of one kind share their memo: a fleet of 64 engines in 3 kinds fills 3, not 64
        self._token_memo, self._sequence_memo = _shared_memos(gpu, model, tp, self.params)

    @property
    def kv_bytes_per_token_per_gpu(self) -> float:
        """K and V of one token that one GPU of the engine holds (what migrating the token moves over
        that GPU's link)."""
        return self._kv_bytes_per_token_per_gpu

    def cold_start_s(self, engine_start_s: float = ENGINE_START_S) -> float:
        """Seconds from starting the engine to serving: its share of the weights read at the GPU's
        `weight_load_gbps`, plus the fixed `engine_start_s`."""
        return self._weight_bytes_per_gpu / (self.gpu.weight_load_gbps * 1e9) + engine_start_s

    def iteration_time(self, prefill: Sequence[tuple[int, int]], decode: Sequence[int]) -> float:
        """One iteration that runs `prefill` chunks, each (chunk_tokens, context_tokens_before_chunk),
        and one token for each decoding sequence, given by its context length."""
        return self.batch_time(prefill, len(decode), sum(decode))

    def batch_time(self, prefill: Sequence[tuple[int, int]], num_decode: int, decode_context: int) -> float:
        """`iteration_time` with the decoding sequences given by their count and the sum of their context
        lengths, which is all the time depends on (the engine keeps only these two)."""
        tokens = num_decode
        sequences = num_decode + len(prefill)
        attended = 0
        kv_read = 0
        for chunk, before in prefill:
            tokens += chunk
            # token i of the chunk attends to the `before` cached tokens and to i+1 tokens of the chunk
            attended += chunk * before + chunk * (chunk + 1) // 2
            kv_read += before + chunk
        return self._time(sequences, tokens, attended + decode_context, kv_read + decode_context)

    def decode_time(self, num_seqs: int, total_context: int) -> float:
        """A pure-decode iteration of `num_seqs` sequences whose context lengths sum to `total_context`;
        equal to `iteration_time([], contexts)` for any such contexts."""
        return self._time(num_seqs, num_seqs, total_context, total_context)

    def decode_run(
        self, num_seqs: int, total_context: int, end: float, horizon: float, limit: int
    ) -> tuple[int, float, float]:
        """Follow a run of pure-decode iterations of `num_seqs` sequences: the one in flight ends at `end`
        and has `total_context` tokens of context; each next one starts when the previous ends and has
        `num_seqs` more. Counts the iterations that end by `horizon`, at most `limit`, each followed by the
        next one; returns (count, start, end) of the iteration in flight after them.

        Equivalent to summing `decode_time` iteration by iteration, and bit-identical to it: the loop
        evaluates `_time`'s expressions in the same order (so skipping ahead gives exactly the times
        stepping does), with what does not change along the run hoisted out. That keeps the simulator's
        skip-ahead cheap, a few hundred nanoseconds per skipped iteration."""
        token_s = self._token_memo.get(num_seqs) or self._token_cost(num_seqs)
        fixed = token_s + (self._sequence_memo.get(num_seqs) or self._sequence_cost(num_seqs))
        per_pair = self._attention_s_per_pair
        per_kv_token = self._attention_s_per_kv_token
        start = end
        count = 0
        while count < limit and end <= horizon:
            count += 1
            total_context += num_seqs
            start = end
            compute_s = total_context * per_pair
            memory_s = total_context * per_kv_token
            # max() without the call; equal values are the same float either way
            end += fixed + (compute_s if compute_s > memory_s else memory_s)
        return count, start, end

    def prefill_time(self, prompt_len: int, batch: int = 1) -> float:
        """Prefill of `batch` prompts of `prompt_len` tokens each, in one iteration, with no cached prefix."""
        return self.iteration_time([(prompt_len, 0)] * batch, [])

    def decode_step_time(self, context_len: int, batch: int = 1) -> float:
        """One decode iteration of `batch` sequences that each have `context_len` tokens of context."""
        return self.decode_time(batch, context_len * batch)

    def num_kv_blocks(self, block_size: int, gpu_memory_utilization: float) -> int:
        """KV-cache blocks of `block_size` tokens that fit on each GPU next to its share of the weights;
        0 when the weights alone exceed the memory the engine may use."""
        usable = self.gpu.memory_gb * 1e9 * gpu_memory_utilization - self._weight_bytes_per_gpu
        if usable <= 0:
            return 0
        return int(usable // (block_size * self._kv_bytes_per_token_per_gpu))

    @property
    def capacity_tokens_per_s(self) -> float:
        """Decode tokens per second of a full reference batch (up to 64 sequences at 1024 tokens of
        context, fewer if the KV cache holds fewer): a yardstick to compare load across GPU types."""
        kv_tokens = self.num_kv_blocks(1, REFERENCE_MEMORY_UTILIZATION)
        batch = max(1, min(REFERENCE_BATCH, kv_tokens // REFERENCE_CONTEXT))
        return batch / self.decode_step_time(REFERENCE_CONTEXT, batch)

    def lora_load_time(self, adapter_bytes: int) -> float:
        """Copying an adapter from host memory to the GPUs; each GPU receives its 1/tp shard in parallel."""
        link_bytes_per_s = self.gpu.host_link_gbps * 1e9 * self.params.host_link_efficiency
        return adapter_bytes / self.tp / link_bytes_per_s

    def prefill_breakdown(self, prompt_len: int, batch: int = 1) -> PrefillBreakdown:
        """`prefill_time`'s parts: what each operator of one layer, attention and the all-reduces take."""
        tokens = prompt_len * batch
        pairs = batch * (prompt_len * (prompt_len + 1) // 2)
        attention = self._attention(pairs, tokens) / self.model.layers
        shapes, gpu, p = self._shapes, self.gpu, self.params
        return PrefillBreakdown(
            layers=self.model.layers,
            operators=layer_operator_times(shapes, tokens, gpu, p),
            attention=attention,
            all_reduce=ALLREDUCES_PER_LAYER * self._all_reduce_s(tokens),
            embedding=embedding_time(shapes, tokens, gpu, p),
            lm_head=lm_head_time(shapes, batch, gpu, p),
            overhead=self.model.layers * p.layer_overhead_s + batch * p.sequence_overhead_s,
        )

    def _time(self, sequences: int, tokens: int, attended_pairs: int, kv_tokens_read: int) -> float:
        # decode_run repeats these expressions for a run of decode iterations: keep the two in step
        if tokens == 0:
            return 0.0
        # memo hits without a call: this runs once per simulated iteration (costs are never 0, so `or`
        # falls through only on a miss)
        token_s = self._token_memo.get(tokens) or self._token_cost(tokens)
        fixed = token_s + (self._sequence_memo.get(sequences) or self._sequence_cost(sequences))
        compute_s = attended_pairs * self._attention_s_per_pair
        memory_s = kv_tokens_read * self._attention_s_per_kv_token
        return fixed + max(compute_s, memory_s)

    def _attention(self, attended_pairs: int, kv_tokens_read: int) -> float:
        return max(
            attended_pairs * self._attention_s_per_pair, kv_tokens_read * self._attention_s_per_kv_token
        )

    def _token_cost(self, tokens: int) -> float:
        """Everything an iteration of `tokens` tokens costs that does not depend on its sequences;
        computed on a memo miss and kept while the memo has room."""
        shapes, gpu, p = self._shapes, self.gpu, self.params
        layer = sum(layer_operator_times(shapes, tokens, gpu, p).values())
        layer += p.layer_overhead_s + ALLREDUCES_PER_LAYER * self._all_reduce_s(tokens)
        cost = self.model.layers * layer + embedding_time(shapes, tokens, gpu, p)
        if len(self._token_memo) < MEMO_LIMIT:
            self._token_memo[tokens] = cost
        return cost

    def _sequence_cost(self, sequences: int) -> float:
        """The LM head over each sequence's last position, and host-side work per sequence; computed on
        a memo miss and kept while the memo has room."""
        cost = lm_head_time(self._shapes, sequences, self.gpu, self.params)
        cost += sequences * self.params.sequence_overhead_s
        if len(self._sequence_memo) < MEMO_LIMIT:
            self._sequence_memo[sequences] = cost
        return cost

    def _all_reduce_s(self, tokens: int) -> float:
        return all_reduce_time(tokens * self.model.hidden_size * BF16_BYTES, self.tp, self.gpu, self.params)


@cache
def _shared_memos(
    gpu: GpuSpec, model: ModelSpec, tp: int, params: CostParams
) -> tuple[dict[int, float], dict[int, float]]:
    """The token-count and sequence-count memos of every CostModel of this kind (pure values of their
    key, so sharing them changes no result)."""
    return {}, {}
