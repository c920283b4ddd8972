"""Detection of a blocked event loop.

Handlers run in the worker's event loop, so synchronous CPU work in one of them stalls every
run, stream and heartbeat of the process. A thread watches a timestamp that the loop
refreshes; when the loop misses it for `threshold` seconds, the thread logs the stall once,
with the experiment whose handler task is blocking the loop and the line it is executing.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
import uuid
import weakref

from iiq.experiments import metrics

logger = logging.getLogger(__name__)

# Handler tasks of this process and the experiment each runs; the runner adds and removes them.
handler_tasks: weakref.WeakKeyDictionary[asyncio.Task[None], uuid.UUID] = weakref.WeakKeyDictionary()


class LoopWatchdog:
    def __init__(self, threshold: float) -> None:
        self._threshold = threshold
        self._tick = threshold / 4
        self._last_beat = time.monotonic()
        self._stop = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread_id = 0
        self._beat_task: asyncio.Task[None] | None = None
        self._thread: threading.Thread | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_thread_id = threading.get_ident()
        self._last_beat = time.monotonic()
        self._beat_task = asyncio.create_task(self._beat(), name="iiq-loop-heartbeat")
        self._thread = threading.Thread(target=self._watch, name="iiq-loop-watchdog", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._stop.set()
        if self._beat_task is not None:
            self._beat_task.cancel()
            await asyncio.gather(self._beat_task, return_exceptions=True)
        if self._thread is not None:
            self._thread.join(timeout=2)

    async def _beat(self) -> None:
        while True:
            self._last_beat = time.monotonic()
            await asyncio.sleep(self._tick)

    def _watch(self) -> None:
        reported = False
        while not self._stop.wait(self._tick):
            stalled = time.monotonic() - self._last_beat
            if stalled < self._threshold:
                reported = False
                continue
            if not reported:
                reported = True
                self._report(stalled)

    def _report(self, stalled: float) -> None:
        task = asyncio.current_task(self._loop) if self._loop is not None else None
        experiment_id = handler_tasks.get(task) if task is not None else None
        frame = sys._current_frames().get(self._loop_thread_id)
        where = f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}" if frame else "unknown"
        metrics.loop_stalls_total.inc()
        logger.warning(
            "event loop blocked; run CPU-bound handler work off the loop with asyncio.to_thread",
            extra={
                "experiment_id": str(experiment_id) if experiment_id else None,
                "blocked_seconds": round(stalled, 2),
                "where": where,
            },
        )
