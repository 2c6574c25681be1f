"""Scheduling decisions: token budget, chunked prefill, queue order, preemption, LoRA slots."""

from __future__ import annotations

import random

import pytest

from fleetserve.config import EngineArgs
from fleetserve.model.catalog import default_catalog
from fleetserve.model.cost import CostModel
from fleetserve.model.engine import EngineModel
from fleetserve.model.kvcache import KVCacheManager
from fleetserve.model.lora import LoraManager
from fleetserve.model.scheduler import DecodeSet, Scheduler, SchedulerConfig, Seq
from fleetserve.model.types import EngineRequest


@pytest.fixture(scope="module")
def cost() -> CostModel:
    catalog = default_catalog()
    return CostModel(catalog.gpu("a100-80g"), catalog.model("llama-3-8b"))


def scheduler(num_blocks: int = 1000, load_time: float = 0.5, **config: object) -> Scheduler:
    cfg = SchedulerConfig(**config)
    lora = LoraManager(cfg.max_loras, cfg.max_cpu_loras, lambda size: load_time, 1000)
    return Scheduler(cfg, KVCacheManager(num_blocks, cfg.block_size), lora)


def request(request_id: str, prompt_len: int, output_len: int = 10, **fields: object) -> EngineRequest:
    offset = sum(map(ord, request_id))  # distinct prompts per request, the same in every run
    return EngineRequest(request_id, [offset + i for i in range(prompt_len)], output_len, 0.0, **fields)


def chunks(batch) -> list[tuple[str, int]]:
    return [(seq.request_id, chunk) for seq, chunk, _ in batch.prefills]


def test_config_from_engine_args_and_validation():
    args = EngineArgs(max_num_seqs=8, max_num_batched_tokens=64, scheduling_policy="priority")
    config = SchedulerConfig.from_args(args)
    assert config.max_num_seqs == 8 and config.scheduling_policy == "priority"
    assert SchedulerConfig.from_args(EngineArgs()) == SchedulerConfig()
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=32)


def test_long_prompt_is_chunked_by_the_token_budget():
    sched = scheduler(max_num_seqs=4, max_num_batched_tokens=100)
    sched.add(request("long", 250))
    sched.add(request("short", 30))
    assert chunks(sched.schedule(0.0)) == [("long", 100)]
    sched.complete()
    assert chunks(sched.schedule(0.0)) == [("long", 100)]
    sched.complete()
    # the rest of the long prompt, then the short one in the budget left
    assert chunks(sched.schedule(0.0)) == [("long", 50), ("short", 30)]
    done = sched.complete()
    assert [seq.request_id for seq in done.sampled] == ["long", "short"]
    batch = sched.schedule(0.0)
    assert batch.num_decode == 2 and batch.prefills == []
    assert batch.decode_context == 251 + 31


def test_decode_tokens_come_out_of_the_budget():
    sched = scheduler(max_num_seqs=4, max_num_batched_tokens=64)
    sched.add(request("a", 10))
    sched.schedule(0.0)
    sched.complete()
    sched.add(request("b", 100))
    batch = sched.schedule(0.0)
    assert batch.num_decode == 1 and chunks(batch) == [("b", 63)]


def test_without_chunked_prefill_a_prompt_waits_for_a_whole_budget():
    sched = scheduler(max_num_seqs=4, max_num_batched_tokens=64, enable_chunked_prefill=False)
    sched.add(request("a", 40))
    sched.add(request("b", 40))
    assert chunks(sched.schedule(0.0)) == [("a", 40)]


def test_max_num_seqs_caps_the_batch():
    sched = scheduler(max_num_seqs=2, max_num_batched_tokens=512)
    for name in "abc":
        sched.add(request(name, 10))
    assert [name for name, _ in chunks(sched.schedule(0.0))] == ["a", "b"]
    assert len(sched.waiting) == 1


def test_priority_policy_orders_by_priority_then_arrival():
    sched = scheduler(max_num_seqs=2, max_num_batched_tokens=512, scheduling_policy="priority")
    sched.add(request("low", 10, priority=5))
    sched.add(request("high", 10, priority=0))
    sched.add(request("high-later", 10, priority=0))
    assert [name for name, _ in chunks(sched.schedule(0.0))] == ["high", "high-later"]


def test_fcfs_ignores_priority():
    sched = scheduler(max_num_seqs=1, max_num_batched_tokens=512)
    sched.add(request("first", 10, priority=5))
    sched.add(request("second", 10, priority=0))
    assert chunks(sched.schedule(0.0)) == [("first", 10)]


def test_preemption_takes_the_last_admitted_and_requeues_it_first():
    # 4 blocks of 16 tokens; two requests of 30 tokens take 2 blocks each, then grow
    sched = scheduler(num_blocks=4, max_num_seqs=4, max_num_batched_tokens=64)
    sched.add(request("a", 30, output_len=20))
    sched.add(request("b", 30, output_len=20))
    sched.add(request("c", 5, output_len=5))
    assert [name for name, _ in chunks(sched.schedule(0.0))] == ["a", "b"]
    sched.complete()
    preempted = []
    for _ in range(5):
        batch = sched.schedule(0.0)
        preempted += [seq.request_id for seq in batch.preempted]
        sched.complete()
        if preempted:
            break
    assert preempted == ["b"]
    assert sched.waiting.peek().request_id == "b"  # ahead of c, which arrived later
    assert sched.num_preemptions == 1
    # 30 prompt + 3 generated tokens need a third block each; b keeps its tokens and recomputes them
    assert sched.requests["b"].num_output == 3 and sched.requests["b"].num_computed == 0


def test_priority_preemption_takes_the_lowest_priority():
    sched = scheduler(num_blocks=4, max_num_seqs=4, max_num_batched_tokens=64, scheduling_policy="priority")
    sched.add(request("urgent-late", 30, output_len=20, priority=0))
    sched.add(request("relaxed", 30, output_len=20, priority=9))
    sched.schedule(0.0)
    sched.complete()
    preempted = []
    while not preempted:
        preempted = [seq.request_id for seq in sched.schedule(0.0).preempted]
        sched.complete()
    assert preempted == ["relaxed"]


def test_adapter_waits_for_its_load():
    sched = scheduler(max_loras=1, load_time=0.5)
    sched.add(request("a", 10, adapter="x"))
    assert sched.schedule(0.0).empty  # load started
    assert sched.lora.next_load_completion() == 0.5
    sched.lora.complete_loads(0.5)
    assert chunks(sched.schedule(0.5)) == [("a", 10)]


def test_a_batch_never_mixes_more_adapters_than_slots():
    sched = scheduler(max_loras=1, load_time=0.5)
    sched.add(request("x1", 10, adapter="x"))
    sched.add(request("y1", 10, adapter="y"))
    sched.add(request("x2", 10, adapter="x"))
    assert sched.schedule(0.0).empty  # starts the load of x; y finds no free slot
    sched.lora.complete_loads(0.5)
    # y is skipped, x2 behind it runs with x1
    assert [name for name, _ in chunks(sched.schedule(0.5))] == ["x1", "x2"]
    assert sched.lora.gpu_names == ["x"]
    assert sched.waiting.peek().request_id == "y1"


def test_idle_adapter_slot_is_reused_lru(cost):
    engine = EngineModel(cost, SchedulerConfig(max_loras=1, max_cpu_loras=2))
    engine.load_adapter("x", 0.0)
    engine.load_adapter("y", 0.0)
    assert engine.adapters == ["x", "y"]
    engine.add_request(EngineRequest("a", [1] * 10, 2, 0.0, adapter="x"), 0.0)
    engine.add_request(EngineRequest("b", [2] * 10, 2, 0.0, adapter="y"), 0.0)
    done = {}
    while (when := engine.next_event_time()) is not None:
        for out in engine.step(when).outputs:
            if out.finished:
                done[out.request_id] = out.last_token_time
    assert done["a"] < done["b"]  # y loads only after x's request left the slot
    engine.load_adapter("z", 10.0)  # host cache holds two: the least recently used idle one goes
    assert len(engine.adapters) == 2 and "z" in engine.adapters
    with pytest.raises(ValueError):
        EngineModel(cost, SchedulerConfig(max_loras=0)).load_adapter("x", 0.0)


def test_unknown_adapter_is_loaded_on_demand(cost):
    engine = EngineModel(cost)
    engine.add_request(EngineRequest("a", [1] * 10, 1, 0.0, adapter="fresh"), 0.0)
    engine.step(0.0)
    load_done = engine.next_event_time()
    assert load_done == pytest.approx(cost.lora_load_time(engine.lora.default_size_bytes))
    assert engine.metrics.waiting_lora_adapters == ("fresh",)
    engine.step(load_done)
    assert engine.metrics.running_lora_adapters == ("fresh",)


def test_blocks_needed_over_sums_the_phases_it_crosses():
    """The block count of a skipped run is the sum of the per-iteration counts, wrapping around the
    phase buckets (checked against iterating over every clock)."""
    rng = random.Random(3)
    for block_size in (1, 4, 16):
        decode = DecodeSet(block_size)
        for i in range(rng.randrange(1, 30)):
            seq = Seq(request(f"r{i}", 10, output_len=1000), i, [], False)
            seq.num_computed = rng.randrange(200)  # members join at every phase, some phases twice
            decode.enter(seq)
        for first in range(3 * block_size):
            for count in range(4 * block_size):
                expected = sum(decode.blocks_needed(first + offset) for offset in range(count))
                assert decode.blocks_needed_over(first, count) == expected
