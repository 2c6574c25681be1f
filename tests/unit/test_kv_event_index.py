from __future__ import annotations

import random

import msgpack
import pytest

from fleetserve.engines.emulator.kv_events import encode_batch
from fleetserve.fleet.kv_events import EventFormatError, decode_batch, decode_event
from fleetserve.model.engine import EngineModel
from fleetserve.model.kvcache import hash_prompt_blocks
from fleetserve.model.scheduler import SchedulerConfig
from fleetserve.model.types import AllBlocksCleared, BlockRemoved, BlockStored, EngineRequest
from fleetserve.routing.kv_event_index import KVEventIndexer
from fleetserve.routing.prefix_index import PrefixIndex

BLOCK = 4


def stored(tokens: list[int], engine_hashes: list[int], parent: int | None = None, lora: str | None = None):
    return BlockStored(tuple(engine_hashes), parent, tuple(tokens), BLOCK, lora_name=lora)


def ours(tokens: list[int], lora: str | None = None) -> list[int]:
    return hash_prompt_blocks(tokens, BLOCK, lora)


def test_stored_blocks_are_rehashed_with_the_routers_hash() -> None:
    indexer = KVEventIndexer(PrefixIndex())
    prompt = list(range(12))
    # the engine names blocks its own way (here 101, 102, 103) and stores them in two events
    indexer.apply("e", stored(prompt[:8], [101, 102]), now=0.0)
    indexer.apply("e", stored(prompt[8:], [103], parent=102), now=0.0)
    assert indexer.index.match(ours(prompt)) == {"e": 3}
    assert indexer.index.match(ours(prompt, lora="x")) == {}  # an adapter's blocks differ


def test_removed_and_cleared() -> None:
    indexer = KVEventIndexer(PrefixIndex())
    prompt = list(range(12))
    indexer.apply("e", stored(prompt, [1, 2, 3]), now=0.0)
    indexer.apply("f", stored(prompt, [1, 2, 3]), now=0.0)
    indexer.apply("e", BlockRemoved((3, 999)), now=0.0)  # an unknown hash is ignored
    assert indexer.index.match(ours(prompt)) == {"e": 2, "f": 3}
    indexer.apply("f", AllBlocksCleared(), now=0.0)
    assert indexer.index.match(ours(prompt)) == {"e": 2}


def test_sequence_gap_is_refused_and_replay_fills_it() -> None:
    indexer = KVEventIndexer(PrefixIndex())
    a, b, c = list(range(4)), list(range(4, 8)), list(range(8, 12))
    assert indexer.apply_batch("e", 5, [stored(a, [1])], now=0.0)  # the first batch sets the sequence
    assert indexer.expected_seq("e") == 6
    assert not indexer.apply_batch("e", 7, [stored(c, [3])], now=0.0)  # 6 is missing
    assert indexer.index.match(ours(c)) == {}  # nothing of the refused batch was applied
    assert indexer.expected_seq("e") == 6
    # replay from 6: the missing batch, then the one that was refused
    assert indexer.apply_batch("e", 6, [stored(b, [2])], now=0.0)
    assert indexer.apply_batch("e", 7, [stored(c, [3])], now=0.0)
    # a replay overlapping what arrived is ignored, even when it would change things
    assert indexer.apply_batch("e", 6, [BlockRemoved((2,))], now=0.0)
    assert indexer.expected_seq("e") == 8
    assert {tuple(t): indexer.index.match(ours(t)) for t in (a, b, c)} == {
        tuple(a): {"e": 1},
        tuple(b): {"e": 1},
        tuple(c): {"e": 1},
    }


def test_reset_engine_forgets_blocks_and_sequence() -> None:
    indexer = KVEventIndexer(PrefixIndex())
    indexer.apply_batch("e", 0, [stored(list(range(8)), [1, 2])], now=0.0)
    indexer.apply_batch("f", 0, [stored(list(range(8)), [1, 2])], now=0.0)
    indexer.reset_engine("e")
    assert indexer.expected_seq("e") is None
    assert indexer.index.match(ours(list(range(8)))) == {"f": 2}
    assert indexer.apply_batch("e", 40, [stored(list(range(4)), [1])], now=0.0)  # accepted as is
    assert indexer.index.match(ours(list(range(8)))) == {"e": 1, "f": 2}


def test_index_agrees_with_an_engine_models_own_kv_events() -> None:
    """Drive a real engine model with shared-prefix requests and a cache small enough to evict; after
    every step, the indexer fed with its events must hold exactly the engine's cached blocks."""
    engine = EngineModel.build("l4", "llama-3-8b", config=SchedulerConfig(block_size=16, max_num_seqs=8))
    engine = EngineModel(engine.cost, engine.config, num_gpu_blocks=96)
    indexer = KVEventIndexer(PrefixIndex())
    rng = random.Random(3)
    systems = [[s * 1000 + t for t in range(16 * 4)] for s in range(4)]  # four 4-block system prompts
    prompts = []
    now, seq, evictions = 0.0, 0, 0
    for i in range(60):
        prompt = systems[rng.randrange(4)] + [rng.randrange(50_000) for _ in range(rng.randrange(8, 70))]
        prompts.append(prompt)
        engine.add_request(
            EngineRequest(str(i), prompt, output_len=rng.randrange(1, 20), arrival_time=now), now
        )
        for _ in range(rng.randrange(1, 6)):
            when = engine.next_event_time()
            if when is None:
                break
            now = when
            result = engine.step(now)
            if result.kv_events:
                assert indexer.apply_batch("engine", seq, result.kv_events, now)
                seq += 1
                evictions += sum(isinstance(event, BlockRemoved) for event in result.kv_events)
            check_agreement(engine, indexer, prompts)
    while (when := engine.next_event_time()) is not None:
        now = when
        result = engine.step(now)
        if result.kv_events:
            assert indexer.apply_batch("engine", seq, result.kv_events, now)
            seq += 1
    check_agreement(engine, indexer, prompts)
    assert seq > 10 and evictions > 0  # the cache was small enough to evict, so removals were mirrored


def check_agreement(engine: EngineModel, indexer: KVEventIndexer, prompts: list[list[int]]) -> None:
    cached = set(engine.kv.cached_ref_counts())
    assert indexer.index.engine_blocks("engine") == len(cached)
    for prompt in prompts:
        hashes = hash_prompt_blocks(prompt, 16)
        expected = engine.kv.count_cached_prefix(hashes, len(hashes))
        assert indexer.index.match(hashes).get("engine", 0) == expected


# ---- the wire format (fleet/kv_events.py) ----------------------------------------------------------


def test_decoder_reads_every_vllm_event_layout() -> None:
    tokens = list(range(8))
    expected = BlockStored((11, 12), 10, tuple(tokens), 4, lora_id=7, medium="GPU", lora_name="ad")
    older = ["BlockStored", [11, 12], 10, tokens, 4, 7, "GPU"]  # before lora_name existed
    current = [*older, "ad"]
    newer = [*current, None, {"extra": 1}]  # fields added after lora_name are ignored
    as_map = {"type": "BlockStored", "block_hashes": [11, 12], "parent_block_hash": 10, "token_ids": tokens,
              "block_size": 4, "lora_id": 7, "medium": "GPU", "lora_name": "ad"}  # fmt: skip
    assert decode_event(current) == expected
    assert decode_event(newer) == expected
    assert decode_event(as_map) == expected
    assert decode_event(older) == BlockStored((11, 12), 10, tuple(tokens), 4, lora_id=7)
    assert decode_event(["BlockRemoved", [b"\x01\x02"], "GPU"]) == BlockRemoved((0x0102,))
    assert decode_event(["AllBlocksCleared"]) == AllBlocksCleared()
    assert decode_event(["SomethingNew", 1]) is None
    with pytest.raises(EventFormatError):
        decode_event(["BlockStored", [1]])
    with pytest.raises(EventFormatError):
        decode_event(42)


def test_decoder_reads_the_emulators_batches_in_both_formats() -> None:
    events = [
        BlockStored((1, 2), None, tuple(range(8)), 4, lora_name=None),
        BlockRemoved((1,)),
        AllBlocksCleared(),
    ]
    for event_format in ("array", "map"):
        assert decode_batch(encode_batch(events, ts=1.5, event_format=event_format)) == events
    assert decode_batch(msgpack.packb([1.0, []])) == []  # no data-parallel rank: older vLLM
    with pytest.raises(EventFormatError):
        decode_batch(b"\xc1")
    with pytest.raises(EventFormatError):
        decode_batch(msgpack.packb([1.0]))
