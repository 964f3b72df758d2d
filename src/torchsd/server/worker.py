"""One worker thread runs jobs one at a time on the model; a bounded queue holds the ones waiting.

A job is a function of a ``JobControl``. It reports each sampling step through ``control.step``, which
raises ``Interrupted`` or ``Skipped`` once /interrupt or /skip has asked, so the running job stops
within one step. Beyond ``queue_size`` waiting jobs ``submit`` raises ``QueueFull`` (the server answers
503 with a Retry-After estimate). An exception fails that job's future only; the worker goes on.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable

import torch
from PIL import Image


class Interrupted(Exception):
    """Raised inside a job when /interrupt asked it to stop."""


class Skipped(Exception):
    """Raised inside a job when /skip asked it to drop the current batch and go on with the next."""


class QueueFull(Exception):
    def __init__(self, retry_after: int, queue_size: int):
        super().__init__(f"the server is busy: {queue_size} jobs are already waiting; retry in about "
                         f"{retry_after} s")
        self.retry_after = retry_after


PreviewDecoder = Callable[[torch.Tensor], Image.Image]


@dataclass
class _Job:
    name: str
    function: Callable[["JobControl"], Any]
    future: Future


class JobControl:
    """What a running job sees: progress reporting and the interrupt/skip flags."""

    def __init__(self, worker: "Worker", name: str):
        self._worker = worker
        self.name = name
        self.interrupted = threading.Event()
        self.skipped = threading.Event()
        self.started = time.monotonic()
        self.timestamp = time.strftime("%Y%m%d%H%M%S")
        self.batch_index, self.batch_count = 0, 1
        self.sampling_step, self.sampling_steps = 0, 0
        self.steps_completed = 0  # over the whole job
        self.interrupt_requested_at: int | None = None  # steps_completed when /interrupt came
        # previews are decoded here, between steps, only when /progress asked for one: decoding on the
        # request thread would fight the sampler for the same cores
        self.preview_wanted = threading.Event()
        self.preview_image: Image.Image | None = None
        self._preview_time = 0.0

    def begin_batch(self, index: int, count: int, steps: int) -> None:
        self.skipped.clear()  # a skip drops one batch, not the next one too
        self.check()
        self.batch_index, self.batch_count = index, count
        self.sampling_step, self.sampling_steps = 0, steps

    def step(self, index: int, total: int, x0: torch.Tensor | None = None,
             decode: PreviewDecoder | None = None) -> None:
        """Called after each sampling step; raises when the job must stop here."""
        self.sampling_step, self.sampling_steps = index + 1, total
        self.steps_completed += 1
        self.check()
        now = time.monotonic()
        if (x0 is not None and decode is not None and self.preview_wanted.is_set()
                and now - self._preview_time >= self._worker.preview_interval):
            self.preview_wanted.clear()
            self.preview_image = decode(x0[:1])
            self._preview_time = now

    def check(self) -> None:
        if self.interrupted.is_set():
            raise Interrupted("interrupted")
        if self.skipped.is_set():
            raise Skipped("skipped")

    def request_interrupt(self) -> None:
        if not self.interrupted.is_set():
            self.interrupt_requested_at = self.steps_completed
        self.interrupted.set()

    @property
    def progress(self) -> float:
        """0 to 1 over all batches of the job."""
        within = self.sampling_step / self.sampling_steps if self.sampling_steps else 0.0
        return min(1.0, (self.batch_index + within) / max(1, self.batch_count))


class Worker:
    def __init__(self, queue_size: int = 8, preview_interval: float = 0.5):
        self.queue_size = queue_size
        self.preview_interval = preview_interval  # seconds between two preview decodes, at least
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._waiting = 0
        self._current: JobControl | None = None
        self._mean_seconds = 5.0  # running mean of job durations, for Retry-After
        self._thread = threading.Thread(target=self._loop, name="torchsd-worker", daemon=True)

    # --- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._lock:
            if self._current is not None:
                self._current.request_interrupt()
        self._queue.put(None)
        self._thread.join(timeout)

    # --- the client side -------------------------------------------------------------------------
    def submit(self, name: str, function: Callable[[JobControl], Any]) -> Future:
        with self._lock:
            if self._waiting >= self.queue_size:
                retry = math.ceil(self._mean_seconds * (self._waiting + 1))
                raise QueueFull(min(3600, max(1, retry)), self.queue_size)
            self._waiting += 1
        job = _Job(name, function, Future())
        self._queue.put(job)
        return job.future

    def interrupt(self) -> bool:
        """Stop the running job after its current step. False when nothing runs."""
        with self._lock:
            if self._current is None:
                return False
            self._current.request_interrupt()
            return True

    def skip(self) -> bool:
        with self._lock:
            if self._current is None:
                return False
            self._current.skipped.set()
            return True

    @property
    def current(self) -> JobControl | None:
        return self._current

    @property
    def job_count(self) -> int:
        with self._lock:
            return self._waiting + (self._current is not None)

    def snapshot(self) -> tuple[JobControl | None, int]:
        """The running job and the job count, read together (one consistent /progress answer)."""
        with self._lock:
            return self._current, self._waiting + (self._current is not None)

    def preview(self) -> Image.Image | None:
        """The running job's latest decoded prediction of the clean image; asks for a fresher one."""
        control = self._current
        if control is None:
            return None
        control.preview_wanted.set()
        return control.preview_image

    # --- the worker thread -----------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                break
            with self._lock:
                self._waiting -= 1
                if not job.future.set_running_or_notify_cancel():
                    continue  # its client went away while it waited
                control = self._current = JobControl(self, job.name)
            result, error = None, None
            try:
                result = job.function(control)
            except Exception as err:  # the job fails, its request gets the error; the worker goes on
                error = err
            elapsed = time.monotonic() - control.started
            with self._lock:
                self._current = None
                self._mean_seconds = 0.8 * self._mean_seconds + 0.2 * elapsed
            # only now answer the client: whoever got the result and asks /progress next finds the worker idle
            if error is None:
                job.future.set_result(result)
            else:
                job.future.set_exception(error)
        self._fail_waiting()

    def _fail_waiting(self) -> None:
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is not None and job.future.set_running_or_notify_cancel():
                job.future.set_exception(RuntimeError("the server is shutting down"))
