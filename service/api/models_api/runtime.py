"""Loaded models for serving: a bounded cache of onnxruntime sessions, each with a micro-batcher
that combines concurrent requests into one call, off the event loop, that decodes every encoded image of
the batch and runs one inference: one thread hop per batch, not two per request. A request that arrives
alone, for a model measured to answer it within INLINE_BUDGET_S, is answered on the event loop itself:
at low load the thread hop would cost more than the work."""

from __future__ import annotations

import asyncio
import functools
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from models.contract.layout import ArtifactLayout
from models.contract.onnx_model import (
    BoundRunner,
    ModelSpec,
    decode_image,
    load_session,
    on_cuda,
    run_probabilities,
    session_spec,
    sha256_file,
)
from service.api.models_api.service import Resolved, ServingRecord
from service.store.errors import ResourceConflict


class ImageRefused(ValueError):
    """An image of a request could not be decoded: that request alone fails (with a 422)."""


@dataclass
class _Pending:
    work: np.ndarray | list[bytes]  # decoded images (N x 3 x S x S), or encoded image files to decode
    future: asyncio.Future

    def __len__(self) -> int:
        return len(self.work)


INLINE_BUDGET_S = 0.005  # the longest a request alone may hold the event loop for its decode and inference
_COST_SMOOTHING = 0.2  # weight of the newest measurement in the running estimate of a lone request's cost


def _run_batch(batch: list[_Pending], decode: Callable[[bytes], np.ndarray],
               infer: Callable[[np.ndarray], np.ndarray],
               decode_pool: Executor | None = None) -> list[np.ndarray | Exception]:
    """Decode what is encoded (over `decode_pool`'s threads where one is given) and run one inference over
    every request of the batch, in a worker thread; a request whose image does not decode gets its error,
    the others their probabilities."""
    encoded = [(data, index) for pending in batch if not isinstance(pending.work, np.ndarray)
               for index, data in enumerate(pending.work)]
    if decode_pool is not None and len(encoded) > 1:
        images = iter(list(decode_pool.map(functools.partial(_decoded_or_error, decode),
                                           [data for data, _ in encoded], [index for _, index in encoded])))
    else:
        images = (_decoded_or_error(decode, data, index) for data, index in encoded)
    arrays: list[np.ndarray | Exception] = []
    for pending in batch:
        if isinstance(pending.work, np.ndarray):
            arrays.append(pending.work)
            continue
        decoded = [next(images) for _ in pending.work]
        refused = next((d for d in decoded if isinstance(d, ImageRefused)), None)
        arrays.append(refused if refused is not None else np.stack(decoded))
    good = [a for a in arrays if isinstance(a, np.ndarray)]
    if not good:
        return arrays
    probs = infer(np.concatenate(good))
    results, start = [], 0
    for array in arrays:
        if isinstance(array, Exception):
            results.append(array)
            continue
        results.append(probs[start:start + len(array)])
        start += len(array)
    return results


async def _run_alone(work: np.ndarray | list[bytes], decode: Callable[[bytes], np.ndarray],
                     infer: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """One request's probabilities, decoded and inferred in a worker thread without a batcher."""
    (result,) = await asyncio.to_thread(_run_batch, [_Pending(work, None)], decode, infer)
    if isinstance(result, Exception):
        raise result
    return result


def _decoded_or_error(decode: Callable[[bytes], np.ndarray], data: bytes, index: int) -> np.ndarray | ImageRefused:
    try:
        return decode(data)
    except ValueError as exc:
        return ImageRefused(f"image {index}: {exc}")


@dataclass
class Batcher:
    """Concurrent `submit`s are answered by one call, in a worker thread, that decodes the encoded images of
    all of them and runs `infer` once on the lot.

    After the first request arrives, it takes whatever else is queued, then waits at most
    `max_wait_s` for more until `max_images` are collected, but only while waiting pays: while other
    requests are on their way in, or recent batches held several requests (a lone client never waits);
    requests never split. A request that finds no other waiting and no batch running is answered on the
    event loop when its decode and inference, as measured on earlier lone requests, take at most
    INLINE_BUDGET_S: then no thread hop, no queue.
    """

    infer: Callable[[np.ndarray], np.ndarray]
    decode: Callable[[bytes], np.ndarray]  # one encoded image -> the model's 3 x S x S float32 input
    max_images: int
    max_wait_s: float
    on_batch: Callable[[int], None] = lambda size: None
    decode_pool: Executor | None = None  # decodes the images of a batch in parallel (a GPU server's idle cores)
    _queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    _task: asyncio.Task | None = None
    _closed: bool = False
    _arriving: int = 0  # requests inside `submit` that are neither queued nor being answered inline yet
    _running: bool = False  # a batch is being answered in a worker thread
    _alone_seconds_per_image: float | None = None  # running estimate, from batches that held one request
    _requests_per_batch: float = 1.0  # running estimate over recent batches (inline answers included)

    async def submit(self, work: np.ndarray | list[bytes]) -> np.ndarray:
        """Probabilities for decoded images, or for encoded image files (ImageRefused if one does not decode)."""
        if self._closed:  # evicted while this request held the model: answer it alone
            return await _run_alone(work, self.decode, self.infer)
        self._arriving += 1
        try:
            await asyncio.sleep(0)  # requests already read on other connections reach here before we decide
            alone = self._arriving == 1 and not self._running and self._queue.empty()
        finally:
            self._arriving -= 1
        if alone and self._cheap(len(work)):
            return self._answer_inline(work)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._serve())
        future = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(work, future))
        return await future

    def _cheap(self, images: int) -> bool:
        estimate = self._alone_seconds_per_image
        return estimate is not None and estimate * images <= INLINE_BUDGET_S

    def _observe_alone(self, seconds: float, images: int) -> None:
        per_image = seconds / max(images, 1)
        estimate = self._alone_seconds_per_image
        self._alone_seconds_per_image = per_image if estimate is None else (
            estimate + _COST_SMOOTHING * (per_image - estimate))

    def _observe_batch(self, requests: int) -> None:
        self._requests_per_batch += _COST_SMOOTHING * (requests - self._requests_per_batch)

    def _waiting_pays(self) -> bool:
        """Whether to wait for more requests: some are already inside `submit` on their way to the queue, or
        recent batches held several (the load is concurrent); a lone client's request runs at once."""
        return self._arriving > 0 or self._requests_per_batch >= 1.5

    def _answer_inline(self, work: np.ndarray | list[bytes]) -> np.ndarray:
        self.on_batch(len(work))
        self._observe_batch(1)
        started = time.perf_counter()
        (result,) = _run_batch([_Pending(work, None)], self.decode, self.infer)
        self._observe_alone(time.perf_counter() - started, len(work))
        if isinstance(result, Exception):
            raise result
        return result

    def _run_timed(self, batch: list[_Pending]) -> list[np.ndarray | Exception]:
        """_run_batch in the worker thread; a batch of one request also measures what answering one costs."""
        started = time.perf_counter()
        results = _run_batch(batch, self.decode, self.infer, self.decode_pool)
        if len(batch) == 1:
            self._observe_alone(time.perf_counter() - started, len(batch[0]))
        return results

    async def _collect(self) -> tuple[list[_Pending], bool]:
        """The next batch, and whether `close` asked to stop after it."""
        first = await self._queue.get()
        if first is None:
            return [], True
        batch = [first]
        count = len(first)
        deadline = asyncio.get_running_loop().time() + self.max_wait_s
        while count < self.max_images:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0 or not self._waiting_pays():
                    break
                try:
                    item = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            if item is None:
                return batch, True
            batch.append(item)
            count += len(item)
        return batch, False

    async def _serve(self) -> None:
        stop = False
        while not stop:
            batch, stop = await self._collect()
            if not batch:
                continue
            self.on_batch(sum(len(p) for p in batch))
            self._observe_batch(len(batch))
            self._running = True
            try:
                results = await asyncio.to_thread(self._run_timed, batch)
            except Exception as exc:  # every waiting request gets the error
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(exc)
                continue
            finally:
                self._running = False
            for pending, result in zip(batch, results, strict=True):
                if pending.future.done():
                    continue
                if isinstance(result, Exception):
                    pending.future.set_exception(result)
                else:
                    pending.future.set_result(result)

    async def close(self) -> None:
        """Take no more requests; every request already queued is still answered (none hangs)."""
        self._closed = True
        if self._task is not None and not self._task.done():
            await self._queue.put(None)  # served after everything queued before it
            await self._task


@dataclass
class LoadedModel:
    record: ServingRecord
    spec: ModelSpec
    session: object
    batcher: Batcher | None
    decode: Callable[[bytes], np.ndarray]
    infer: Callable[[np.ndarray], np.ndarray]  # one call of the session on a whole batch

    async def probabilities(self, work: np.ndarray | list[bytes]) -> np.ndarray:
        """For decoded images (N x 3 x S x S float32) or encoded image files, decoded off the event loop with
        the inference (ImageRefused names the first image that does not decode)."""
        if self.batcher is not None:
            return await self.batcher.submit(work)
        return await _run_alone(work, self.decode, self.infer)


CUDA_MAX_WAIT_S = 0.002  # default wait for a GPU batch to fill, taken only while waiting pays (Batcher)
RESOLVE_TTL_S = 2.0  # how long a name, name@version or name@alias keeps resolving to the same model here
RESOLVED_KEPT = 1024


@dataclass
class ModelCache:
    """At most `capacity` loaded models, least recently used evicted first; and what model references
    (registered names, versions, aliases) resolved to, for RESOLVE_TTL_S, so predict stays off the database."""

    capacity: int
    batching: bool
    max_batch_images: int
    max_wait_s: float | None  # None: CUDA_MAX_WAIT_S for a model on a GPU, 0 on the CPU
    on_batch: Callable[[int], None] = lambda size: None
    max_image_pixels: int = 4096 * 4096  # an encoded image larger than this is refused before it is decoded
    intra_op_threads: int = 0  # CPU threads of one inference; 0: onnxruntime's default (every core)
    _models: OrderedDict[str, LoadedModel] = field(default_factory=OrderedDict)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _loop: asyncio.AbstractEventLoop | None = None  # the loop serving the models, once one was loaded
    _resolved: dict[str, tuple[float, Resolved]] = field(default_factory=dict)  # ref -> (good until, model)
    _decode_pool: ThreadPoolExecutor | None = None  # made with the first model served on a GPU

    async def resolve(self, ref: str, resolver: Callable[[], Resolved]) -> Resolved:
        """The model `ref` names: a loaded model's id at once; anything else from `resolver` (the store, in a
        thread), remembered for RESOLVE_TTL_S: an alias moved takes effect here within that time."""
        if ref in self._models:
            return Resolved(ref, "1")
        now = time.monotonic()
        hit = self._resolved.get(ref)
        if hit is not None and hit[0] > now:
            return hit[1]
        resolved = await asyncio.to_thread(resolver)
        if len(self._resolved) >= RESOLVED_KEPT:
            self._resolved = {k: v for k, v in self._resolved.items() if v[0] > now}
            while len(self._resolved) >= RESOLVED_KEPT:
                self._resolved.pop(next(iter(self._resolved)))
        self._resolved[ref] = (now + RESOLVE_TTL_S, resolved)
        return resolved

    def forget(self, model_id: str) -> None:
        """Drop a deleted model; callable from any thread (the endpoints that delete run in a thread pool).
        Scheduled on the serving loop before the deleting request is answered, so no later request finds it."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._drop, model_id)

    def _drop(self, model_id: str) -> None:
        self._resolved = {k: v for k, v in self._resolved.items() if v[1].model_id != model_id}
        loaded = self._models.pop(model_id, None)
        if loaded is not None and loaded.batcher is not None:
            asyncio.ensure_future(loaded.batcher.close())  # requests already queued are still answered

    async def get(self, model_id: str, lookup: Callable[[str], ServingRecord],
                  artifacts: ArtifactLayout) -> LoadedModel:
        """The loaded model, from the cache or loaded now; `lookup` reads its record from the store
        (and raises the 404/409 of unknown or unfinished models)."""
        loaded = self._models.get(model_id)
        if loaded is not None:  # the hot path: no lock, no database
            self._models.move_to_end(model_id)
            return loaded
        async with self._lock:
            self._loop = asyncio.get_running_loop()
            if model_id in self._models:
                return self._models[model_id]
            record = await asyncio.to_thread(lookup, model_id)
            session = await asyncio.to_thread(self._load, artifacts.resolve(record.onnx_path), record.sha256,
                                              self.intra_op_threads)
            spec = session_spec(session)
            decode = functools.partial(decode_image, image_size=spec.image_size, max_pixels=self.max_image_pixels,
                                       fit=spec.fit)
            infer, decode_pool, max_wait_s = self._running_on(session, spec)
            batcher = Batcher(infer, decode, self.max_batch_images, max_wait_s, self.on_batch,
                              decode_pool) if self.batching else None
            loaded = LoadedModel(record, spec, session, batcher, decode, infer)
            self._models[model_id] = loaded
            while len(self._models) > self.capacity:
                _, evicted = self._models.popitem(last=False)
                if evicted.batcher is not None:
                    await evicted.batcher.close()
            return loaded

    def _running_on(self, session, spec: ModelSpec) -> tuple[Callable[[np.ndarray], np.ndarray],
                                                              Executor | None, float]:
        """How a model runs its batches: on a GPU through IO binding from a page-locked buffer, with the
        images of a batch decoded in parallel on the host's cores and a short wait for batches to fill; on
        the CPU a plain run, decoding in the batch's thread (the inference already takes every core)."""
        if on_cuda(session):
            if self._decode_pool is None:
                self._decode_pool = ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="h2t-decode")
            runner = BoundRunner(session, spec.image_size, self.max_batch_images)
            return runner, self._decode_pool, CUDA_MAX_WAIT_S if self.max_wait_s is None else self.max_wait_s

        def infer(images: np.ndarray) -> np.ndarray:
            return run_probabilities(session, images, batch_size=max(len(images), 1))

        return infer, None, self.max_wait_s or 0.0

    @staticmethod
    def _load(path: Path, sha256: str, intra_op_threads: int):
        if not path.exists():
            raise ResourceConflict(f"the model file {path.name} is missing from the artifact store")
        if sha256_file(path) != sha256:
            raise ResourceConflict(f"the model file {path.name} does not match its recorded sha256")
        return load_session(path, intra_op_threads)

    async def close(self) -> None:
        for loaded in self._models.values():
            if loaded.batcher is not None:
                await loaded.batcher.close()
        self._models.clear()
        if self._decode_pool is not None:
            self._decode_pool.shutdown(wait=False)
            self._decode_pool = None
