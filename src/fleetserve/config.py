"""The fleet file: one YAML document that describes the engines, the router, the SLO and the gateway.

Every command (`serve`, `engine emulate --fleet`, `sim`, `demo`) reads it through `load_fleet`, which
validates it into typed objects and reports a bad key with its path and line in the file.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from fleetserve.errors import InputError

if TYPE_CHECKING:
    from fleetserve.autoscale import GroupScaler
    from fleetserve.autoscale.loop import AutoscaledGroup
    from fleetserve.autoscale.mix import GpuOption
    from fleetserve.autoscale.planned import FleetPlanner
    from fleetserve.migration import MigrationController
    from fleetserve.model.catalog import Catalog
    from fleetserve.pipeline import Stage
    from fleetserve.tenants import TenantDirectory

EngineKind = Literal["emulated", "llamacpp", "vllm", "sglang", "external"]
MetricsDialect = Literal["vllm", "sglang", "trtllm", "llamacpp", "none"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EngineArgs(_Strict):
    """Engine-side knobs, named as vLLM names them. The engine model and the launchers both read these."""

    block_size: int = Field(16, ge=1, description="Tokens per KV-cache block.")
    max_num_seqs: int = Field(256, ge=1, description="Most sequences running in one iteration.")
    max_num_batched_tokens: int = Field(8192, ge=1, description="Token budget of one iteration.")
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="Fraction of GPU memory the engine may use (weights + KV cache)."
    )
    enable_prefix_caching: bool = Field(True, description="Reuse KV blocks of identical prompt prefixes.")
    enable_chunked_prefill: bool = Field(True, description="Split long prompts across iterations.")
    scheduling_policy: Literal["fcfs", "priority"] = Field("fcfs", description="Waiting-queue order.")
    max_loras: int = Field(4, ge=0, description="LoRA adapters resident in GPU slots at once.")
    max_cpu_loras: int = Field(16, ge=0, description="LoRA adapters cached in host memory.")
    max_lora_rank: int = Field(16, ge=1, description="Largest adapter rank accepted.")


# A LoRA adapter's name as clients request it and engines load it: a Hugging Face style `name` or
# `org/name`, never a path (no `..`, no leading `/`, no `~`): names reach engines' adapter loaders.
ADAPTER_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}(/[A-Za-z0-9][A-Za-z0-9._-]{0,127})?$"


def check_adapter_names(names: tuple[str, ...] | list[str]) -> None:
    for name in names:
        if not re.match(ADAPTER_NAME, name) or ".." in name:
            raise ValueError(
                f"adapter name {name[:80]!r} is not a name: use letters, digits, `.`, `_`, `-` and at most"
                " one `/` (org/name), with no `..`"
            )


# An engine publishing KV events binds two ZMQ ports derived from its HTTP port, so replicas on
# consecutive HTTP ports never collide and a subscriber can find them from the engine's URL alone.
KV_EVENTS_PORT_OFFSET = 1000
KV_REPLAY_PORT_OFFSET = 2000


def kv_event_ports(http_port: int) -> tuple[int, int]:
    """(publish, replay) ZMQ ports of the engine listening on `http_port`."""
    return http_port + KV_EVENTS_PORT_OFFSET, http_port + KV_REPLAY_PORT_OFFSET


AUTOSCALE_METRIC_TARGETS = {  # each metric's default target, per ready replica
    "in_flight": 16.0,
    "waiting": 2.0,
    "kv_usage": 0.7,
    "predicted_ttft_ms": 500.0,
    "tokens_per_s": 1000.0,
}


class AutoscaleConfig(_Strict):
    """An engine group sized by an autoscaler (fleetserve.autoscale); AIBrix's semantics and defaults."""

    policy: Literal["kpa", "apa", "planned"] = Field(
        "kpa",
        description="kpa (Knative/AIBrix, with a panic mode), apa (AIBrix's proportional one), or planned"
        " (the GPU-mix planner over recent traffic sizes every planned group of the model at once; the"
        " metric settings do not apply).",
    )
    min_replicas: int = Field(
        1,
        ge=0,
        description="Fewest replicas. 0 lets the group scale to zero: a request for its model then waits"
        " (at most activation_timeout_s) while a replica starts.",
    )
    max_replicas: int = Field(8, ge=1, description="Most replicas.")
    metric: Literal["in_flight", "waiting", "kv_usage", "predicted_ttft_ms", "tokens_per_s"] = Field(
        "in_flight",
        description="What each ready replica reports, summed over the group (the target is per replica, as"
        " in AIBrix): requests in flight per unit of relative capacity, waiting requests, KV-cache usage"
        " (0-1), the engine model's predicted TTFT of a 1024-token prompt (ms), or output tokens per"
        " second since the last sample.",
    )
    target: float | None = Field(
        None,
        gt=0,
        description="The metric's value per replica to aim at; unset: in_flight 16, waiting 2, kv_usage 0.7,"
        " predicted_ttft_ms 500, tokens_per_s 1000.",
    )
    interval_s: float = Field(10.0, gt=0, description="How often the metric is sampled and a decision taken.")
    stable_window_s: float = Field(180.0, gt=0, description="The window whose mean sizes the group.")
    panic_window_s: float = Field(60.0, gt=0, description="kpa: the short window that detects a burst.")
    panic_threshold: float = Field(
        2.0, gt=1, description="kpa: panic when the panic window's mean exceeds this x the stable one's."
    )
    tolerance: float = Field(0.1, ge=0, lt=1, description="No change while within target x (1 +- this).")
    max_scale_up_rate: float = Field(2.0, gt=1, description="At most this x the ready replicas per step.")
    max_scale_down_rate: float = Field(
        2.0, gt=1, description="At least 1/this of the ready replicas per step."
    )
    scale_down_cooldown_s: float = Field(300.0, ge=0, description="No scale-down this long after a scale-up.")
    ready_timeout_s: float = Field(
        600.0, gt=0, description="A replica still starting after this is stopped and replaced."
    )
    plan_window_s: float = Field(
        180.0,
        gt=0,
        description="planned: the window of recent traffic the plan carries, and how often it is made"
        " again (Dynamo's planner: 180 s).",
    )
    plan_headroom: float = Field(
        0.8,
        gt=0,
        le=1,
        description="planned: each replica is planned at this fraction of the rate its profile sustains.",
    )
    plan_target: float = Field(
        0.9,
        gt=0,
        le=1,
        description="planned: the SLO attainment a replica's profiled rate meets (profiles are measured in"
        " the simulator and cached on disk).",
    )
    activation_timeout_s: float = Field(
        120.0,
        gt=0,
        description="min_replicas 0: how long a request waits for a replica to start before it gets 503"
        " with Retry-After.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> AutoscaleConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})")
        if self.policy == "kpa" and self.panic_window_s > self.stable_window_s:
            raise ValueError("panic_window_s must not exceed stable_window_s")
        return self

    @property
    def metric_target(self) -> float:
        return AUTOSCALE_METRIC_TARGETS[self.metric] if self.target is None else self.target

    def group(self, group: EngineGroup, planner: FleetPlanner | None = None) -> AutoscaledGroup:
        """The group as the fleet's autoscaler runs it, with a fresh scaler (the same object for the
        gateway and the simulator); `planner`: its model's, for the planned policy."""
        from fleetserve.autoscale.loop import AutoscaledGroup

        scaler = self.scaler(group.name, planner)
        return AutoscaledGroup(group.name, group.model, self.metric, self.interval_s, scaler, group.replicas)

    def scaler(self, group: str, planner: FleetPlanner | None = None) -> GroupScaler:
        """The group's scaler: the same object for the gateway and the simulator."""
        from fleetserve.autoscale import GroupScaler, build_autoscaler

        params: dict[str, Any] = {
            "tolerance": self.tolerance,
            "max_scale_up_rate": self.max_scale_up_rate,
            "max_scale_down_rate": self.max_scale_down_rate,
            "scale_down_cooldown_s": self.scale_down_cooldown_s,
            "stable_window_s": self.stable_window_s,
        }
        if self.policy == "kpa":
            params |= {"panic_window_s": self.panic_window_s, "panic_threshold": self.panic_threshold}
        if self.policy == "planned":
            params["planner"] = planner
        autoscaler = build_autoscaler(self.policy, self.metric_target, **params)
        return GroupScaler(group, autoscaler, self.min_replicas, self.max_replicas, self.ready_timeout_s)


class EngineGroup(_Strict):
    """One line of `engines:`: `replicas` identical engines."""

    name: str = Field(description="Group name; replicas are named NAME-0, NAME-1, ...")
    kind: EngineKind = Field(
        "emulated", description="emulated, llamacpp/vllm/sglang (launched), or external (has a url)."
    )
    model: str = Field(description="Model name as clients request it (a catalog entry for emulated).")
    gpu: str | None = Field(None, description="GPU catalog name; required for emulated engines.")
    replicas: int = Field(
        1,
        ge=0,
        description="How many identical engines this line describes at the start (0: a group the fleet"
        " actuator may start engines of later).",
    )
    tp: int = Field(1, ge=1, description="Tensor-parallel degree.")
    url: str | None = Field(None, description="Base URL of an engine that is already running.")
    dialect: MetricsDialect = Field("vllm", description="Which metric names the engine exposes.")
    port: int | None = Field(None, ge=1, le=65535, description="First port for launched replicas.")
    adapters: list[str] = Field(
        default_factory=list,
        description="LoRA adapters loaded at start: NAME (also its path or Hugging Face id) or NAME=PATH.",
    )
    time_scale: float = Field(1.0, gt=0, description="Emulated engines: stretch every duration by this.")
    forward_auth: bool = Field(
        True,
        description="Forward the client's Authorization header to this engine (an engine started with"
        " --api-key needs it). Engines registered at run time through the admin API default to false.",
    )
    kv_events: bool = Field(
        False,
        description="The engine publishes KV events over ZMQ on its HTTP port + 1000 (replay socket + 2000),"
        " and the gateway follows them for a precise prefix index. Emulated and vllm/sglang engines are"
        " started that way; an external engine must be.",
    )
    engine_args: EngineArgs = Field(default_factory=EngineArgs, description="Engine-side knobs.")
    autoscale: AutoscaleConfig | None = Field(
        None,
        description="Size this group with an autoscaler; `replicas` is then the starting count, within"
        " min_replicas..max_replicas. Unset: a fixed group.",
    )
    cold_start_s: float | None = Field(
        None,
        ge=0,
        description="Simulator: seconds an engine of this group takes from start to serving. Unset: the"
        " engine model's estimate (weights / the GPU's weight_load_gbps + a fixed engine start time).",
    )
    tokenizer: str | None = Field(
        None,
        min_length=1,
        description="Path to the model's Hugging Face tokenizer.json (relative to the fleet file). The"
        " gateway tokenizes prompts of this model with it for cache-aware routing, and emulated engines"
        " count tokens with it; unset, both use the built-in hashing tokenizer. It belongs to the model:"
        " every line of the same `model` uses it, and two lines may not name different files.",
    )

    @field_validator("adapters")
    @classmethod
    def _adapter_names(cls, adapters: list[str]) -> list[str]:
        # the fleet file is the operator's: NAME=PATH may name any path, the NAME part must be a name
        check_adapter_names([adapter.partition("=")[0] for adapter in adapters])
        return adapters

    @field_validator("tokenizer")
    @classmethod
    def _load_tokenizer(cls, value: str | None, info: ValidationInfo) -> str | None:
        """Resolve the path against the fleet file's folder and check that the file loads, so a bad
        path fails when the fleet file is read rather than when the gateway or an engine starts."""
        if value is None:
            return None
        from fleetserve.protocol.tokenizer import json_tokenizer

        path = _resolve(value, info)
        if not path.is_file():
            raise ValueError(f"tokenizer file {path} does not exist")
        try:
            json_tokenizer(path)
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot load tokenizer file {path}: {exc}") from None
        return str(path)

    @model_validator(mode="before")
    @classmethod
    def _url_means_external(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("url") and "kind" not in data:
            data = {**data, "kind": "external"}
        return data

    @model_validator(mode="after")
    def _check_kind(self) -> EngineGroup:
        from fleetserve.engines.kinds import ENGINE_KINDS  # a table with no imports of its own: no cycle

        kind = ENGINE_KINDS[self.kind]
        if not kind.launched and not self.url:
            raise ValueError(f"an {self.kind} engine needs a url")
        if kind.launched and self.url:
            raise ValueError(f"a {self.kind} engine is launched by fleetserve and takes no url")
        if not kind.launched and self.replicas != 1:
            raise ValueError(f"an {self.kind} engine is one url: use one line per engine")
        if kind.needs_gpu and not self.gpu:
            raise ValueError(f"a {self.kind} engine needs a gpu")
        scale = self.autoscale
        if scale is not None:
            if not kind.launched:
                raise ValueError(f"an {self.kind} engine cannot be autoscaled: fleetserve does not start it")
            if scale.policy == "planned" and not self.gpu:
                raise ValueError("a planned group needs a gpu: the plan sizes it by the GPU's profile")
            if not scale.min_replicas <= self.replicas <= scale.max_replicas:
                raise ValueError(
                    f"replicas ({self.replicas}) must be within autoscale.min_replicas ({scale.min_replicas})"
                    f" and autoscale.max_replicas ({scale.max_replicas})"
                )
        return self


class RouterConfig(_Strict):
    policy: str = Field("least_request", description="Routing policy name.")
    params: dict[str, Any] = Field(default_factory=dict, description="Policy parameters.")
    allow_policy_header: bool = Field(
        False, description="Let a request pick its policy with the x-fleetserve-policy header."
    )
    debug_header: bool = Field(False, description="Add x-fleetserve-route with the decision's reason.")

    @field_validator("policy")
    @classmethod
    def _known_policy(cls, name: str) -> str:
        from fleetserve.routing import POLICIES  # the routing room imports no configuration: no cycle

        if name not in POLICIES:
            raise ValueError(
                f"unknown routing policy {name!r}; valid policies: {', '.join(sorted(POLICIES))}"
            )
        return name

    @model_validator(mode="after")
    def _params_fit_the_policy(self) -> RouterConfig:
        from fleetserve.routing import make_policy

        make_policy(self.policy, self.params)  # ValueError names a bad parameter or value
        return self


class StageConfig(_Strict):
    stage: str = Field(description="Pipeline stage name, e.g. priority (see docs/architecture.md).")
    params: dict[str, Any] = Field(default_factory=dict, description="The stage's parameters.")

    @model_validator(mode="after")
    def _known_stage(self) -> StageConfig:
        from fleetserve.pipeline.registry import (
            make_stage,  # the pipeline room imports no configuration: no cycle
        )

        make_stage(self.stage, self.params)  # names an unknown stage, a bad parameter or value
        return self


class SLOConfig(_Strict):
    ttft_ms: float = Field(1000.0, gt=0, description="Time-to-first-token objective.")
    tpot_ms: float = Field(100.0, gt=0, description="Time-per-output-token objective.")


class GatewayConfig(_Strict):
    host: str = Field("127.0.0.1", description="Address the gateway listens on.")
    port: int = Field(8000, ge=0, le=65535, description="Gateway port (0 picks a free one).")
    admin_port: int | None = Field(None, ge=0, le=65535, description="Admin API port; off when unset.")
    admin_token: SecretStr | None = Field(
        None,
        min_length=16,
        description="Bearer token the admin API requires (`Authorization: Bearer ...`); at least 16"
        " characters. Prefer `admin_token_file`, which keeps the secret out of the fleet file.",
    )
    admin_token_file: SecretStr | None = Field(
        None,
        description="File holding the admin token (relative to the fleet file; surrounding whitespace is"
        " ignored). Read when the fleet file is loaded.",
    )
    admin_host: str = Field(
        "127.0.0.1",
        validate_default=True,  # its validator checks the admin token fields before it
        description="Address the admin API listens on, apart from `host`: serving clients on 0.0.0.0 does"
        " not expose the admin API. Anything but loopback requires an admin token.",
    )
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="Larger request bodies get 413.")
    max_header_bytes: int = Field(
        32 * 1024, ge=1024, description="Request line plus headers larger than this get 431."
    )
    body_timeout_s: float = Field(
        30.0, gt=0, description="Time to receive a whole request body once its headers arrived; then 408."
    )
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="Time from a connection's first byte (or a keep-alive request's) to the end of its"
        " headers; a connection that sends nothing is closed after this too. Then 408.",
    )
    idle_timeout_s: float = Field(
        15.0,
        gt=0,
        description="A keep-alive connection idle this long after its last response is closed (longer"
        " than the 5 s clients such as httpx keep idle connections, so they close theirs first).",
    )
    max_pending_connections: int = Field(
        1024,
        ge=1,
        description="Connections that have not yet sent a whole request; more are answered 503 and closed.",
    )
    max_pending_per_client: int = Field(
        64, ge=1, description="The same bound per client address, so one client cannot take them all."
    )
    max_queue: int = Field(
        1024, ge=1, description="Requests in flight at the gateway (bodies read) before 429."
    )
    max_retries: int = Field(2, ge=0, description="Retries on another engine before the first byte.")
    connect_timeout_s: float = Field(2.0, gt=0, description="Upstream connect timeout.")
    first_token_timeout_s: float = Field(60.0, gt=0, description="Upstream time to first byte.")
    total_timeout_s: float = Field(600.0, gt=0, description="Upstream total time per request.")
    stream_stall_timeout_s: float = Field(
        30.0,
        gt=0,
        description="A stream that sends nothing for this long after its first chunk counts as a failed"
        " engine: it is resumed on another engine (or ends with an error event).",
    )
    max_resumes: int = Field(
        2,
        ge=0,
        description="Times one stream is resumed on another engine after its engine failed mid-stream;"
        " 0 ends such a stream with an error event, as before.",
    )
    scrape_interval_s: float = Field(0.2, gt=0, description="Engine /metrics scrape period.")
    health_interval_s: float = Field(1.0, gt=0, description="Active health-check period.")
    drain_timeout_s: float = Field(
        300.0,
        ge=0,
        description="A drained engine is stopped once its requests finish, or after this many seconds.",
    )
    eject_after_failures: int = Field(3, ge=1, description="Consecutive failures before ejection.")
    eject_duration_s: float = Field(5.0, gt=0, description="Time an ejected engine waits for a probe.")

    @field_validator("admin_token_file")
    @classmethod
    def _read_admin_token(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        """Resolve the path against the fleet file's folder and read the token now, so a missing file
        fails when the fleet file is read. The field then holds the token itself."""
        if value is None:
            return None
        path = _resolve(value.get_secret_value(), info)
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise ValueError(f"cannot read admin token file {path}: {exc.strerror}") from None
        if len(token) < 16:
            raise ValueError(f"the admin token in {path} must have at least 16 characters")
        return SecretStr(token)

    @field_validator("admin_host")
    @classmethod
    def _admin_needs_token_off_loopback(cls, host: str, info: ValidationInfo) -> str:
        # the fields before this one are validated already (a bad token file reports itself)
        data = info.data
        if data.get("admin_token") is not None and data.get("admin_token_file") is not None:
            raise ValueError("set admin_token or admin_token_file, not both")
        has_token = data.get("admin_token") is not None or data.get("admin_token_file") is not None
        if data.get("admin_port") is not None and not is_loopback(host) and not has_token:
            raise ValueError(
                f"the admin API on {host} is reachable from other machines: set"
                " gateway.admin_token_file (or admin_token), or keep admin_host on loopback"
            )
        return host

    @property
    def admin_secret(self) -> str | None:
        """The admin token, from whichever of the two fields set it."""
        secret = self.admin_token or self.admin_token_file
        return None if secret is None else secret.get_secret_value()


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _resolve(value: str, info: ValidationInfo) -> Path:
    """A path from the fleet file, taken from the fleet file's folder when relative."""
    path = Path(value).expanduser()
    base_dir = (info.context or {}).get("base_dir")
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    return Path(os.path.normpath(path.absolute()))


TENANT_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class AuthConfig(_Strict):
    required: bool = Field(
        False,
        description="Every request must carry a tenant's key as `Authorization: Bearer KEY` (else 401);"
        " off: a request without a known key is tenant `anonymous`.",
    )


class RedisConfig(_Strict):
    url: SecretStr = Field(
        description="Redis the gateway replicas share quotas and VTC counters through, e.g."
        " redis://127.0.0.1:6379/0 (a password in it stays out of logs)."
    )
    fail_closed: bool = Field(
        False,
        description="While Redis is unreachable, refuse requests of tenants with limits (503) instead of"
        " enforcing the limits per replica until it is back.",
    )
    key_prefix: str = Field(
        "fleetserve", pattern=r"^[A-Za-z0-9:_-]+$", description="Prefix of every key fleetserve writes."
    )
    sync_interval_s: float = Field(
        0.5, gt=0, le=60, description="How often a replica shares its VTC counters (their staleness bound)."
    )
    timeout_s: float = Field(
        0.25, gt=0, description="A Redis call slower than this counts as Redis being unreachable."
    )

    @field_validator("url")
    @classmethod
    def _redis_scheme(cls, url: SecretStr) -> SecretStr:
        if not url.get_secret_value().startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("a Redis URL starts with redis://, rediss:// or unix://")
        return url


class LimitsConfig(_Strict):
    rpm: int | None = Field(None, ge=1, description="Requests per minute (sliding window); none: unlimited.")
    tpm: int | None = Field(
        None,
        ge=1,
        description="Tokens per minute: prompt tokens at admission plus output tokens once produced.",
    )
    max_in_flight: int | None = Field(None, ge=1, description="Requests admitted and not yet answered.")
    max_queue_s: float = Field(
        30.0, gt=0, description="Longest wait in the fair queue (`vtc` stage) before 429."
    )


class TenantConfig(_Strict):
    name: str = Field(pattern=TENANT_NAME, description="Tenant name, as metrics and logs show it.")
    key_sha256: list[str] = Field(
        default_factory=list,
        description="SHA-256 hex digests of the tenant's API keys (`fleetserve tenant key` makes a key"
        " and its digest); the keys themselves are never stored.",
    )
    weight: float = Field(
        1.0, gt=0, description="Share of a saturated fleet relative to other tenants (VTC)."
    )
    priority: int = Field(
        0, ge=-8, le=8, description="Band: higher bands get a larger share; below 0 is shed under pressure."
    )
    models: list[str] | None = Field(
        None, description="Models and adapters the tenant may use (403 otherwise); omitted: all."
    )
    limits: LimitsConfig = Field(default_factory=LimitsConfig)

    @field_validator("key_sha256")
    @classmethod
    def _hex_digests(cls, digests: list[str]) -> list[str]:
        for digest in digests:
            if len(digest) != 64 or any(c not in "0123456789abcdefABCDEF" for c in digest):
                # the message must not echo the value: a key pasted here by mistake stays out of logs
                raise ValueError("each key_sha256 entry is a 64-character hex SHA-256 digest of a key")
        return [digest.lower() for digest in digests]


class MigrationConfig(_Strict):
    """Moving running requests between engines (fleetserve.migration)."""

    policy: Literal["none", "drain_time", "freeness"] = Field(
        "none",
        description="none; drain_time (load = the engine model's predicted time to drain, moves only"
        " when the request finishes sooner elsewhere); freeness (Llumnix: free blocks per request).",
    )
    interval_s: float = Field(1.0, gt=0, description="How often the controller looks at the fleet.")
    kv: bool = Field(
        True,
        description="Move the KV cache in stages (emulated engines); false: the destination recomputes"
        " the context (llama.cpp, vLLM without a migration connector).",
    )
    max_moves: int = Field(4, ge=1, description="Moves started per look, over the whole fleet.")
    min_gap_s: float = Field(
        0.5, ge=0, description="drain_time: engines whose drain times differ less are left alone."
    )
    min_freeness_gap: float = Field(
        16.0, ge=0, description="freeness: engines whose freeness differs less are left alone."
    )
    make_room: bool = Field(
        True,
        description="Move requests out of the way of a more urgent one (engine priority, lower first)"
        " that an engine would admit next but cannot fit.",
    )

    def controller(self) -> MigrationController | None:
        """The controller these settings describe (None for policy none): the gateway and the
        simulator build theirs here, so both run the same one."""
        from fleetserve.migration import MigrationController

        if self.policy == "none":
            return None
        return MigrationController(
            self.policy,
            kv=self.kv,
            max_moves=self.max_moves,
            min_gap_s=self.min_gap_s,
            min_freeness_gap=self.min_freeness_gap,
            make_room=self.make_room,
        )


class EmulatorConfig(_Strict):
    host: str = Field("127.0.0.1", description="Address the emulated engines listen on.")
    base_port: int = Field(8100, ge=1, le=65535, description="Port of the first emulated engine.")


class FleetConfig(_Strict):
    engines: list[EngineGroup] = Field(description="The engines of the fleet.")
    router: RouterConfig = Field(default_factory=RouterConfig)
    pipeline: list[StageConfig] = Field(
        default_factory=list, description="Stages between admission and routing, run in this order."
    )
    slo: SLOConfig = Field(default_factory=SLOConfig)
    gateway: GatewayConfig = Field(default_factory=GatewayConfig)
    emulator: EmulatorConfig = Field(default_factory=EmulatorConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    redis: RedisConfig | None = Field(
        None, description="Shared quotas and VTC counters; without it limits are per gateway replica."
    )
    tenants: list[TenantConfig] = Field(default_factory=list, description="The fleet's tenants.")
    migration: MigrationConfig = Field(default_factory=MigrationConfig)

    @field_validator("tenants")
    @classmethod
    def _unique_tenants(cls, tenants: list[TenantConfig]) -> list[TenantConfig]:
        names: set[str] = set()
        owner: dict[str, str] = {}
        for index, tenant in enumerate(tenants):
            if tenant.name in names:
                raise ValueError(f"tenants[{index}]: tenant name {tenant.name!r} appears twice")
            names.add(tenant.name)
            for digest in tenant.key_sha256:
                if digest in owner:
                    raise ValueError(
                        f"tenants[{index}]: a key of {tenant.name} is also a key of {owner[digest]}"
                    )
                owner[digest] = tenant.name
        return tenants

    def tenant_directory(self) -> TenantDirectory:
        """The tenants as the pipeline's stages and the gateway see them."""
        from fleetserve.tenants import Limits, Tenant, TenantDirectory

        return TenantDirectory(
            (
                Tenant(
                    entry.name,
                    tuple(entry.key_sha256),
                    entry.weight,
                    entry.priority,
                    None if entry.models is None else frozenset(entry.models),
                    Limits(**entry.limits.model_dump()),
                )
                for entry in self.tenants
            ),
            required=self.auth.required,
        )

    @field_validator("engines")
    @classmethod
    def _one_tokenizer_per_model(cls, engines: list[EngineGroup]) -> list[EngineGroup]:
        named: dict[str, tuple[int, EngineGroup]] = {}
        for index, group in enumerate(engines):
            if group.tokenizer is None:
                continue
            first = named.setdefault(group.model, (index, group))
            if first[1].tokenizer != group.tokenizer:
                raise ValueError(
                    f"engines[{index}].tokenizer: {group.name} names {group.tokenizer}, but"
                    f" engines[{first[0]}] ({first[1].name}) names {first[1].tokenizer} for the same"
                    f" model {group.model!r}; engines of one model share one tokenizer"
                )
        return engines

    def stages(self, catalog: Catalog | None = None) -> list[Stage]:
        """Fresh objects for the `pipeline:` stages (each gateway and each simulation owns its own),
        after the `activator` when a group may scale to zero."""
        from fleetserve.autoscale.activator import ActivatorStage
        from fleetserve.pipeline.registry import make_pipeline

        stages = make_pipeline(
            ((entry.stage, entry.params) for entry in self.pipeline),
            tenants=self.tenant_directory(),
            catalog=catalog,
        )
        timeouts = self.activation_timeouts()
        return [ActivatorStage(timeouts_s=timeouts), *stages] if timeouts else stages

    def activation_timeouts(self) -> dict[str, float]:
        """model -> how long its requests wait for a replica, for models a group may scale to zero."""
        timeouts: dict[str, float] = {}
        for group in self.engines:
            scale = group.autoscale
            if scale is not None and scale.min_replicas == 0:
                timeouts[group.model] = max(timeouts.get(group.model, 0.0), scale.activation_timeout_s)
        return timeouts

    def planned_groups(self) -> list[EngineGroup]:
        """The groups the `planned` autoscaler sizes."""
        return [g for g in self.engines if g.autoscale is not None and g.autoscale.policy == "planned"]

    def autoscaled_groups(
        self, planned_options: Mapping[str, GpuOption] | None = None, start: float = 0.0
    ) -> list[AutoscaledGroup]:
        """Every group with an `autoscale:` block, with fresh scalers. `planned_options`: each planned
        group's GPU option (price and profiled capacity per length bucket: `sim.profiles`), needed when
        a group is planned; one planner per model sizes its planned groups, from `start`."""
        from fleetserve.autoscale.planned import FleetPlanner, PlannedGroup, planned_group

        by_model: dict[str, list[tuple[PlannedGroup, AutoscaleConfig]]] = {}
        for group in self.planned_groups():
            scale = group.autoscale
            assert scale is not None
            if planned_options is None or group.name not in planned_options:
                raise InputError(f"group {group.name} is planned, and no GPU profile was given for it")
            option = planned_group(
                group.name, planned_options[group.name], scale.min_replicas, scale.max_replicas
            )
            by_model.setdefault(group.model, []).append((option, scale))
        planners = {  # the model's first planned group's plan settings apply to the model's plan
            model: FleetPlanner(
                model,
                [entry for entry, _ in entries],
                window_s=entries[0][1].plan_window_s,
                headroom=entries[0][1].plan_headroom,
                start=start,
            )
            for model, entries in by_model.items()
        }
        return [
            group.autoscale.group(group, planners.get(group.model))
            for group in self.engines
            if group.autoscale is not None
        ]

    def model_tokenizers(self) -> dict[str, str]:
        """model -> the tokenizer.json the fleet file names for it (on any of its lines)."""
        return {group.model: group.tokenizer for group in self.engines if group.tokenizer is not None}

    @model_validator(mode="after")
    def _unique_names(self) -> FleetConfig:
        names = [group.name for group in self.engines]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"engine names must be unique: {', '.join(duplicates)}")
        if not self.engines:
            raise ValueError("a fleet needs at least one engine")
        return self

    def with_engine_base_port(self, port: int) -> FleetConfig:
        """The same fleet with its launched engines numbered from `port` (`emulator.base_port`; a group
        with its own `port:` keeps it)."""
        return self.model_copy(update={"emulator": self.emulator.model_copy(update={"base_port": port})})

    def instances(self) -> list[EngineInstance]:
        """Every engine replica with its id and, for emulated and launched engines, its port."""
        from fleetserve.engines.kinds import ENGINE_KINDS

        out: list[EngineInstance] = []
        next_port = self.emulator.base_port
        for group in self.engines:
            for index in range(group.replicas):
                engine_id = group.name if group.replicas == 1 else f"{group.name}-{index}"
                if not ENGINE_KINDS[group.kind].launched:
                    out.append(EngineInstance(engine_id, group, None, group.url or ""))
                    continue
                if group.port is not None:
                    port = group.port + index
                else:
                    port, next_port = next_port, next_port + 1
                url = f"http://{self.emulator.host}:{port}"
                out.append(EngineInstance(engine_id, group, port, url))
        return out


class EngineDescription(_Strict):
    """One engine as the gateway registers it: a replica of a fleet file's line, or the body of the
    admin API's `POST /engines`. The one declaration of an engine's fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, description="Engine id, unique in the fleet.")
    url: str = Field(pattern=r"^https?://", description="Base URL, e.g. http://10.0.0.5:8000")
    model: str = Field(min_length=1, description="Model name as clients request it.")
    gpu: str | None = Field(None, description="GPU catalog name: gives the engine its relative capacity.")
    tp: int = Field(1, ge=1, description="Tensor-parallel degree.")
    dialect: MetricsDialect = Field("vllm", description="Which metric names the engine exposes.")
    adapters: tuple[str, ...] = Field((), description="LoRA adapters it serves from the start.")
    block_size: int = Field(16, ge=1, description="KV-cache block size, until the engine reports its own.")
    max_loras: int = Field(0, ge=0, description="LoRA slots, until the engine reports its own.")
    time_scale: float = Field(1.0, gt=0, description="An emulated engine's --time-scale.")
    forward_auth: bool = Field(
        False, description="Forward clients' Authorization headers to this engine (off: they stay here)."
    )
    kv_events_endpoint: str | None = Field(
        None, pattern=r"^tcp://", description="ZMQ endpoint the engine publishes KV events on."
    )
    kv_replay_endpoint: str | None = Field(
        None, pattern=r"^tcp://", description="The engine's KV-event replay (ROUTER) endpoint."
    )
    group: str | None = Field(None, description="The fleet file's engine group it belongs to, if any.")

    @field_validator("adapters")
    @classmethod
    def _adapter_names(cls, adapters: tuple[str, ...]) -> tuple[str, ...]:
        check_adapter_names(adapters)
        return adapters

    @field_validator("url")
    @classmethod
    def _no_trailing_slash(cls, url: str) -> str:
        return url.rstrip("/")


@dataclass(frozen=True)
class EngineInstance:
    """One engine replica: the group it came from, and where it listens."""

    engine_id: str
    group: EngineGroup
    port: int | None
    url: str

    def description(self) -> EngineDescription:
        """How the gateway registers this replica."""
        from fleetserve.engines.kinds import ENGINE_KINDS

        group = self.group
        endpoints = self.kv_event_endpoints()
        return EngineDescription(
            id=self.engine_id,
            url=self.url,
            model=group.model,
            gpu=group.gpu,
            tp=group.tp,
            dialect=group.dialect,
            adapters=tuple(adapter.partition("=")[0] for adapter in group.adapters),
            block_size=group.engine_args.block_size,
            max_loras=group.engine_args.max_loras,
            time_scale=group.time_scale if ENGINE_KINDS[group.kind].has_time_scale else 1.0,
            forward_auth=group.forward_auth,
            kv_events_endpoint=None if endpoints is None else endpoints[0],
            kv_replay_endpoint=None if endpoints is None else endpoints[1],
            group=group.name,
        )

    def kv_event_endpoints(self) -> tuple[str, str] | None:
        """The ZMQ publish and replay endpoints a subscriber connects to, when the engine publishes KV
        events: on the host of its URL, at the ports `kv_event_ports` derives from its HTTP port."""
        if not self.group.kv_events:
            return None
        parsed = urlsplit(self.url)
        if parsed.port is None:
            raise ValueError(f"engine {self.engine_id}: kv_events needs an explicit port in {self.url}")
        publish, replay = kv_event_ports(parsed.port)
        host = parsed.hostname or "127.0.0.1"
        return f"tcp://{host}:{publish}", f"tcp://{host}:{replay}"


class ConfigError(InputError):
    """A fleet file that does not validate; the message names each bad key and its line."""


def load_fleet(path: str | Path) -> FleetConfig:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the fleet file: {exc.strerror}") from exc
    return parse_fleet(text, source=str(path), base_dir=path.parent)


def parse_fleet(text: str, source: str = "<fleet>", base_dir: str | Path | None = None) -> FleetConfig:
    """Validate a fleet file's text. Relative file paths in it (`tokenizer:`) are taken from `base_dir`,
    the fleet file's folder, else from the current directory."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a fleet file is a mapping with an `engines:` list")
    try:
        return FleetConfig.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            location = error["loc"]
            key = _dotted(location)
            line = _line_of(node, location)
            where = f"{source}:{line}" if line else source
            lines.append(f"{where}: {key or '(top level)'}: {error['msg']}")
        raise ConfigError("invalid fleet file\n" + "\n".join(lines)) from None


def _dotted(location: tuple[Any, ...]) -> str:
    out = ""
    for part in location:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not str(part).startswith("function-"):
            out += f".{part}" if out else str(part)
    return out


def _line_of(node: yaml.Node | None, location: tuple[Any, ...]) -> int | None:
    """The 1-based line of the deepest YAML node on `location` that exists in the file."""
    line = node.start_mark.line + 1 if node is not None else None
    for part in location:
        if isinstance(node, yaml.MappingNode):
            match = next((value for key, value in node.value if key.value == part), None)
            key_node = next((key for key, _ in node.value if key.value == part), None)
            if match is None:
                return line
            line = key_node.start_mark.line + 1 if key_node is not None else line
            node = match
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line
