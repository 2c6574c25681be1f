"""One decoder layer, operator by operator: each a roofline with a fitted efficiency curve.

The operators are the ones Vidur profiles (microsoft/vidur, MIT), in execution order. Per GPU under
tensor parallelism of degree tp, for T tokens in the iteration:

    attn_pre_proj   GEMM  T x hidden -> (heads/tp + 2 * kv_heads_per_gpu) * head_dim   (QKV, grouped-query)
    attn_rope       elementwise over the query and key heads
    attn_post_proj  GEMM  T x heads/tp * head_dim -> hidden
    mlp_up_proj     GEMM  T x hidden -> intermediate/tp (twice that for a gated MLP: gate and up)
    mlp_act         elementwise (SiLU times the gate for a gated MLP)
    mlp_down_proj   GEMM  T x intermediate/tp -> hidden
    input_layernorm, post_attention_layernorm, add   elementwise over T x hidden

A GEMM takes floor + (memory^p + compute^p)^(1/p), a smooth roofline: memory is its bytes (weights
plus activations in and out) at the HBM bandwidth times an efficiency; compute the FLOPs of its whole
output tiles, in whole waves of one tile per SM, at the tensor peak times an efficiency; the tile shape
is the best of 128 x 128, 64 x 128 and 64 x 64, smaller tiles paying a fitted penalty for their lower
data reuse. An elementwise operator takes floor + bytes / (bandwidth x efficiency) + elements x cycles
/ (SMs x clock): its bytes and its issue work do not overlap well at these sizes. What differs between
GPUs is only their data-sheet numbers (tensor FLOP/s, HBM bandwidth, SM count, clock, interconnect);
the efficiencies, floors and cycles are fitted once on the A100 and A40 profiles together
(scripts/calibrate_cost_model.py). L2 size is not used: the profiles time each operator in a warm
loop, and a fit that used it would learn the loop, not a forward pass.

Every function works on plain numbers and, unchanged, on numpy arrays of them (the fitting script
evaluates thousands of profile rows at once), so it uses only arithmetic operators.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TypeVar

from fleetserve.model.catalog import BF16_BYTES, GpuSpec, ModelSpec
from fleetserve.model.params import CostParams

# numpy arrays satisfy every operation used here; a TypeVar keeps the scalar case precisely typed
Number = TypeVar("Number", int, float)

GEMM_OPERATORS = ("attn_pre_proj", "attn_post_proj", "mlp_up_proj", "mlp_down_proj")
ELEMENTWISE_OPERATORS = ("input_layernorm", "attn_rope", "post_attention_layernorm", "mlp_act", "add")
LAYER_OPERATORS = (
    "input_layernorm",
    "attn_pre_proj",
    "attn_rope",
    "attn_post_proj",
    "post_attention_layernorm",
    "mlp_up_proj",
    "mlp_act",
    "mlp_down_proj",
    "add",
)
# GEMM output tiles, largest first: each next one halves the previous
TILE_SHAPES = ((128, 128), (64, 128), (64, 64))
# all-reduces per transformer layer: after attention and after the MLP (Megatron-style tensor parallel)
ALLREDUCES_PER_LAYER = 2


@dataclass(frozen=True)
class LayerShapes:
    """What one GPU computes of one decoder layer of `model` at tensor-parallel degree `tp`."""

    hidden: int
    qkv_width: int
    attention_width: int  # query heads on this GPU x head_dim: the attention output's width
    mlp_width: int  # intermediate size on this GPU
    gated_mlp: bool
    rope_width: int  # query and key heads on this GPU x head_dim; 0 without rotary embeddings
    norms: int  # 2, or 1 when attention and MLP read the same normalised input
    vocab_shard: int
    kv_heads_per_gpu: int

    @classmethod
    def of(cls, model: ModelSpec, tp: int) -> LayerShapes:
        heads = model.heads // tp
        # with more GPUs than KV heads, vLLM replicates KV heads so every GPU still holds one
        kv_heads = math.ceil(model.kv_heads / tp)
        return cls(
            hidden=model.hidden_size,
            qkv_width=(heads + 2 * kv_heads) * model.head_dim,
            attention_width=heads * model.head_dim,
            mlp_width=model.intermediate_size // tp,
            gated_mlp=model.gated_mlp,
            rope_width=(heads + kv_heads) * model.head_dim if model.rotary else 0,
            norms=1 if model.parallel_attention else 2,
            vocab_shard=math.ceil(model.vocab_size / tp),
            kv_heads_per_gpu=kv_heads,
        )


def gemm_time(rows: Number, out_features: Number, in_features: Number, gpu: GpuSpec, p: CostParams) -> Number:
    """A BF16 GEMM of `rows` x `in_features` by `in_features` x `out_features`, seconds."""
    moved = BF16_BYTES * (rows * in_features + in_features * out_features + rows * out_features)
    flops = 2 * in_features * _tiled_outputs(rows, out_features, gpu, p)
    compute = flops / (gpu.bf16_tflops * 1e12 * p.gemm_compute_efficiency)
    memory = moved / (gpu.hbm_gbps * 1e9 * p.gemm_memory_efficiency)
    sharpness = p.gemm_roofline_sharpness
    return p.gemm_floor_s + (memory**sharpness + compute**sharpness) ** (1 / sharpness)


def _tiled_outputs(rows: Number, out_features: Number, gpu: GpuSpec, p: CostParams) -> Number:
    """The output elements the GPU's time is spent on: whole tiles (a tile past the matrix's edge
    costs in full) in whole waves of one tile per SM (a partial last wave costs a full one). Like
    cuBLAS's heuristics, take the best of three tile shapes; each halving of the tile pays
    `gemm_small_tile_penalty` for its lower data reuse. Never decreases as rows or columns grow."""
    best = None
    for halvings, (tile_rows, tile_columns) in enumerate(TILE_SHAPES):
        tiles = _ceil_div(rows, tile_rows) * _ceil_div(out_features, tile_columns)
        waves = _ceil_div(tiles, gpu.sm_count)
        outputs = waves * gpu.sm_count * tile_rows * tile_columns * p.gemm_small_tile_penalty**halvings
        best = outputs if best is None else _smaller(best, outputs)
    assert best is not None
    return best


def elementwise_time(
    elements: Number, moved_bytes: Number, cycles_per_element: float, gpu: GpuSpec, p: CostParams
) -> Number:
    """A memory-bound kernel over `elements` values that reads and writes `moved_bytes`, seconds."""
    memory = moved_bytes / (gpu.hbm_gbps * 1e9 * p.elementwise_memory_efficiency)
    issue = elements * cycles_per_element / (gpu.sm_count * gpu.boost_clock_ghz * 1e9)
    return p.elementwise_floor_s + memory + issue


def layer_operator_times(
    shapes: LayerShapes, tokens: Number, gpu: GpuSpec, p: CostParams
) -> dict[str, Number]:
    """Seconds of each non-attention operator of one decoder layer over `tokens` tokens, on one GPU, in
    execution order; a model without rotary embeddings or with one norm per layer lacks those."""
    hidden_values = tokens * shapes.hidden
    mlp_values = tokens * shapes.mlp_width
    rope_values = tokens * shapes.rope_width
    norm = elementwise_time(hidden_values, 2 * BF16_BYTES * hidden_values, p.norm_cycles_per_element, gpu, p)
    times = {
        "input_layernorm": norm,
        "attn_pre_proj": gemm_time(tokens, shapes.qkv_width, shapes.hidden, gpu, p),
        "attn_rope": elementwise_time(
            rope_values, 2 * BF16_BYTES * rope_values, p.rope_cycles_per_element, gpu, p
        ),
        "attn_post_proj": gemm_time(tokens, shapes.hidden, shapes.attention_width, gpu, p),
        "post_attention_layernorm": norm,
        "mlp_up_proj": gemm_time(
            tokens, (2 if shapes.gated_mlp else 1) * shapes.mlp_width, shapes.hidden, gpu, p
        ),
        # gated: reads gate and up, writes their product; otherwise reads and writes one tensor
        "mlp_act": elementwise_time(
            mlp_values,
            (3 if shapes.gated_mlp else 2) * BF16_BYTES * mlp_values,
            p.activation_cycles_per_element,
            gpu,
            p,
        ),
        "mlp_down_proj": gemm_time(tokens, shapes.hidden, shapes.mlp_width, gpu, p),
        "add": elementwise_time(
            hidden_values, 3 * BF16_BYTES * hidden_values, p.residual_cycles_per_element, gpu, p
        ),
    }
    if not shapes.rope_width:
        del times["attn_rope"]
    if shapes.norms == 1:
        del times["post_attention_layernorm"]
    return times


def embedding_time(shapes: LayerShapes, tokens: Number, gpu: GpuSpec, p: CostParams) -> Number:
    """Looking up `tokens` rows of the embedding table: read each row, write it."""
    values = tokens * shapes.hidden
    return elementwise_time(values, 2 * BF16_BYTES * values, p.embedding_cycles_per_element, gpu, p)


def lm_head_time(shapes: LayerShapes, sequences: Number, gpu: GpuSpec, p: CostParams) -> Number:
    """Logits of the last position of each sequence: the only rows vLLM projects onto the vocabulary."""
    return gemm_time(sequences, shapes.vocab_shard, shapes.hidden, gpu, p)


def all_reduce_time(moved_bytes: Number, tp: int, gpu: GpuSpec, p: CostParams) -> Number:
    """A ring all-reduce of `moved_bytes` over `tp` GPUs: each GPU sends 2(tp-1)/tp of the buffer over
    one direction of its link, after a fixed latency per collective and a latency per ring step."""
    if tp == 1:
        return 0.0 * moved_bytes
    link_bytes_per_s = gpu.interconnect_gbps / 2 * 1e9 * p.interconnect_efficiency
    steps = 2 * (tp - 1)
    latency = p.collective_latency_s + steps * p.collective_step_latency_s
    return latency + moved_bytes * steps / tp / link_bytes_per_s


def send_recv_time(moved_bytes: Number, gpu: GpuSpec, p: CostParams) -> Number:
    """One GPU sending `moved_bytes` to another over one direction of its link."""
    link_bytes_per_s = gpu.interconnect_gbps / 2 * 1e9 * p.interconnect_efficiency
    return p.collective_latency_s + moved_bytes / link_bytes_per_s


def _ceil_div(numerator: Number, denominator: Number) -> Number:
    return -(-numerator // denominator)


def _smaller(a: Number, b: Number) -> Number:
    """min() that also works element-wise on arrays."""
    return (a + b - abs(a - b)) / 2
