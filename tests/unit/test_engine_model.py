"""The engine model end to end: property tests over random workloads, time semantics, metrics."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field, replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetserve.model.catalog import default_catalog
from fleetserve.model.cost import CostModel
from fleetserve.model.engine import EngineModel, RequestRejected
from fleetserve.model.kvcache import hash_prompt_blocks
from fleetserve.model.scheduler import SchedulerConfig
from fleetserve.model.types import EngineRequest, StepResult

COST = CostModel(default_catalog().gpu("a100-80g"), default_catalog().model("llama-3-8b"))


@pytest.fixture(scope="module")
def cost() -> CostModel:
    return COST


@dataclass
class Seen:
    """What the outputs said about one request."""

    tokens: int = 0
    first: float | None = None
    last: float | None = None
    finished: bool = False
    cached: int = 0
    outputs: int = 0


@dataclass
class Run:
    seen: dict[str, Seen] = field(default_factory=dict)
    preempted: int = 0

    def absorb(self, result: StepResult) -> None:
        self.preempted += len(result.preempted)
        for out in result.outputs:
            seen = self.seen.setdefault(out.request_id, Seen())
            assert not seen.finished, "output after the request finished"
            assert out.num_tokens >= 1 and out.first_token_time <= out.last_token_time
            if seen.first is None:
                seen.first, seen.cached = out.first_token_time, out.num_cached_prompt_tokens
            else:
                assert out.first_token_time >= seen.last
            seen.tokens += out.num_tokens
            seen.last = out.last_token_time
            seen.finished = out.finished
            seen.outputs += 1


def check_invariants(engine: EngineModel) -> None:
    """Every block is accounted for: running requests' private blocks plus the cached blocks they share
    == blocks in use, and each cached block's reference count == the running requests that hold it."""
    scheduler, kv = engine.scheduler, engine.kv
    holders = Counter(block for seq in scheduler.running.values() for block in seq.cached_hashes)
    private = sum(scheduler.blocks_held(seq) - len(seq.cached_hashes) for seq in scheduler.running.values())
    assert private + len(holders) == kv.num_used_blocks
    for block, count in kv.cached_ref_counts().items():
        assert count == holders.get(block, 0)
    assert set(holders) <= set(kv.cached_ref_counts())
    assert 0 <= kv.num_free_blocks <= kv.num_blocks
    assert scheduler.num_running <= engine.config.max_num_seqs
    adapters = {seq.adapter for seq in scheduler.running.values() if seq.adapter is not None}
    assert len(adapters) <= max(engine.config.max_loras, 0)


def make_requests(seed: int, count: int, shared: int, adapters: int = 0) -> list[EngineRequest]:
    rng = random.Random(seed)
    prefixes = [[rng.randrange(1000) for _ in range(rng.randint(16, 96))] for _ in range(3)]
    time = 0.0
    requests = []
    for index in range(count):
        time += rng.expovariate(20.0)
        prompt = [rng.randrange(1000) for _ in range(rng.randint(1, 120))]
        if rng.random() < shared / 10:
            prompt = prefixes[rng.randrange(3)] + prompt
        adapter = f"lora-{rng.randrange(adapters)}" if adapters and rng.random() < 0.6 else None
        requests.append(
            EngineRequest(
                f"r{index}",
                prompt,
                rng.randint(1, 60),
                time,
                adapter=adapter,
                priority=rng.randrange(3),
            )
        )
    return requests


def drive(engine: EngineModel, requests: list[EngineRequest], mode: str = "step", check: bool = False) -> Run:
    """Feed arrivals at their times and run the engine until idle."""
    run = Run()
    pending = list(requests)
    for _ in range(200_000):
        event = engine.next_event_time()
        arrival = pending[0].arrival_time if pending else None
        if event is None and arrival is None:
            break
        if arrival is not None and (event is None or arrival <= event):
            if mode == "advance":
                run.absorb(engine.advance(arrival))
            engine.add_request(pending.pop(0), arrival)
        else:
            run.absorb(engine.step(event) if mode == "step" else engine.advance(event))
        if check:
            check_invariants(engine)
    else:
        pytest.fail("the engine did not become idle")
    return run


def small_engine(num_blocks: int, policy: str = "fcfs", every: bool = True, **config: object) -> EngineModel:
    cfg = SchedulerConfig(
        max_num_seqs=8, max_num_batched_tokens=96, scheduling_policy=policy, max_loras=2, **config
    )
    return EngineModel(COST, cfg, num_gpu_blocks=num_blocks, report_every_token=every)


workloads = st.tuples(
    st.integers(0, 10_000),  # seed
    st.integers(1, 40),  # requests
    st.integers(0, 10),  # share of prompts with a common prefix, tenths
    st.sampled_from([18, 40, 400]),  # KV blocks: starved (one longest request), tight, roomy
    st.sampled_from(["fcfs", "priority"]),
    st.integers(0, 3),  # adapters in use
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads)
def test_every_request_finishes_and_no_block_leaks(workload):
    seed, count, shared, blocks, policy, adapters = workload
    engine = small_engine(blocks, policy)
    requests = make_requests(seed, count, shared, adapters)
    run = drive(engine, requests, check=True)
    for request in requests:
        seen = run.seen[request.request_id]
        assert seen.finished and seen.tokens == request.output_len
        assert request.arrival_time <= seen.first <= seen.last  # TTFT <= E2E
    kv = engine.kv
    assert kv.num_free_blocks == kv.num_blocks
    assert all(count == 0 for count in kv.cached_ref_counts().values())
    assert engine.metrics.num_running == engine.metrics.num_waiting == 0
    assert engine.next_event_time() is None
    assert engine.metrics.num_preemptions == run.preempted


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads, st.booleans())
def test_advance_matches_stepping(workload, every_token):
    seed, count, shared, blocks, policy, adapters = workload
    requests = make_requests(seed, count, shared, adapters)
    stepped = drive(small_engine(blocks, policy), requests).seen
    engine = small_engine(blocks, policy, every=every_token)
    advanced = drive(engine, requests, mode="advance").seen
    assert stepped.keys() == advanced.keys()
    for request_id, want in stepped.items():
        got = advanced[request_id]
        assert got.tokens == want.tokens and got.finished
        assert got.first == pytest.approx(want.first, rel=1e-9, abs=1e-9)
        assert got.last == pytest.approx(want.last, rel=1e-9, abs=1e-9)
        assert got.cached == want.cached
    if not every_token:
        # quiet mode: a request appears with its first token and when it finishes, and after a preemption
        assert all(seen.outputs <= 2 + engine.metrics.num_preemptions for seen in advanced.values())


def test_skip_ahead_collapses_many_decode_iterations(cost):
    engine = EngineModel(cost, report_every_token=False)
    for index in range(64):
        engine.add_request(EngineRequest(f"r{index}", list(range(index, index + 100)), 500, 0.0), 0.0)
    result = engine.advance(1e6)
    finished = [out for out in result.outputs if out.finished]
    assert len(finished) == 64 and all(out.num_tokens == 499 for out in finished)
    assert result.iterations >= 500
    assert len(result.outputs) == 128  # a first token and a final output each, not one per iteration


def test_repeated_prefix_hits_the_cache(cost):
    engine = EngineModel(cost)
    prompt = list(range(200))
    engine.add_request(EngineRequest("a", prompt, 4, 0.0), 0.0)
    first = drive(engine, []).seen["a"]
    assert first.cached == 0
    engine.add_request(EngineRequest("b", [*prompt, 7, 8], 4, 10.0), 10.0)
    second = drive(engine, []).seen["b"]
    assert second.cached == 192  # 12 full blocks of 16
    metrics = engine.metrics
    assert metrics.prefix_cache_queries == 402 and metrics.prefix_cache_hits == 192
    # a hit makes the first token come sooner
    assert second.first - 10.0 < first.first


def test_fully_cached_prompt_recomputes_its_last_block(cost):
    engine = EngineModel(cost)
    prompt = list(range(64))
    for index, start in enumerate((0.0, 5.0)):
        engine.add_request(EngineRequest(f"r{index}", prompt, 2, start), start)
        drive(engine, [])
    assert engine.metrics.prefix_cache_hits == 48  # 3 of 4 blocks: the last token must be computed


def test_adapter_changes_the_prefix_hash(cost):
    engine = EngineModel(cost)
    prompt = list(range(64))
    engine.add_request(EngineRequest("a", prompt, 2, 0.0, adapter="x"), 0.0)
    drive(engine, [])
    engine.add_request(EngineRequest("b", prompt, 2, 1.0), 1.0)
    drive(engine, [])
    assert engine.metrics.prefix_cache_hits == 0


def test_kv_events_report_stored_and_removed_blocks(cost):
    engine = EngineModel(cost, num_gpu_blocks=6)
    events = []
    engine.add_request(EngineRequest("a", list(range(64)), 1, 0.0), 0.0)
    while (when := engine.next_event_time()) is not None:
        events += engine.step(when).kv_events
    stored = [event for event in events if type(event).__name__ == "BlockStored"]
    assert sum(len(event.block_hashes) for event in stored) == 4
    engine.add_request(EngineRequest("b", list(range(500, 580)), 1, 1.0), 1.0)
    while (when := engine.next_event_time()) is not None:
        events += engine.step(when).kv_events
    removed = [event for event in events if type(event).__name__ == "BlockRemoved"]
    assert removed and sum(len(event.block_hashes) for event in removed) >= 3


def test_time_semantics(cost):
    engine = EngineModel(cost)
    assert engine.next_event_time() is None
    engine.add_request(EngineRequest("a", list(range(100)), 3, 2.0), 2.0)
    assert engine.next_event_time() == 2.0
    first = engine.step(2.0)
    assert first.outputs == [] and first.iterations == 0
    end = engine.next_event_time()
    assert end > 2.0
    assert engine.step((2.0 + end) / 2).outputs == []  # the iteration has not ended yet
    late = end + 1.0
    result = engine.step(late)
    (output,) = result.outputs
    assert output.first_token_time == end  # stamped with the iteration's end, not the late step
    assert engine.next_event_time() > late  # the next iteration started at the step
    while (when := engine.next_event_time()) is not None:
        engine.step(when)
    assert engine.idle


def test_rejections(cost):
    engine = EngineModel(cost, num_gpu_blocks=10)
    with pytest.raises(RequestRejected, match="maximum context length"):
        engine.add_request(EngineRequest("a", [1] * 8000, 500, 0.0), 0.0)
    with pytest.raises(RequestRejected, match="never fit"):
        engine.add_request(EngineRequest("b", [1] * 150, 20, 0.0), 0.0)
    with pytest.raises(RequestRejected, match="at least one"):
        engine.add_request(EngineRequest("c", [], 5, 0.0), 0.0)
    engine.add_request(EngineRequest("d", [1] * 10, 5, 0.0), 0.0)
    with pytest.raises(RequestRejected, match="already in use"):
        engine.add_request(EngineRequest("d", [1] * 10, 5, 0.0), 0.0)
    no_lora = EngineModel(cost, SchedulerConfig(max_loras=0))
    with pytest.raises(RequestRejected, match="LoRA is disabled"):
        no_lora.add_request(EngineRequest("e", [1], 1, 0.0, adapter="x"), 0.0)
    no_chunking = EngineModel(cost, SchedulerConfig(enable_chunked_prefill=False, max_num_batched_tokens=512))
    with pytest.raises(RequestRejected, match="chunked prefill"):
        no_chunking.add_request(EngineRequest("f", [1] * 600, 1, 0.0), 0.0)


def test_abort_frees_blocks_and_is_idempotent(cost):
    engine = EngineModel(cost)
    engine.add_request(EngineRequest("a", list(range(300)), 50, 0.0), 0.0)
    engine.add_request(EngineRequest("b", list(range(300, 400)), 50, 0.0), 0.0)
    engine.step(0.0)
    engine.step(engine.next_event_time())
    engine.abort_request("a", 1.0)
    engine.abort_request("a", 1.0)
    engine.abort_request("unknown", 1.0)
    run = drive(engine, [])
    assert "a" not in run.seen or not run.seen["a"].finished
    assert run.seen["b"].finished
    assert engine.kv.num_free_blocks == engine.kv.num_blocks


def test_predict_ttft_grows_with_the_queue_and_shrinks_with_hits(cost):
    engine = EngineModel(cost)
    empty = engine.predict_ttft(2000)
    assert empty == pytest.approx(cost.prefill_time(2000), rel=0.05)
    assert engine.predict_ttft(2000, cached_tokens=1600) < empty
    for index in range(10):
        engine.add_request(EngineRequest(f"r{index}", [index] * 3000, 10, 0.0), 0.0)
    engine.step(0.0)
    loaded = engine.predict_ttft(2000, now=0.0)
    assert loaded > 3 * empty


def test_metrics_track_running_waiting_and_usage(cost):
    engine = EngineModel(cost, SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=64))
    for index in range(5):
        engine.add_request(EngineRequest(f"r{index}", [index] * 20, 30, 0.0), 0.0)
    assert engine.metrics.num_waiting == 5
    engine.step(0.0)
    metrics = engine.metrics
    assert metrics.num_running == 2 and metrics.num_waiting == 3
    assert 0 < metrics.kv_usage < 1 and metrics.block_size == 16
    assert metrics.num_gpu_blocks == cost.num_kv_blocks(16, 0.9)


def test_build_from_catalog_names():
    engine = EngineModel.build("h100-80g", "llama-3-8b", config=SchedulerConfig(block_size=32))
    assert engine.metrics.block_size == 32 and engine.metrics.num_gpu_blocks > 1000


def mark_unique(requests: list[EngineRequest]) -> list[EngineRequest]:
    """The same requests, flagged `unique_prompt` when no other request's prompt shares a full block."""
    hashes = {r.request_id: hash_prompt_blocks(r.prompt_token_ids, 16, r.adapter) for r in requests}
    owners = Counter(block for blocks in hashes.values() for block in set(blocks))
    return [
        replace(r, unique_prompt=all(owners[block] == 1 for block in hashes[r.request_id])) for r in requests
    ]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads, st.sampled_from(["step", "advance"]), st.booleans())
def test_unique_prompts_behave_exactly_like_hashed_ones(workload, mode, every_token):
    """Caching a unique prompt without hashes changes nothing observable: same outputs and times, same
    preemptions and prefix-cache counts (including a preempted request finding its own blocks), and no
    block leaks."""
    seed, count, shared, blocks, policy, adapters = workload
    requests = make_requests(seed, count, shared, adapters)
    hashed_engine = small_engine(blocks, policy, every=every_token)
    hashed = drive(hashed_engine, requests, mode=mode)
    unique_engine = small_engine(blocks, policy, every=every_token)
    unique = drive(unique_engine, mark_unique(requests), mode=mode, check=True)
    assert unique.seen == hashed.seen
    assert unique.preempted == hashed.preempted
    assert unique_engine.kv.stats == hashed_engine.kv.stats
    kv = unique_engine.kv
    assert kv.num_free_blocks == kv.num_blocks
    assert all(count == 0 for count in kv.cached_ref_counts().values())


def test_preempted_unique_prompt_hits_its_own_blocks(cost):
    # two long requests that cannot both finish in 40 blocks: one is preempted and recomputes
    engine = small_engine(40)
    for name in ("a", "b"):
        prompt = [ord(name), *range(200)]
        engine.add_request(EngineRequest(name, prompt, 300, 0.0, unique_prompt=True), 0.0)
    run = drive(engine, [], check=True)
    assert run.preempted >= 1
    assert all(seen.finished and seen.tokens == 300 for seen in run.seen.values())
    assert engine.kv.stats.hits > 0  # the preempted request found its own prompt blocks again
    assert engine.kv.num_free_blocks == engine.kv.num_blocks


@pytest.mark.parametrize("chunked", [True, False])
def test_without_prefix_caching_long_prompts_run(chunked):
    """Regression: with enable_prefix_caching off, a prompt computed in several chunks raised IndexError."""
    engine = small_engine(400, enable_prefix_caching=False, enable_chunked_prefill=chunked)
    prompt_len = 300 if chunked else 90  # over the 96-token budget only with chunking
    requests = [EngineRequest(f"r{i}", list(range(i, i + prompt_len)), 5, 0.0) for i in range(3)]
    run = drive(engine, requests, check=True)
    assert all(run.seen[r.request_id].finished for r in requests)
    assert engine.kv.stats.queries == engine.kv.stats.hits == 0
    assert engine.kv.num_free_blocks == engine.kv.num_blocks
