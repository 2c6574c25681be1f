"""GPU and model catalogs: the hardware and architecture numbers the cost model needs.

The package ships `data/gpus.yaml` and `data/models.yaml`. A user file in the same format (top-level
`gpus:` and/or `models:` mappings) adds entries or overrides fields of shipped ones, e.g. to set the price
a team actually pays. Entries are found by name, by any alias, or (models) by Hugging Face id.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import yaml

from fleetserve.errors import FleetserveError, InputError

BF16_BYTES = 2


class UnknownEntry(FleetserveError, KeyError):
    """A GPU or model name that the catalog does not hold. The message lists the valid names."""

    def __init__(self, kind: str, name: str, valid: Iterable[str]) -> None:
        self.kind = kind
        self.name = name
        self.valid = sorted(valid)
        super().__init__(f"unknown {kind} {name!r}; valid {kind}s: {', '.join(self.valid)}")

    def __str__(self) -> str:
        # KeyError would repr() the message, wrapping it in quotes
        return str(self.args[0])


class CatalogError(InputError):
    """A catalog file that cannot be read into specs (missing or mistyped fields)."""


@dataclass(frozen=True)
class GpuSpec:
    """One accelerator. Rates are vendor peak figures; the cost model applies calibrated efficiencies.

    bf16_tflops: dense (no sparsity) BF16 tensor-core TFLOP/s. hbm_gbps: memory bandwidth in GB/s.
    memory_gb: device memory in GB (1e9 bytes). interconnect_gbps: the vendor's headline GPU-to-GPU
    bandwidth (NVLink, or PCIe for cards without it), both directions summed, GB/s.
    host_link_gbps: host-to-device bandwidth in one direction, GB/s (PCIe), used for adapter loads.
    weight_load_gbps: how fast a starting engine reads its weights onto this GPU, GB/s (storage to
    device; see gpus.yaml for the assumption behind the default), used for cold starts.
    network_gbps: scale-out network per GPU, one direction, GB/s (its NICs' share), used for KV migration.
    sm_count: streaming multiprocessors; boost_clock_ghz: their boost clock. Together they set how many
    GEMM tiles run in one wave and how fast memory-bound kernels issue their work.
    """

    name: str
    bf16_tflops: float
    hbm_gbps: float
    memory_gb: float
    interconnect_gbps: float
    usd_per_hour: float
    price_source: str
    sm_count: int
    boost_clock_ghz: float
    host_link_gbps: float = 32.0
    weight_load_gbps: float = 2.0
    interconnect: str = "PCIe"
    network_gbps: float = 1.25
    network: str = "10 GbE (assumed)"
    aliases: tuple[str, ...] = field(default=(), compare=False)


@dataclass(frozen=True)
class ModelSpec:
    """One decoder-only transformer, numbers as in its public config.json.

    intermediate_size: the MLP's inner width (per branch for a gated MLP, whose up projection computes
    gate and up together). rotary: positions by rotary embeddings (False: ALiBi or learned).
    parallel_attention: attention and MLP read the same normalised input (one layer norm per layer).
    """

    name: str
    layers: int
    hidden_size: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    params: int
    max_context: int
    intermediate_size: int
    gated_mlp: bool = True
    rotary: bool = True
    parallel_attention: bool = False
    hf_id: str | None = None
    aliases: tuple[str, ...] = field(default=(), compare=False)

    @property
    def kv_bytes_per_token(self) -> int:
        """BF16 key and value vectors of one token across all layers."""
        return 2 * self.layers * self.kv_heads * self.head_dim * BF16_BYTES

    @property
    def weight_bytes(self) -> int:
        return self.params * BF16_BYTES


Spec = TypeVar("Spec", GpuSpec, ModelSpec)


class Catalog:
    """GPUs and models by name. Build it with `Catalog.load()`; lookups raise `UnknownEntry`."""

    def __init__(self, gpus: Mapping[str, GpuSpec], models: Mapping[str, ModelSpec]) -> None:
        self.gpus: dict[str, GpuSpec] = dict(gpus)
        self.models: dict[str, ModelSpec] = dict(models)
        self._gpu_index = _index(self.gpus.values())
        self._model_index = _index(self.models.values())

    @classmethod
    def load(cls, user_file: str | Path | None = None) -> Catalog:
        """The shipped catalog, plus the entries of `user_file` (added, or merged field by field)."""
        gpus = _parse(GpuSpec, _section(_read_packaged("gpus.yaml"), "gpus", "gpus.yaml"), {})
        models = _parse(ModelSpec, _section(_read_packaged("models.yaml"), "models", "models.yaml"), {})
        if user_file is not None:
            path = Path(user_file)
            try:
                document = yaml.safe_load(path.read_text()) or {}
            except (OSError, yaml.YAMLError) as error:
                raise CatalogError(f"cannot read catalog file {path}: {error}") from error
            if not isinstance(document, dict) or not set(document) <= {"gpus", "models"}:
                raise CatalogError(f"{path}: expected a mapping with `gpus:` and/or `models:` keys")
            gpus = _parse(GpuSpec, _section(document, "gpus", str(path)), gpus)
            models = _parse(ModelSpec, _section(document, "models", str(path)), models)
        return cls(gpus, models)

    def gpu(self, name: str) -> GpuSpec:
        return _lookup(self._gpu_index, self.gpus, "gpu", name)

    def model(self, name: str) -> ModelSpec:
        return _lookup(self._model_index, self.models, "model", name)


@cache
def default_catalog() -> Catalog:
    """The shipped catalog, read once per process."""
    return Catalog.load()


def _read_packaged(filename: str) -> dict[str, Any]:
    text = resources.files("fleetserve").joinpath("data", filename).read_text()
    return yaml.safe_load(text) or {}


def _section(document: dict[str, Any], key: str, origin: str) -> dict[str, Any]:
    section = document.get(key) or {}
    if not isinstance(section, dict):
        raise CatalogError(f"{origin}: `{key}:` must map names to entries")
    return section


def _parse(kind: type[Spec], entries: dict[str, Any], base: dict[str, Spec]) -> dict[str, Spec]:
    """Turn YAML entries into specs; an entry whose name is already in `base` updates only its fields."""
    result = dict(base)
    known_fields = {f.name for f in dataclasses.fields(kind)} - {"name"}
    existing = _index(base.values())
    for given_name, fields in entries.items():
        # an override may name a shipped entry by any of its aliases
        name = existing.get(str(given_name).lower(), str(given_name))
        if not isinstance(fields, dict):
            raise CatalogError(f"{kind.__name__} {name!r}: expected a mapping of fields")
        unknown = set(fields) - known_fields
        if unknown:
            raise CatalogError(
                f"{kind.__name__} {name!r}: unknown field(s) {', '.join(sorted(unknown))}; "
                f"known: {', '.join(sorted(known_fields))}"
            )
        values = dict(fields)
        if "aliases" in values:
            values["aliases"] = tuple(values["aliases"])
        try:
            if name in result:
                result[name] = dataclasses.replace(result[name], **values)
            else:
                result[name] = kind(name=name, **values)
        except TypeError as error:
            raise CatalogError(f"{kind.__name__} {name!r}: {error}") from error
        _check_types(result[name])
    return result


def _check_types(spec: GpuSpec | ModelSpec) -> None:
    for f in dataclasses.fields(spec):
        value = getattr(spec, f.name)
        if f.type == "bool" and not isinstance(value, bool):
            raise CatalogError(
                f"{type(spec).__name__} {spec.name!r}: {f.name} must be true or false, got {value!r}"
            )
        if f.type in ("int", "float") and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise CatalogError(
                f"{type(spec).__name__} {spec.name!r}: {f.name} must be a number, got {value!r}"
            )
        if f.type in ("int", "float") and value <= 0:
            raise CatalogError(f"{type(spec).__name__} {spec.name!r}: {f.name} must be positive, got {value}")


def _index(specs: Collection[GpuSpec | ModelSpec]) -> dict[str, str]:
    index: dict[str, str] = {}
    for spec in specs:
        keys = [spec.name, *spec.aliases]
        if isinstance(spec, ModelSpec) and spec.hf_id:
            keys.append(spec.hf_id)
        for key in keys:
            index.setdefault(key.lower(), spec.name)
    # a canonical name always wins over another entry's alias
    index.update({spec.name.lower(): spec.name for spec in specs})
    return index


def _lookup(index: dict[str, str], entries: dict[str, Spec], kind: str, name: str) -> Spec:
    canonical = index.get(name.lower())
    if canonical is None:
        raise UnknownEntry(kind, name, entries)
    return entries[canonical]
