"""Migration: the staged KV copy, export and import in the engine model, the controller's pairing
rules, and migration in the simulator."""

from __future__ import annotations

from dataclasses import replace

import orjson
import pytest

from fleetserve.config import FleetConfig
from fleetserve.errors import InputError
from fleetserve.migration import MIGRATION_POLICIES, EngineLoad, MigrationController, WaitingHead, engine_load
from fleetserve.model.catalog import default_catalog
from fleetserve.model.cost import CostModel
from fleetserve.model.engine import EngineModel
from fleetserve.model.migration import FINAL_STAGE_BLOCKS, link_gbps, staged_copy
from fleetserve.model.types import DecodingRequest, EngineRequest
from fleetserve.sim.simulator import simulate
from fleetserve.workload import TraceRequest


def cost(gpu: str, tp: int = 1) -> CostModel:
    catalog = default_catalog()
    return CostModel(catalog.gpu(gpu), catalog.model("llama-3-8b"), tp)


def test_the_link_is_the_slower_gpus_network() -> None:
    assert link_gbps(cost("h100-80g"), cost("l4")) == 1.25
    assert link_gbps(cost("h100-80g"), cost("h100-80g")) == 50
    assert link_gbps(cost("h100-80g", tp=2), cost("h100-80g", tp=2)) == 100


def test_a_staged_copy_pauses_only_for_the_last_blocks() -> None:
    source, destination = cost("a100-80g"), cost("h100-80g")
    copy = staged_copy(source, destination, 4000, decode_step_s=0.02, block_size=16)
    bytes_per_block = source.kv_bytes_per_token_per_gpu * 16
    assert copy.aborted is None and copy.stages >= 2
    assert copy.downtime_s <= FINAL_STAGE_BLOCKS * bytes_per_block / 6.25e9 + 1e-12
    assert copy.downtime_s < copy.copy_s
    assert copy.kv_bytes >= 250 * bytes_per_block  # every block of the context, once at least
    small = staged_copy(source, destination, 100, decode_step_s=0.02, block_size=16)
    assert small.stages == 1 and small.downtime_s == small.copy_s  # short: one paused copy


def test_a_copy_that_cannot_catch_up_with_decoding_is_abandoned() -> None:
    # decoding a token every 10 us produces blocks faster than 1.25 GB/s moves them
    copy = staged_copy(cost("l4"), cost("l4"), 100_000, decode_step_s=1e-5, block_size=16)
    assert copy.aborted == "did not converge in 3 stages" and copy.stages == 3


def decoding_engine(gpu: str, requests: int, prompt: int = 1000, output: int = 400) -> EngineModel:
    engine = EngineModel.build(gpu, "llama-3-8b")
    for index in range(requests):
        engine.add_request(EngineRequest(f"r{index}", range(prompt), output, 0.0, unique_prompt=True), 0.0)
    engine.advance(2.0)
    return engine


def test_export_and_import_move_a_request_without_leaking_a_block() -> None:
    source, destination = decoding_engine("l4", 3), EngineModel.build("h100-80g", "llama-3-8b")
    free_before = destination.kv.num_free_blocks
    moving = source.decoding()[0]
    exported = source.export_request(moving.request_id, 2.0)
    assert exported is not None and exported.output_done + exported.output_left == 400
    assert moving.request_id not in {r.request_id for r in source.decoding()}
    destination.import_request(exported, 2.0, with_kv=True)
    result = destination.advance(2.5)
    first = result.outputs[0]
    # only the last token was computed again: the next token comes after one short iteration
    assert first.request_id == moving.request_id and first.first_token_time - 2.0 < 0.05
    finished = destination.advance(100.0)
    assert sum(o.num_tokens for o in result.outputs + finished.outputs) == exported.output_left
    assert destination.kv.num_used_blocks == 0 or destination.kv.num_free_blocks == free_before
    source.advance(100.0)
    assert source.kv.num_used_blocks == 0 or source.kv.num_free_blocks == source.kv.num_blocks
    assert source.export_request("r0", 100.0) is None  # finished: nothing to export


def test_a_recomputed_import_pays_the_prefill() -> None:
    source = decoding_engine("l4", 1, prompt=4000)
    exported = source.export_request("r0", 2.0)
    assert exported is not None
    kv, recompute = EngineModel.build("h100-80g", "llama-3-8b"), EngineModel.build("h100-80g", "llama-3-8b")
    kv.import_request(exported, 2.0, with_kv=True)
    recompute.import_request(exported, 2.0, with_kv=False)
    assert recompute.advance(10.0).outputs[0].first_token_time > kv.advance(10.0).outputs[0].first_token_time


def load(engine_id: str, gpu: str, decoding: int, waiting_prompt: int = 0, **changes: object) -> EngineLoad:
    requests = tuple(DecodingRequest(f"{engine_id}-{i}", 500 + 100 * i, 300) for i in range(decoding))
    fields = {
        "engine_id": engine_id,
        "model": "llama-3-8b",
        "cost": cost(gpu),
        "block_size": 16,
        "free_blocks": 1000,
        "total_blocks": 2000,
        "waiting_prompt_tokens": waiting_prompt,
        "waiting_blocks": -(-waiting_prompt // 16),
        "waiting_output_tokens": 200 if waiting_prompt else 0,
        "decoding": requests,
    }
    fields.update(changes)
    return EngineLoad(**fields)  # type: ignore[arg-type]


def test_the_most_loaded_engine_gives_its_shortest_context_to_the_least_loaded() -> None:
    controller = MigrationController("drain_time", max_moves=1)
    moves = controller.decide(
        [
            load("l4-0", "l4", 20, waiting_prompt=4000),
            load("h100-0", "h100-80g", 2),
            load("a100-0", "a100-80g", 6),
        ]
    )
    assert [(m.source, m.destination, m.request_id) for m in moves] == [("l4-0", "h100-0", "l4-0-0")]
    assert moves[0].copy is not None and moves[0].reason == "load"


def test_no_move_when_balanced_across_models_or_when_nothing_waits() -> None:
    controller = MigrationController("drain_time")
    assert controller.decide([load("a", "h100-80g", 4), load("b", "h100-80g", 4)]) == []
    other = load("b", "h100-80g", 0, model="llama-3-70b")
    assert controller.decide([load("a", "l4", 30, waiting_prompt=4000), other]) == []
    # a long drain but no queue: moving decodes starts no request sooner
    assert controller.decide([load("a", "l4", 30), load("b", "h100-80g", 0)]) == []


def test_moves_never_flip_the_pair() -> None:
    controller = MigrationController("drain_time", max_moves=50)
    loads = [load("l4-0", "l4", 12, waiting_prompt=2000), load("h100-0", "h100-80g", 0)]
    moves = controller.decide(loads)
    source, destination = loads
    for move in moves:
        request = next(r for r in source.decoding if r.request_id == move.request_id)
        source, destination = source.without(request), destination.with_request(request)
    assert moves and source.drain_s() >= destination.drain_s()


def test_a_draining_engine_moves_its_requests_out_whatever_its_load() -> None:
    controller = MigrationController("drain_time", max_moves=10)
    moves = controller.decide([load("h100-0", "h100-80g", 3, draining=True), load("l4-0", "l4", 5)])
    assert {m.reason for m in moves} == {"drain"} and len(moves) == 3
    assert {m.destination for m in moves} == {"l4-0"}


def test_requests_in_an_urgent_requests_way_move_least_urgent_first() -> None:
    running = tuple(
        DecodingRequest(f"r{i}", context, 300, priority=priority)
        for i, (context, priority) in enumerate(((1500, 5), (1600, 0), (1600, 9), (1600, 5)))
    )

    def engine(free_blocks: int, head: WaitingHead) -> EngineLoad:
        return replace(load("l4-0", "l4", 0, free_blocks=free_blocks, waiting_head=head), decoding=running)

    # the next request to admit (priority 0) needs 250 blocks; 60 are free; a move frees 94 or 100
    busy = engine(60, WaitingHead(0, 250))
    for policy in MIGRATION_POLICIES:
        moves = MigrationController(policy, max_moves=10).decide([busy, load("h100-0", "h100-80g", 0)])
        room = [move for move in moves if move.reason == "priority"]
        # least urgent first (9, then the shorter of the two 5s), and only as many as the head needs
        assert [move.request_id for move in room] == ["r2", "r0"], policy
        assert all(move.destination == "h100-0" for move in moves)
        assert "r1" not in {move.request_id for move in moves if move.reason == "priority"}
    # a head that fits, or is no more urgent than what runs, moves nothing for priority
    for quiet in (engine(300, WaitingHead(0, 250)), engine(60, WaitingHead(9, 250))):
        moves = MigrationController("drain_time", max_moves=10).decide([quiet, load("h100-0", "h100-80g", 0)])
        assert not [move for move in moves if move.reason == "priority"]


def test_freeness_is_llumnix_free_blocks_per_request() -> None:
    engine = load("a", "l4", 4, free_blocks=100, waiting_prompt=320)
    assert engine.freeness() == (100 - 20) / 4
    moves = MigrationController("freeness").decide([engine, load("b", "l4", 1, free_blocks=900)])
    assert moves and moves[0].source == "a"


def test_the_controller_reads_the_engine_model() -> None:
    engine = decoding_engine("l4", 3)
    snapshot = engine_load("l4-0", "llama-3-8b", engine)
    assert (
        snapshot.batch == 3 and snapshot.drain_s() > 0 and snapshot.free_blocks == engine.kv.num_free_blocks
    )


def test_a_load_crosses_the_wire_unchanged_and_only_movable_requests_move() -> None:
    engine = decoding_engine("l4", 3)
    engine.add_request(EngineRequest("queued", range(3000), 10, 2.0, unique_prompt=True), 2.0)
    snapshot = engine_load("l4-0", "llama-3-8b", engine)
    wire = orjson.loads(orjson.dumps(snapshot.to_wire()))  # as the engine sends it and the gateway reads it
    assert EngineLoad.from_wire("l4-0", "llama-3-8b", snapshot.cost, wire) == snapshot
    pinned = EngineLoad.from_wire(
        "l4-0", "llama-3-8b", snapshot.cost, wire, movable=lambda request_id: request_id == "r2"
    )
    controller = MigrationController("drain_time", max_moves=3)
    moves = controller.decide([pinned, load("h100-0", "h100-80g", 0)])
    assert [move.request_id for move in moves] == ["r2"]
    with pytest.raises(InputError, match="engine l4-0 sent a malformed load"):
        EngineLoad.from_wire("l4-0", "llama-3-8b", snapshot.cost, {**wire, "decoding": [["r0", 1]]})


def test_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown migration policy"):
        MigrationController("nope")  # type: ignore[arg-type]


def test_the_simulator_migrates_and_loses_no_request() -> None:
    config = FleetConfig.model_validate(
        {
            "engines": [
                {"name": "h100", "gpu": "h100-80g", "model": "llama-3-8b"},
                {"name": "l4", "gpu": "l4", "model": "llama-3-8b", "replicas": 2},
            ],
            "router": {"policy": "round_robin"},
            "migration": {"policy": "drain_time", "interval_s": 0.5},
        }
    )
    trace = [TraceRequest(timestamp_ms=i * 40.0, input_length=1500, output_length=300) for i in range(300)]
    result = simulate(config, trace, None)
    summary = result.summary
    assert summary["completed"] == 300 and summary["failed"] == 0
    migrations = summary["migrations"]
    assert migrations["count"] > 0 and migrations["by_reason"] == {"load": migrations["count"]}
    assert summary["migrated_kv_gb"] > 0 and summary["migration_downtime_ms"]["p99"] > 0
    # every request produced exactly its tokens, wherever it finished
    assert list(result.requests.output_tokens) == [300] * 300
    plain = simulate(
        config.model_copy(update={"migration": config.migration.model_copy(update={"policy": "none"})}),
        trace,
        None,
    )
    assert "migrations" not in plain.summary
    assert summary["ttft_ms"]["p99"] < plain.summary["ttft_ms"]["p99"]
