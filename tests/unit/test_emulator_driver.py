"""The wall-clock driver: tokens arrive in order and on the model's schedule; aborts free blocks."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from fleetserve.engines.emulator.driver import EngineDriver, EngineFailed
from fleetserve.model.engine import EngineModel, RequestRejected
from fleetserve.model.types import EngineRequest, StepResult, TokenOutput

FAST = 0.01  # 100x faster than the model predicts


def engine() -> EngineModel:
    return EngineModel.build("h100-80g", "llama-3-8b")


def test_every_request_gets_exactly_its_tokens_in_time_order() -> None:
    async def scenario() -> dict[str, list[TokenOutput]]:
        driver = EngineDriver(engine(), time_scale=FAST)
        driver.start()
        outputs: dict[str, list[TokenOutput]] = {}
        done = {name: asyncio.get_running_loop().create_future() for name in ("a", "b", "c")}

        def sink_for(name: str) -> Callable[[TokenOutput | EngineFailed], None]:
            def sink(item: TokenOutput | EngineFailed) -> None:
                assert isinstance(item, TokenOutput)
                outputs.setdefault(name, []).append(item)
                if item.finished:
                    done[name].set_result(None)

            return sink

        for index, name in enumerate(done):
            driver.submit(
                EngineRequest(name, list(range(1000, 1100 + index * 50)), 40 + index, 0.0), sink_for(name)
            )
        await asyncio.wait_for(asyncio.gather(*done.values()), timeout=20)
        await driver.stop()
        return outputs

    outputs = asyncio.run(scenario())
    for index, name in enumerate(("a", "b", "c")):
        received = outputs[name]
        assert sum(output.num_tokens for output in received) == 40 + index
        assert received[-1].finished and not any(output.finished for output in received[:-1])
        times = [t for output in received for t in (output.first_token_time, output.last_token_time)]
        assert times == sorted(times)


def test_abort_frees_blocks_and_silences_the_request() -> None:
    async def scenario() -> tuple[int, float, int]:
        model = engine()
        driver = EngineDriver(model, time_scale=FAST)
        driver.start()
        received: list[TokenOutput | EngineFailed] = []
        first = asyncio.get_running_loop().create_future()

        def sink(item: TokenOutput | EngineFailed) -> None:
            received.append(item)
            if not first.done():
                first.set_result(None)

        driver.submit(EngineRequest("long", list(range(2000, 2300)), 5000, 0.0), sink)
        await asyncio.wait_for(first, timeout=20)
        driver.abort("long")
        count = len(received)
        usage = model.metrics.kv_usage
        # a follow-up request runs to completion, proving the heartbeat kept going past the abort
        finished = asyncio.get_running_loop().create_future()
        driver.submit(
            EngineRequest("next", [7, 8, 9], 3, 0.0),
            lambda item: (
                finished.set_result(None) if isinstance(item, TokenOutput) and item.finished else None
            ),
        )
        await asyncio.wait_for(finished, timeout=20)
        await driver.stop()
        return count, usage, len(received)

    count_at_abort, usage_after_abort, count_at_end = asyncio.run(scenario())
    assert usage_after_abort == 0
    assert count_at_end == count_at_abort  # nothing more for the aborted request


def test_rejected_requests_register_nothing() -> None:
    async def scenario() -> None:
        driver = EngineDriver(engine(), time_scale=FAST)
        driver.start()
        with pytest.raises(RequestRejected):
            driver.submit(EngineRequest("huge", [1] * 9000, 10, 0.0), lambda item: None)
        assert driver.engine.next_event_time() is None
        await driver.stop()

    asyncio.run(scenario())


class _BrokenEngine:
    """Accepts requests, then fails on its first iteration."""

    def __init__(self) -> None:
        self.pending = False

    def add_request(self, req: EngineRequest, now: float) -> None:
        self.pending = True

    def abort_request(self, request_id: str, now: float) -> None:
        pass

    def next_event_time(self) -> float | None:
        return 0.0 if self.pending else None

    def advance(self, until: float) -> StepResult:
        if self.pending:
            raise ZeroDivisionError("model bug")
        return StepResult()


def test_an_engine_failure_reaches_every_request() -> None:
    async def scenario() -> object:
        driver = EngineDriver(_BrokenEngine(), time_scale=FAST)
        driver.start()
        outcome = asyncio.get_running_loop().create_future()
        driver.submit(EngineRequest("x", [1], 1, 0.0), outcome.set_result)
        result = await asyncio.wait_for(outcome, timeout=5)
        with pytest.raises(EngineFailed):
            driver.submit(EngineRequest("y", [1], 1, 0.0), lambda item: None)
        await driver.stop()
        return result

    failure = asyncio.run(scenario())
    assert isinstance(failure, EngineFailed) and "model bug" in str(failure)
