"""Every engine kind a fleet file may name, described once: whether fleetserve starts it, whether it
needs a GPU type, how it is started and when it is ready, and what to install when it cannot be.

The fleet file's validation (`needs_gpu`), the launcher (`argv`, `env`), `serve`'s error messages
(`install_hint`) and the fleet actuator all read this table; adding an engine kind is adding an entry
(see docs/architecture.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the fleet file validates kinds with this table, so it imports no configuration
    from fleetserve.config import EngineGroup, EngineInstance

ArgvBuilder = Callable[["EngineInstance", str], tuple[str, ...]]  # (replica, host) -> its command line


def _no_env(group: EngineGroup) -> dict[str, str]:
    return {}


def _llamacpp_argv(instance: EngineInstance, host: str) -> tuple[str, ...]:
    from fleetserve.engines.commands import llamacpp_replica_argv

    return llamacpp_replica_argv(instance, host)


def _vllm_argv(instance: EngineInstance, host: str) -> tuple[str, ...]:
    from fleetserve.engines.commands import vllm_argv

    return vllm_argv(instance, host=host)


def _vllm_env(group: EngineGroup) -> dict[str, str]:
    from fleetserve.engines.commands import vllm_env

    return vllm_env(group)


def _sglang_argv(instance: EngineInstance, host: str) -> tuple[str, ...]:
    from fleetserve.engines.commands import sglang_argv

    return sglang_argv(instance, host=host)


@dataclass(frozen=True)
class EngineKindInfo:
    name: str
    launched: bool  # fleetserve starts it (else it is a URL someone else runs)
    needs_gpu: bool  # a fleet-file line of this kind must name a catalog GPU
    ready_path: str  # answers 2xx once the engine serves
    install_hint: str | None = None  # what to install when its program is missing
    # one process per replica; None for the emulated kind, whose replicas share one process
    argv: ArgvBuilder | None = None
    env: Callable[[EngineGroup], dict[str, str]] = _no_env
    # the emulated kind stretches engine-model time; the others run at their own speed
    has_time_scale: bool = False


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
            argv=_llamacpp_argv,
        ),
        EngineKindInfo(
            "vllm",
            launched=True,
            needs_gpu=True,
            ready_path="/health",
            install_hint="vLLM needs a GPU machine: pip install vllm there",
            argv=_vllm_argv,
            env=_vllm_env,
        ),
        EngineKindInfo(
            "sglang",
            launched=True,
            needs_gpu=True,
            ready_path="/health",
            install_hint="SGLang needs a GPU machine: pip install 'sglang[all]' there",
            argv=_sglang_argv,
        ),
        EngineKindInfo("external", launched=False, needs_gpu=False, ready_path="/v1/models"),
    )
}
