"""serve.batcher.Batcher: batches formed when the model is free, in order, errors to every caller, no lost items."""

from __future__ import annotations

import asyncio

import pytest

from serve.batcher import Batcher


class SlowModel:
    """run_batch that records each batch and takes `seconds` (a forward pass), answering item * 10."""

    def __init__(self, seconds: float = 0.05, fail_on: int | None = None, wrong_count: bool = False):
        self.seconds, self.fail_on, self.wrong_count = seconds, fail_on, wrong_count
        self.batches: list[list[int]] = []

    async def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        await asyncio.sleep(self.seconds)
        if self.fail_on is not None and self.fail_on in items:
            raise ValueError(f"bad item {self.fail_on}")
        results = [item * 10 for item in items]
        return results[:-1] if self.wrong_count else results


def test_requests_that_arrive_during_a_pass_share_the_next_one():
    # @serve.batch (Ray 2.60) would cut these 20 into batches of whatever arrived per 10 ms window and queue
    # them; here they wait for the running pass and then go together.
    model = SlowModel(seconds=0.2)

    async def scenario():
        batcher = Batcher(model, max_batch_size=32, wait_s=0.001)
        first = asyncio.create_task(batcher.submit(0))
        await asyncio.sleep(0.02)  # the first pass is running
        late = []
        for item in range(1, 21):
            late.append(asyncio.create_task(batcher.submit(item)))
            await asyncio.sleep(0.005)  # trickling in, as requests do
        return await first, await asyncio.gather(*late)

    first, late = asyncio.run(scenario())
    assert first == 0 and late == [item * 10 for item in range(1, 21)]
    assert model.batches == [[0], list(range(1, 21))]


def test_batches_respect_max_batch_size_and_keep_every_item_in_order():
    model = SlowModel(seconds=0.01)

    async def scenario():
        batcher = Batcher(model, max_batch_size=4, wait_s=0.01)
        return await asyncio.gather(*(batcher.submit(item) for item in range(10)))

    assert asyncio.run(scenario()) == [item * 10 for item in range(10)]
    assert all(1 <= len(batch) <= 4 for batch in model.batches)
    assert sorted(item for batch in model.batches for item in batch) == list(range(10))


def test_max_batch_size_one_is_one_item_per_pass():
    model = SlowModel(seconds=0.005)

    async def scenario():
        batcher = Batcher(model, max_batch_size=1, wait_s=0.5)  # the wait never applies to a full batch
        return await asyncio.gather(*(batcher.submit(item) for item in range(5)))

    assert asyncio.run(scenario()) == [0, 10, 20, 30, 40]
    assert model.batches == [[0], [1], [2], [3], [4]]


def test_a_lone_request_waits_at_most_wait_s_for_company():
    model = SlowModel(seconds=0.0)

    async def scenario():
        batcher = Batcher(model, max_batch_size=8, wait_s=0.05)
        loop = asyncio.get_running_loop()
        started = loop.time()
        result = await batcher.submit(3)
        return result, loop.time() - started

    result, seconds = asyncio.run(scenario())
    assert result == 30 and model.batches == [[3]]
    assert 0.04 <= seconds < 1.0


def test_a_failed_batch_fails_its_callers_and_the_batcher_goes_on():
    model = SlowModel(seconds=0.01, fail_on=2)

    async def scenario():
        batcher = Batcher(model, max_batch_size=8, wait_s=0.02)
        failed = await asyncio.gather(*(batcher.submit(item) for item in (1, 2, 3)), return_exceptions=True)
        after = await batcher.submit(4)
        return failed, after

    failed, after = asyncio.run(scenario())
    assert all(isinstance(outcome, ValueError) and "bad item 2" in str(outcome) for outcome in failed)
    assert after == 40


def test_a_wrong_number_of_results_is_an_error_not_a_shifted_answer():
    model = SlowModel(seconds=0.0, wrong_count=True)

    async def scenario():
        batcher = Batcher(model, max_batch_size=8, wait_s=0.02)
        return await asyncio.gather(*(batcher.submit(item) for item in (1, 2)), return_exceptions=True)

    outcomes = asyncio.run(scenario())
    assert all(isinstance(outcome, RuntimeError) and "1 results for 2 items" in str(outcome) for outcome in outcomes)


def test_a_cancelled_request_is_left_out_of_the_pass():
    model = SlowModel(seconds=0.1)

    async def scenario():
        batcher = Batcher(model, max_batch_size=8, wait_s=0.001)
        first = asyncio.create_task(batcher.submit(0))
        await asyncio.sleep(0.02)
        gone = asyncio.create_task(batcher.submit(1))
        kept = asyncio.create_task(batcher.submit(2))
        await asyncio.sleep(0.01)
        gone.cancel()  # the client hung up while waiting
        return await first, await kept

    assert asyncio.run(scenario()) == (0, 20)
    assert model.batches == [[0], [2]]


def test_queue_times_are_reported_per_batch():
    model = SlowModel(seconds=0.05)
    reported: list[list[float]] = []

    async def scenario():
        batcher = Batcher(model, max_batch_size=8, wait_s=0.001, on_batch=reported.append)
        first = asyncio.create_task(batcher.submit(0))
        await asyncio.sleep(0.01)
        await asyncio.gather(first, batcher.submit(1))

    asyncio.run(scenario())
    assert [len(waits) for waits in reported] == [1, 1]
    assert reported[1][0] >= 0.03  # item 1 waited for the first pass


def test_a_failing_metrics_callback_fails_the_batch_not_the_batcher():
    model = SlowModel(seconds=0.0)
    calls = []

    def observe(waits):
        calls.append(waits)
        if len(calls) == 1:
            raise RuntimeError("metrics broke")

    async def scenario():
        batcher = Batcher(model, max_batch_size=8, wait_s=0.001, on_batch=observe)
        first = await asyncio.gather(batcher.submit(1), return_exceptions=True)
        return first, await asyncio.wait_for(batcher.submit(2), 5)

    first, second = asyncio.run(scenario())
    assert isinstance(first[0], RuntimeError) and "metrics broke" in str(first[0])
    assert second == 20


@pytest.mark.parametrize(("size", "wait", "message"), [(0, 0.01, "max_batch_size"), (4, -1.0, "wait_s")])
def test_bad_settings_are_refused(size, wait, message):
    with pytest.raises(ValueError, match=message):
        Batcher(SlowModel(), max_batch_size=size, wait_s=wait)
