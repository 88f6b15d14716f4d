"""Continuous batching: one decoding `Batch` that requests join and leave at every step.

A request (`Job`) waits in a bounded queue until its prompts fit in the batch (``max_batch_size`` rows), joins
at the next step, and each of its rows leaves the moment it finishes; a client that disconnects cancels its
rows at once. One thread steps the batch; events go back to each request's asyncio queue.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field

from ensemble.engine import Batch, Row
from ensemble.sampling import Sampling
from ensemble.server.metrics import Metrics

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The waiting queue holds ``max_queue`` requests already."""


@dataclass
class Job:
    """One HTTP request's prompts (each choice one row) and where its events go."""

    prompts: list[str]
    encoded: list[list[int]]
    max_new_tokens: int
    samplings: list[Sampling]
    spec: object
    reroute_every: int | None
    logprobs: int | None
    loop: asyncio.AbstractEventLoop
    weights: list[dict] | None = None  # routed already (off the decoding thread), one per row
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    rows: list[Row] = field(default_factory=list)
    cancelled: bool = False
    arrived: float = field(default_factory=time.perf_counter)
    first_token: float | None = None

    def cancel(self) -> None:
        self.cancelled = True

    def emit(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            self.cancelled = True


class Scheduler:
    """The batch-stepping thread of a server."""

    def __init__(self, engine, max_batch_size: int, max_queue: int, metrics: Metrics):
        self.engine, self.max_batch_size, self.max_queue, self.metrics = engine, max_batch_size, max_queue, metrics
        self._queue: deque[Job] = deque()
        self._running: list[Job] = []
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="cbtm-scheduler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout=10)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, job: Job) -> None:
        """Queue ``job``; raises QueueFull when ``max_queue`` requests already wait."""
        with self._cond:
            if len(self._queue) >= self.max_queue:
                raise QueueFull
            self._queue.append(job)
            self._cond.notify_all()

    def queue_depth(self) -> int:
        with self._cond:
            return len(self._queue)

    # ------------------------------------------------------------------------------------------ the thread
    def _loop(self) -> None:
        batch = Batch(self.engine)
        while True:
            with self._cond:
                while not self._stop and not self._queue and not batch.active:
                    self._cond.wait()
                if self._stop:
                    break
                self._admit(batch)
            self._drop_cancelled(batch)
            if not batch.active:
                self._report(batch)
                continue
            try:
                started = time.perf_counter()
                events = batch.step()
                self.metrics.step(time.perf_counter() - started, len(events))
            except Exception as exc:  # a bug or a device error: fail the requests in flight, keep serving
                log.exception("decoding step failed")
                for job in self._running:
                    job.emit(("error", f"{type(exc).__name__}: {exc}"))
                batch.close()
                batch, self._running = Batch(self.engine), []
                continue
            self._dispatch(events)
            self._running = [j for j in self._running if any(r.finish is None for r in j.rows)]
            self._report(batch)
        batch.close()

    def _admit(self, batch: Batch) -> None:
        """Move waiting jobs into the batch while their rows fit (a job larger than the batch joins alone)."""
        active = len(batch.active)
        while self._queue:
            job = self._queue[0]
            if job.cancelled:
                self._queue.popleft()
                continue
            if active and active + len(job.prompts) > self.max_batch_size:
                break
            self._queue.popleft()
            for i, (prompt, ids, sampling) in enumerate(zip(job.prompts, job.encoded, job.samplings)):
                job.rows.append(batch.add(ids, job.max_new_tokens, sampling, job.spec, job.reroute_every,
                                          prompt=prompt, tag=(job, i), logprobs=job.logprobs,
                                          weights=job.weights[i] if job.weights else None))
            self._running.append(job)
            active += len(job.prompts)

    def _drop_cancelled(self, batch: Batch) -> None:
        for job in self._running:
            if job.cancelled:
                for row in job.rows:
                    batch.cancel(row)
        self._running = [j for j in self._running if not j.cancelled]

    def _dispatch(self, events) -> None:
        by_job: dict[int, list] = {}
        for event in events:
            job, index = event.row.tag
            if job.first_token is None and event.token is not None:
                job.first_token = time.perf_counter()
                self.metrics.ttft(job.first_token - job.arrived)
            by_job.setdefault(id(job), [job]).append((index, event))
        by_loop: dict[int, list] = {}
        for job, *items in by_job.values():
            by_loop.setdefault(id(job.loop), [job.loop]).append((job, ("events", items)))
        for loop, *deliveries in by_loop.values():  # one wake-up of each event loop per step, not one per request
            try:
                loop.call_soon_threadsafe(_deliver, deliveries)
            except RuntimeError:  # the event loop is closed: the server is shutting down
                for job, _ in deliveries:
                    job.cancelled = True

    def _report(self, batch: Batch) -> None:
        lanes = Counter(e for row in batch.active for e in row.lanes)
        self.metrics.batch(self.queue_depth(), len(batch.active), dict(lanes))


class RouteBatcher:
    """Routes the prompts of requests that arrive together in one embedding call, in its own thread (the
    embedder costs more per call than per text, and must not stall the decoding thread)."""

    def __init__(self, route):
        self._route, self._pending, self._cond = route, [], threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="cbtm-router", daemon=True)
        self._thread.start()

    async def route(self, texts: list[str], specs: list) -> list[dict]:
        """The routing of ``texts`` ({cluster_id: weight} each), computed with whatever else is waiting."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._cond:
            self._pending.append((texts, specs, loop, future))
            self._cond.notify()
        return await future

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                batch, self._pending = self._pending, []
            texts = [t for item in batch for t in item[0]]
            specs = [s for item in batch for s in item[1]]
            try:
                routes, error = self._route(texts, specs), None
            except Exception as exc:  # answer every waiting request, keep routing
                routes, error = None, exc
            at = 0
            for item_texts, _, loop, future in batch:
                part = None if error else routes[at:at + len(item_texts)]
                at += len(item_texts)
                loop.call_soon_threadsafe(_resolve, future, part, error)


def _deliver(deliveries: list) -> None:
    for job, item in deliveries:
        job.events.put_nowait(item)


def _resolve(future, result, error) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
