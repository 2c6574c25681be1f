"""The operator-level cost model: shapes under tensor parallelism, the roofline's properties, and the
parts adding up to the iteration times the simulator and the emulated engine use."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleetserve.model import cost as cost_module
from fleetserve.model.catalog import Catalog, CatalogError, default_catalog
from fleetserve.model.cost import CostModel
from fleetserve.model.operators import (
    LAYER_OPERATORS,
    LayerShapes,
    all_reduce_time,
    gemm_time,
    layer_operator_times,
)
from fleetserve.model.params import default_cost_params

CATALOG = default_catalog()
PARAMS = default_cost_params()
A100, A40, H100, L4 = (CATALOG.gpu(name) for name in ("a100-80g", "a40", "h100-80g", "l4"))


def test_shapes_follow_the_config_under_tensor_parallelism() -> None:
    llama70 = CATALOG.model("llama-2-70b")  # 64 query heads, 8 KV heads, gated MLP of 28672
    shapes = LayerShapes.of(llama70, 4)
    assert shapes.qkv_width == (16 + 2 * 2) * 128
    assert shapes.attention_width == 16 * 128
    assert shapes.mlp_width == 7168 and shapes.gated_mlp
    # more GPUs than KV heads: each GPU keeps one replicated KV head
    assert LayerShapes.of(CATALOG.model("codellama-34b"), 16).kv_heads_per_gpu == 1
    assert LayerShapes.of(CATALOG.model("codellama-34b"), 16).qkv_width == (4 + 2) * 128


def test_models_without_an_operator_do_not_pay_for_it() -> None:
    phi = layer_operator_times(LayerShapes.of(CATALOG.model("phi-2"), 1), 512, A100, PARAMS)
    bloom = layer_operator_times(LayerShapes.of(CATALOG.model("bloom-176b"), 8), 512, A100, PARAMS)
    llama = layer_operator_times(LayerShapes.of(CATALOG.model("llama-3-8b"), 1), 512, A100, PARAMS)
    assert "post_attention_layernorm" not in phi  # attention and MLP share one norm
    assert "attn_rope" not in bloom  # ALiBi
    assert list(llama) == list(LAYER_OPERATORS)


@given(tokens=st.lists(st.integers(1, 40_000), min_size=1, max_size=20), tp=st.sampled_from([1, 2, 4, 8]))
def test_arrays_give_what_numbers_give(tokens: list[int], tp: int) -> None:
    """The fit evaluates thousands of rows as arrays; the simulator one number at a time."""
    shapes = LayerShapes.of(CATALOG.model("qwen-72b"), tp)
    as_array = layer_operator_times(shapes, np.array(tokens, dtype=float), A40, PARAMS)
    for index, count in enumerate(tokens):
        one = layer_operator_times(shapes, count, A40, PARAMS)
        for op, seconds in one.items():
            assert as_array[op][index] == pytest.approx(seconds, rel=1e-12)


@given(
    rows=st.integers(1, 16_384),
    out_features=st.integers(1, 65_536),
    in_features=st.integers(1, 16_384),
    gpu=st.sampled_from([A100, A40, H100, L4]),
)
def test_a_gemm_never_gets_faster_with_more_rows(rows: int, out_features: int, in_features: int, gpu) -> None:
    # whole tiles in whole waves: padding makes time flat across a tile, never lower
    assert gemm_time(rows + 1, out_features, in_features, gpu, PARAMS) >= gemm_time(
        rows, out_features, in_features, gpu, PARAMS
    )


def test_a_partial_wave_costs_a_full_one() -> None:
    """On the A100's 108 SMs, 108 output tiles of 128 x 128 fill one wave; 109 need two. A long K makes
    the GEMM compute-bound, so the second wave shows."""
    k = 16_384
    one_wave = gemm_time(128 * 12, 128 * 9, k, A100, PARAMS)  # 108 tiles
    two_waves = gemm_time(128 * 12 + 1, 128 * 9, k, A100, PARAMS)  # a 13th row of tiles: 117
    assert two_waves > 1.3 * one_wave


def test_decode_gemms_read_the_weights_at_the_fitted_bandwidth() -> None:
    """A one-token GEMM is a weight read: bytes / (HBM bandwidth x efficiency), plus the floor; the
    smooth roofline adds a little of the (padded) compute."""
    n, k = 28_672 * 2, 8_192
    expected = 2 * n * k / (A100.hbm_gbps * 1e9 * PARAMS.gemm_memory_efficiency) + PARAMS.gemm_floor_s
    assert expected <= gemm_time(1, n, k, A100, PARAMS) <= 1.06 * expected
    # the same GEMM on the A40 scales with its bandwidth, which is what transfers between GPUs
    ratio = gemm_time(1, n, k, A40, PARAMS) / gemm_time(1, n, k, A100, PARAMS)
    assert ratio == pytest.approx(A100.hbm_gbps / A40.hbm_gbps, rel=0.05)


def test_faster_gpus_run_each_operator_faster() -> None:
    shapes = LayerShapes.of(CATALOG.model("llama-3-8b"), 1)
    h100, a100, l4 = (layer_operator_times(shapes, 2048, gpu, PARAMS) for gpu in (H100, A100, L4))
    for op in LAYER_OPERATORS:
        assert h100[op] < a100[op] < l4[op], op


def test_all_reduce_is_free_on_one_gpu_and_grows_with_the_ring() -> None:
    assert all_reduce_time(1e6, 1, A100, PARAMS) == 0.0
    assert all_reduce_time(1e6, 2, A100, PARAMS) < all_reduce_time(1e6, 8, A100, PARAMS)
    assert all_reduce_time(1e6, 4, L4, PARAMS) > all_reduce_time(1e6, 4, A100, PARAMS)  # PCIe vs NVLink


@given(prompt=st.integers(1, 8000), batch=st.integers(1, 16), tp=st.sampled_from([1, 2, 8]))
def test_the_breakdown_adds_up_to_the_prefill_time(prompt: int, batch: int, tp: int) -> None:
    model = (
        CostModel(A100, CATALOG.model("llama-3-70b"), tp)
        if tp > 1
        else CostModel(H100, CATALOG.model("phi-2"))
    )
    breakdown = model.prefill_breakdown(prompt, batch)
    assert breakdown.total == pytest.approx(model.prefill_time(prompt, batch), rel=1e-9)
    assert breakdown.layer_non_attention == pytest.approx(sum(breakdown.operators.values()))


def test_the_memo_is_bounded_and_does_not_change_results(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cost_module, "MEMO_LIMIT", 8)
    # parameters no other test uses: a memo of its own
    params = dataclasses.replace(PARAMS, layer_overhead_s=PARAMS.layer_overhead_s * 1.5)
    model = CostModel(L4, CATALOG.model("llama-3-8b"), 1, params)
    first = [model.prefill_time(tokens) for tokens in range(1, 20)]
    assert len(model._token_memo) == 8
    assert [model.prefill_time(tokens) for tokens in range(1, 20)] == first


def test_catalog_holds_every_profiled_model_with_its_config() -> None:
    for name, hf_id in {
        "codellama-34b": "codellama/CodeLlama-34b-Instruct-hf",
        "qwen-72b": "Qwen/Qwen-72B",
        "internlm-20b": "internlm/internlm-20b",
        "phi-2": "microsoft/phi-2",
    }.items():
        model = CATALOG.model(hf_id)
        assert model.name == name
        assert model.hidden_size == model.heads * model.head_dim
    assert CATALOG.model("phi-2").gated_mlp is False and CATALOG.model("phi-2").parallel_attention
    assert CATALOG.gpu("a40").sm_count == 84


def test_a_flag_that_is_not_a_boolean_is_rejected(tmp_path) -> None:
    user = tmp_path / "models.yaml"
    user.write_text("models:\n  phi-2:\n    gated_mlp: sometimes\n")
    with pytest.raises(CatalogError, match="gated_mlp must be true or false"):
        Catalog.load(user)


def test_new_gpus_need_their_sm_count(tmp_path) -> None:
    user = tmp_path / "gpus.yaml"
    fields = dataclasses.asdict(A100) | {"aliases": []}
    fields.pop("name")
    fields.pop("sm_count")
    user.write_text("gpus:\n  mine:\n" + "".join(f"    {key}: {value!r}\n" for key, value in fields.items()))
    with pytest.raises(CatalogError, match="sm_count"):
        Catalog.load(user)
