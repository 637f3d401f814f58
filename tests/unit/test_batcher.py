"""The predict micro-batcher: closing it (a model evicted from the cache) answers every queued request; lone
requests to a cheap model skip the thread hop."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from service.api.models_api.runtime import INLINE_BUDGET_S, Batcher, ImageRefused


def _slow_double(images: np.ndarray) -> np.ndarray:
    time.sleep(0.05)
    return images * 2


def _decode_digit(data: bytes) -> np.ndarray:
    """A stand-in decoder: b"7" -> [7.0, 7.0, 7.0]; anything else is not an image."""
    if not data.isdigit():
        raise ValueError("not a readable image")
    return np.full(3, float(data))


def test_closing_a_batcher_answers_every_request_already_queued_and_later_ones_alone():
    async def scenario() -> tuple[list[np.ndarray], np.ndarray, list[int]]:
        sizes: list[int] = []
        batcher = Batcher(_slow_double, _decode_digit, max_images=2, max_wait_s=0.0, on_batch=sizes.append)
        requests = [asyncio.create_task(batcher.submit(np.full((1, 3), float(i)))) for i in range(5)]
        await asyncio.sleep(0.01)  # the first batch is being inferred, the rest are queued
        await asyncio.wait_for(batcher.close(), 5)
        answers = await asyncio.wait_for(asyncio.gather(*requests), 5)
        late = await asyncio.wait_for(batcher.submit(np.full((1, 3), 9.0)), 5)  # held the model before eviction
        return answers, late, sizes

    answers, late, sizes = asyncio.run(scenario())
    assert [a.tolist() for a in answers] == [[[2.0 * i] * 3] for i in range(5)]
    assert late.tolist() == [[18.0] * 3]
    assert sum(sizes) == 5 and max(sizes) <= 2  # all five went through batches of at most two


@pytest.mark.parametrize("decode_threads", [0, 3])
def test_encoded_requests_are_decoded_with_the_batch_and_a_bad_image_fails_only_its_request(decode_threads):
    pool = ThreadPoolExecutor(decode_threads) if decode_threads else None  # a GPU server decodes in a pool

    async def scenario() -> list:
        sizes: list[int] = []
        batcher = Batcher(_slow_double, _decode_digit, max_images=16, max_wait_s=0.05, on_batch=sizes.append,
                          decode_pool=pool)
        answers = await asyncio.gather(batcher.submit([b"1", b"2"]), batcher.submit([b"3", b"oops"]),
                                       batcher.submit(np.full((1, 3), 5.0)), return_exceptions=True)
        await batcher.close()
        return [*answers, sizes]

    good, bad, decoded, sizes = asyncio.run(scenario())
    if pool is not None:
        pool.shutdown()
    assert good.tolist() == [[2.0] * 3, [4.0] * 3] and decoded.tolist() == [[10.0] * 3]
    assert isinstance(bad, ImageRefused) and str(bad) == "image 1: not a readable image"
    assert sizes == [5]  # one call decoded and inferred all three requests


def _recording_double(threads: list[int]):
    def infer(images: np.ndarray) -> np.ndarray:
        threads.append(threading.get_ident())
        return images * 2
    return infer


def test_a_lone_request_to_a_cheap_model_is_answered_on_the_event_loop_and_concurrent_ones_in_a_batch():
    async def scenario() -> tuple[list[int], list[int], int]:
        threads: list[int] = []
        sizes: list[int] = []
        batcher = Batcher(_recording_double(threads), _decode_digit, max_images=16, max_wait_s=0.0,
                          on_batch=sizes.append)
        for i in range(3):  # one at a time: the first is measured in a worker thread, the next run inline
            assert (await batcher.submit([str(i).encode()])).tolist() == [[2.0 * i] * 3]
        together = await asyncio.gather(*(batcher.submit([b"4"]) for _ in range(4)))
        assert all(a.tolist() == [[8.0] * 3] for a in together)
        await batcher.close()
        return threads, sizes, threading.get_ident()

    threads, sizes, loop_thread = asyncio.run(scenario())
    assert threads[0] != loop_thread and threads[1:3] == [loop_thread, loop_thread]
    assert threads[3] != loop_thread and sizes == [1, 1, 1, 4]  # the four concurrent ones: one call, in a thread


def test_a_model_slower_than_the_inline_budget_never_runs_on_the_event_loop():
    async def scenario() -> tuple[list[int], int]:
        threads: list[int] = []
        record = _recording_double(threads)

        def slow(images: np.ndarray) -> np.ndarray:
            time.sleep(INLINE_BUDGET_S * 2)
            return record(images)

        batcher = Batcher(slow, _decode_digit, max_images=16, max_wait_s=0.0)
        for _ in range(3):
            await batcher.submit([b"1"])
        await batcher.close()
        return threads, threading.get_ident()

    threads, loop_thread = asyncio.run(scenario())
    assert len(threads) == 3 and loop_thread not in threads


def test_a_lone_client_never_waits_for_a_batch_to_fill_but_under_concurrent_load_a_batch_waits_for_more():
    async def scenario() -> tuple[float, list[int]]:
        sizes: list[int] = []
        batcher = Batcher(_slow_double, _decode_digit, max_images=2, max_wait_s=1.0, on_batch=sizes.append)
        started = time.perf_counter()
        for _ in range(3):  # one after another, as one client sends them: the 1 s wait would never pay
            await batcher.submit([b"1"])
        lone_seconds = time.perf_counter() - started
        for _ in range(5):  # concurrent load: batches of two
            await asyncio.gather(*(batcher.submit([b"2"]) for _ in range(2)))
        early = asyncio.create_task(batcher.submit([b"3"]))
        await asyncio.sleep(0.1)  # now a batch waits for more: the late request joins the early one's batch
        late = asyncio.create_task(batcher.submit([b"4"]))
        answers = await asyncio.gather(early, late)
        assert [a.tolist() for a in answers] == [[[6.0] * 3], [[8.0] * 3]]
        await batcher.close()
        return lone_seconds, sizes

    lone_seconds, sizes = asyncio.run(scenario())
    assert lone_seconds < 1.0  # three 50 ms inferences, no 1 s waits
    assert sizes == [1, 1, 1, 2, 2, 2, 2, 2, 2]
