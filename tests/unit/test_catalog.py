from pathlib import Path

import pytest

from fleetserve.model.catalog import Catalog, CatalogError, UnknownEntry, default_catalog

REQUIRED_GPUS = ["a100-80g", "h100-80g", "h200", "l4", "l40s", "a10g"]
REQUIRED_MODELS = [
    "llama-2-7b",
    "llama-2-70b",
    "llama-3-8b",
    "llama-3-70b",
    "mistral-7b",
    "qwen2.5-7b",
    "qwen2.5-32b",
    "bloom-176b",
    "smollm2-135m",
]


def test_shipped_catalog_has_the_required_entries_with_sources() -> None:
    catalog = default_catalog()
    for name in REQUIRED_GPUS:
        gpu = catalog.gpu(name)
        assert gpu.bf16_tflops > 0 and gpu.hbm_gbps > 0 and gpu.memory_gb > 0 and gpu.usd_per_hour > 0
        assert "as of" in gpu.price_source
    for name in REQUIRED_MODELS:
        model = catalog.model(name)
        assert model.heads % model.kv_heads == 0
        assert model.params > 0 and model.max_context > 0


def test_model_numbers_match_public_configs() -> None:
    llama70 = default_catalog().model("llama-2-70b")
    assert (llama70.layers, llama70.hidden_size, llama70.heads, llama70.kv_heads) == (80, 8192, 64, 8)
    # 2 (K and V) x 80 layers x 8 KV heads x 128 dims x 2 bytes
    assert llama70.kv_bytes_per_token == 327_680
    assert llama70.weight_bytes == 2 * llama70.params


def test_lookup_by_alias_case_and_hf_id() -> None:
    catalog = default_catalog()
    assert catalog.gpu("A100-80GB").name == "a100-80g"
    assert catalog.model("llama2-70b").name == "llama-2-70b"
    assert catalog.model("meta-llama/Meta-Llama-3-8B").name == "llama-3-8b"


def test_unknown_names_list_the_valid_ones() -> None:
    catalog = default_catalog()
    with pytest.raises(UnknownEntry) as gpu_error:
        catalog.gpu("h900")
    assert isinstance(gpu_error.value, KeyError)
    assert "h900" in str(gpu_error.value) and "h100-80g" in str(gpu_error.value)
    with pytest.raises(UnknownEntry, match="llama-3-8b"):
        catalog.model("gpt-5")


def test_user_file_overrides_fields_and_adds_entries(tmp_path: Path) -> None:
    user = tmp_path / "mine.yaml"
    user.write_text(
        "gpus:\n"
        "  A100-80GB:\n"
        "    usd_per_hour: 1.5\n"
        "    price_source: our reserved contract, 2025\n"
        "  b200:\n"
        "    bf16_tflops: 2250\n"
        "    hbm_gbps: 8000\n"
        "    memory_gb: 180\n"
        "    interconnect_gbps: 1800\n"
        "    sm_count: 148\n"
        "    boost_clock_ghz: 1.96\n"
        "    usd_per_hour: 9.0\n"
        "    price_source: made-up test price\n"
    )
    catalog = Catalog.load(user)
    a100 = catalog.gpu("a100-80g")
    assert a100.usd_per_hour == 1.5
    assert a100.hbm_gbps == default_catalog().gpu("a100-80g").hbm_gbps  # untouched fields kept
    assert catalog.gpu("b200").memory_gb == 180
    assert set(catalog.gpus) == {*default_catalog().gpus, "b200"}  # the alias overrode, did not add
    assert catalog.model("llama-3-8b") == default_catalog().model("llama-3-8b")
    assert default_catalog().gpu("a100-80g").usd_per_hour != 1.5  # the shipped catalog is not mutated


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("gpus:\n  b200:\n    bf16_tflops: 2250\n", "b200"),
        ("gpus:\n  a100-80g:\n    tflops: 1\n", "unknown field"),
        ("gpus:\n  a100-80g:\n    memory_gb: -1\n", "positive"),
        ("gpus:\n  a100-80g:\n    memory_gb: lots\n", "number"),
        ("accelerators: {}\n", "gpus"),
    ],
)
def test_bad_user_files_are_rejected_with_a_reason(tmp_path: Path, text: str, message: str) -> None:
    user = tmp_path / "bad.yaml"
    user.write_text(text)
    with pytest.raises(CatalogError, match=message):
        Catalog.load(user)
