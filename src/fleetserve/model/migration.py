"""Moving a running request's KV cache to another engine, as Llumnix does: in stages.

Stage 1 copies every block the request holds while it keeps decoding on the source; each later stage
copies the blocks decoded during the one before. Once 16 blocks or fewer are left, the source pauses
the request and copies the rest: that last copy is the request's downtime. Copying runs at the slower of
the two engines' network links (`GpuSpec.network_gbps`), one link per GPU of the smaller tensor-parallel
group. If the copy does not converge within three stages (the request decodes blocks faster than the
link moves them) the migration is abandoned and the request stays where it is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fleetserve.model.cost import CostModel

FINAL_STAGE_BLOCKS = 16  # Llumnix pauses the request for at most this many blocks
MAX_STAGES = 3


@dataclass(frozen=True, slots=True)
class StagedCopy:
    """How a KV migration would go: stages, total copy time, the paused part, bytes moved; `aborted`
    says why it would not converge (then the request is not moved)."""

    stages: int
    copy_s: float
    downtime_s: float
    kv_bytes: float
    aborted: str | None = None


def link_gbps(source: CostModel, destination: CostModel) -> float:
    """GB/s between two engines: the slower GPU's network, times the GPUs that send in parallel."""
    per_gpu = min(source.gpu.network_gbps, destination.gpu.network_gbps)
    return per_gpu * min(source.tp, destination.tp)


def staged_copy(
    source: CostModel, destination: CostModel, context_tokens: int, decode_step_s: float, block_size: int
) -> StagedCopy:
    """The staged copy of a request with `context_tokens` in its KV cache, decoding one token every
    `decode_step_s` on the source."""
    bytes_per_block = source.kv_bytes_per_token_per_gpu * source.tp * block_size
    bytes_per_s = link_gbps(source, destination) * 1e9
    blocks = math.ceil(context_tokens / block_size)
    copied = 0.0
    moved = 0.0
    stages = 0
    while blocks > FINAL_STAGE_BLOCKS:
        stages += 1
        if stages > MAX_STAGES:
            return StagedCopy(stages - 1, copied, 0.0, moved, "did not converge in 3 stages")
        seconds = blocks * bytes_per_block / bytes_per_s
        copied += seconds
        moved += blocks * bytes_per_block
        decoded = seconds / decode_step_s if decode_step_s > 0 else 0.0
        blocks = math.ceil(decoded / block_size)
    downtime = blocks * bytes_per_block / bytes_per_s
    return StagedCopy(stages + 1, copied + downtime, downtime, moved + blocks * bytes_per_block)
