"""Cross-request batching: one thread routes the decoded items of every waiting request together.

Requests arriving while the model is busy are merged into the next router call (up to the batch size,
or after ``max_wait_s`` once the first is in), so 8 clients sending 4 images each make batches of
~32, as a CLI run would, instead of 8 calls of 4. The router is only ever called from this thread.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from hierarchy.data.batches import Decoded

log = logging.getLogger("hierarchy.serve")

Route = Callable[[Sequence[Decoded]], list[dict[str, Any]]]


@dataclass
class _Job:
    items: list[Decoded]
    future: Future = field(default_factory=Future)


class Batcher:
    def __init__(self, route: Route, batch_size: int, max_wait_s: float = 0.002,
                 on_batch: Callable[[int], None] = lambda n: None):
        self.route, self.batch_size, self.max_wait_s, self.on_batch = route, batch_size, max_wait_s, on_batch
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="hierarchy-batcher", daemon=True)
        self._thread.start()

    def submit(self, items: list[Decoded]) -> Future:
        """A future of one record per item, in order."""
        job = _Job(items)
        if not self._thread.is_alive():
            job.future.set_exception(RuntimeError("the batcher is closed"))
        else:
            self._jobs.put(job)
        return job.future

    def close(self) -> None:
        """Finish every job already submitted, then stop."""
        self._jobs.put(None)
        self._thread.join()

    def _loop(self) -> None:
        while True:
            jobs, stop = self._collect()
            if jobs:
                self._run(jobs)
            if stop:
                return

    def _collect(self) -> tuple[list[_Job], bool]:
        first = self._jobs.get()
        if first is None:
            return [], True
        jobs, n = [first], len(first.items)
        deadline = time.monotonic() + self.max_wait_s
        while n < self.batch_size:
            try:
                job = self._jobs.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is None:
                return jobs, True
            jobs.append(job)
            n += len(job.items)
        return jobs, False

    def _run(self, jobs: list[_Job]) -> None:
        live = [j for j in jobs if j.future.set_running_or_notify_cancel()]
        items = [it for j in live for it in j.items]
        if not items:
            return
        self.on_batch(len(items))
        try:
            records = self.route(items)
        except Exception as exc:  # noqa: BLE001 - the requests get the error, the thread lives on
            log.exception("routing a batch of %d failed", len(items))
            for j in live:
                j.future.set_exception(exc)
            return
        start = 0
        for j in live:
            j.future.set_result(records[start:start + len(j.items)])
            start += len(j.items)
