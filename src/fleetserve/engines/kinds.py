"""Every engine kind a fleet file may name, described once: whether fleetserve starts it, whether it
needs a GPU type, how it is started and when it is ready, and what to install when it cannot be.

The fleet file's validation (`needs_gpu`), the launcher (`launch_spec`), `serve`'s error messages
(`install_hint`) and the fleet actuator all read this table; adding an engine kind is adding an entry
(see docs/architecture.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fleetserve.config import EngineInstance
    from fleetserve.engines.launcher import EngineSpec

SpecBuilder = Callable[["EngineInstance", str], "EngineSpec"]  # (replica, host) -> how to start it


@dataclass(frozen=True)
class EngineKindInfo:
    name: str
    launched: bool  # fleetserve starts it (else it is a URL someone else runs)
    needs_gpu: bool  # a fleet-file line of this kind must name a catalog GPU
    ready_path: str  # answers 2xx once the engine serves
    install_hint: str | None = None  # what to install when its program is missing
    # one process per replica; None for the emulated kind, whose replicas share one process
    launch_spec: SpecBuilder | None = None
    # the emulated kind stretches engine-model time; the others run at their own speed
    has_time_scale: bool = False


def _llamacpp(instance: EngineInstance, host: str) -> EngineSpec:
    from fleetserve.engines.commands import llamacpp_spec

    return llamacpp_spec(instance, host=host)


def _vllm(instance: EngineInstance, host: str) -> EngineSpec:
    from fleetserve.engines.commands import vllm_spec

    return vllm_spec(instance, host=host)


def _sglang(instance: EngineInstance, host: str) -> EngineSpec:
    from fleetserve.engines.commands import sglang_spec

    return sglang_spec(instance, host=host)


ENGINE_KINDS: dict[str, EngineKindInfo] = {
    info.name: info
    for info in (
        EngineKindInfo("emulated", launched=True, needs_gpu=True, ready_path="/health", has_time_scale=True),
        EngineKindInfo(
            "llamacpp",
            launched=True,
            needs_gpu=False,
            ready_path="/v1/models",
            install_hint="install the llama.cpp extra: pip install 'fleetserve[llamacpp]'",
            launch_spec=_llamacpp,
        ),
        EngineKindInfo(
            "vllm",
            launched=True,
            needs_gpu=True,
            ready_path="/health",
            install_hint="vLLM needs a GPU machine: pip install vllm there",
            launch_spec=_vllm,
        ),
        EngineKindInfo(
            "sglang",
            launched=True,
            needs_gpu=True,
            ready_path="/health",
            install_hint="SGLang needs a GPU machine: pip install 'sglang[all]' there",
            launch_spec=_sglang,
        ),
        EngineKindInfo("external", launched=False, needs_gpu=False, ready_path="/v1/models"),
    )
}
