"""How long one engine iteration takes: a roofline with calibrated efficiencies.

An iteration runs every scheduled token (prefill chunks and one token per decoding sequence) through the
model once. Its time is

    overhead + max(compute, memory) + tensor-parallel communication

compute = FLOPs / (peak TFLOP/s * compute_efficiency), where FLOPs are 2 * params per token for the
linear layers plus 4 * layers * heads * head_dim per (query token, attended token) pair for attention.
memory = bytes / (HBM bandwidth * memory_efficiency), where bytes are the weights (read once per
iteration) plus the KV cache every sequence reads for its context. Weights, FLOPs and KV heads are split
over `tp` GPUs; each layer ends in two all-reduces of the activations over the interconnect.

The efficiencies, the fixed overhead and the per-collective latency do not depend on the GPU: they are
fitted once (scripts/calibrate_cost_model.py) and shipped in data/calibration.yaml, so the model predicts
GPUs it never saw measurements of from their data-sheet numbers alone.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

import yaml

from fleetserve.errors import InputError
from fleetserve.model.catalog import BF16_BYTES, GpuSpec, ModelSpec

# all-reduces per transformer layer: after attention and after the MLP (Megatron-style tensor parallel)
ALLREDUCES_PER_LAYER = 2
# the shape capacity_tokens_per_s is measured at: a full decode batch at a typical chat context
REFERENCE_BATCH = 64
REFERENCE_CONTEXT = 1024
REFERENCE_MEMORY_UTILIZATION = 0.9
# Seconds from process start to serving, weights aside: CUDA initialisation, KV-cache allocation and
# CUDA-graph capture. An ASSUMPTION of the order vLLM's start-up logs show on one GPU (tens of seconds),
# overridable per engine group with the fleet file's `cold_start_s`.
ENGINE_START_S = 20.0


class UnsupportedParallelism(InputError):
    """A tensor-parallel degree the model cannot be split by."""


@dataclass(frozen=True)
class CostParams:
    """The cost model's free parameters. Defaults are round guesses; the shipped calibration replaces
    them with values fitted on measurements (see `CostParams.load`)."""

    compute_efficiency: float = 0.5  # achieved fraction of peak TFLOP/s
    memory_efficiency: float = 0.8  # achieved fraction of peak HBM bandwidth
    interconnect_efficiency: float = 0.5  # achieved fraction of one-direction link bandwidth in all-reduce
    # kernel launches and host-side work of one layer, paid once per layer per iteration whatever the batch
    layer_overhead_s: float = 0.0002
    # host-side work per sequence in the batch (block tables, sampling, detokenisation)
    sequence_overhead_s: float = 0.0001
    collective_latency_s: float = 20e-6  # per ring step of one all-reduce
    # no measurements cover adapter loads: assumed achievable share of the PCIe link
    host_link_efficiency: float = 0.8

    @classmethod
    def load(cls, path: str | Path | None = None) -> CostParams:
        """Parameters from a calibration file (default: the one shipped in the package)."""
        if path is None:
            text = resources.files("fleetserve").joinpath("data", "calibration.yaml").read_text()
        else:
            text = Path(path).read_text()
        document = yaml.safe_load(text) or {}
        values = document.get("params", {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise InputError(f"unknown cost parameter(s): {', '.join(sorted(unknown))}")
        return cls(**{name: float(value) for name, value in values.items()})


@cache
def default_cost_params() -> CostParams:
    """The shipped calibration, read once per process."""
    return CostParams.load()


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
        # per-GPU rates and per-unit costs, precomputed because the simulator calls this in its inner loop
        self._flops_per_s = gpu.bf16_tflops * 1e12 * p.compute_efficiency * tp
        self._bytes_per_s = gpu.hbm_gbps * 1e9 * p.memory_efficiency
        self._linear_flops_per_token = 2.0 * model.params
        self._attention_flops_per_pair = 4.0 * model.layers * model.heads * model.head_dim
        self._overhead_s = model.layers * p.layer_overhead_s
        self._weight_bytes_per_gpu = model.weight_bytes / tp
        self._kv_bytes_per_token_per_gpu = kv_bytes_per_token_per_gpu(model, tp)
        if tp == 1:
            self._comm_fixed_s = 0.0
            self._comm_s_per_token = 0.0
        else:
            collectives = ALLREDUCES_PER_LAYER * model.layers
            link_bytes_per_s = gpu.interconnect_gbps / 2 * 1e9 * p.interconnect_efficiency
            ring_factor = 2 * (tp - 1) / tp  # bytes each GPU sends in a ring all-reduce, per byte reduced
            self._comm_fixed_s = collectives * 2 * (tp - 1) * p.collective_latency_s
            self._comm_s_per_token = (
                collectives * ring_factor * model.hidden_size * BF16_BYTES / link_bytes_per_s
            )

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
        linear_flops = self._linear_flops_per_token * num_seqs
        attention_flops_per_pair = self._attention_flops_per_pair
        flops_per_s = self._flops_per_s
        weight_bytes = self._weight_bytes_per_gpu
        kv_bytes_per_token = self._kv_bytes_per_token_per_gpu
        bytes_per_s = self._bytes_per_s
        comm_s = self._comm_fixed_s + self._comm_s_per_token * num_seqs
        overhead_s = self._overhead_s + self.params.sequence_overhead_s * num_seqs
        start = end
        count = 0
        while count < limit and end <= horizon:
            count += 1
            total_context += num_seqs
            start = end
            compute_s = (linear_flops + attention_flops_per_pair * total_context) / flops_per_s
            memory_s = (weight_bytes + kv_bytes_per_token * total_context) / bytes_per_s
            # max() without the call; equal values are the same float either way
            end += overhead_s + (compute_s if compute_s > memory_s else memory_s) + comm_s
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

    def _time(self, sequences: int, tokens: int, attended_pairs: int, kv_tokens_read: int) -> float:
        # decode_run repeats these expressions for a run of decode iterations: keep the two in step
        if tokens == 0:
            return 0.0
        flops = self._linear_flops_per_token * tokens + self._attention_flops_per_pair * attended_pairs
        compute_s = flops / self._flops_per_s
        memory_bytes = self._weight_bytes_per_gpu + self._kv_bytes_per_token_per_gpu * kv_tokens_read
        memory_s = memory_bytes / self._bytes_per_s
        comm_s = self._comm_fixed_s + self._comm_s_per_token * tokens
        overhead_s = self._overhead_s + self.params.sequence_overhead_s * sequences
        return overhead_s + max(compute_s, memory_s) + comm_s


def kv_bytes_per_token_per_gpu(model: ModelSpec, tp: int) -> float:
    """Each GPU holds the KV heads of its attention heads; with more GPUs than KV heads, vLLM replicates
    KV heads so every GPU still holds at least one."""
    heads_per_gpu = math.ceil(model.kv_heads / tp)
    return 2 * model.layers * heads_per_gpu * model.head_dim * BF16_BYTES
