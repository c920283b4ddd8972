"""`run_experiment`: run one experiment's handler and write exactly one terminal state.

The runner supervises the handler task: it enforces the soft time limit, watches the row
for a cancel request and, once the grace period after such a request is over, cancels the
task. Whatever happens, one guarded terminal UPDATE wins; a losing one (for example a
timeout racing `save_results`) is logged and changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import uuid
from collections.abc import Mapping
from typing import Any

import asyncpg

from iiq.db.queries import query
from iiq.db.tx import service_transaction
from iiq.errors import EventTooLargeError, InvalidTransitionError
from iiq.experiments import lifecycle, metrics, run_events
from iiq.experiments.context import ExperimentContext
from iiq.experiments.events import EventBus, append_event, encoded_size
from iiq.experiments.registry import get_handler
from iiq.experiments.run_events import RunEvents
from iiq.experiments.states import Status
from iiq.experiments.watchdog import handler_tasks
from iiq.settings import Settings, load_settings

logger = logging.getLogger(__name__)

# Host and process id of this worker, shown in each run's `running` event.
WORKER_IDENTITY = f"{socket.gethostname()}:{os.getpid()}"

# Largest results summary accepted, bytes of compact JSON; the row is meant to stay small.
MAX_SUMMARY_BYTES = 64 * 1024

# Event types the engine writes itself; a handler emitting them would confuse streams.
RESERVED_EVENT_TYPES = frozenset({"status", "cancel_requested"})


class _RunBackend:
    """The runner's side of an `ExperimentContext`."""

    def __init__(
        self,
        db: asyncpg.Pool,
        events: RunEvents,
        row: asyncpg.Record,
        settings: Settings,
    ) -> None:
        self._db = db
        self.events = events
        self._settings = settings
        self.experiment_id: uuid.UUID = row["id"]
        self.gpu_count: int = row["gpu_count"]
        self.started = asyncio.get_running_loop().time()
        self.completed = False
        # Set once a terminal state is written; emits after it are refused.
        self.ended = False
        self.cancel_seen = False

    def gpu_hours(self) -> float:
        elapsed = asyncio.get_running_loop().time() - self.started
        return elapsed / 3600.0 * self.gpu_count

    async def emit(self, event_type: str, stage: str | None, payload: Mapping[str, Any]) -> int:
        if event_type in RESERVED_EVENT_TYPES:
            raise ValueError(
                f"event_type {event_type!r} is reserved for the engine: use another name, such as 'progress'"
            )
        if self.ended:
            # Streams close at the terminal event, so a later event would never be delivered.
            raise InvalidTransitionError(self.experiment_id, "ended", "emit")
        async with self.events.single_statement() as (conn, bus):
            event = await append_event(
                conn,
                self.experiment_id,
                event_type,
                stage,
                payload,
                max_payload_bytes=self._settings.max_event_payload_bytes,
                require_running=True,
            )
            await bus.publish(conn, event)
        metrics.experiment_events_total.labels(event_type).inc()
        return event.seq

    async def check_cancelled(self) -> bool:
        if not self.cancel_seen:
            async with service_transaction(self._db) as conn:
                row = await conn.fetchrow(query("get_experiment_status"), self.experiment_id)
            # A run that is no longer running (cancelled, or failed by recovery while this worker
            # was stalled) must stop as well.
            self.cancel_seen = row is None or row["cancel_requested"] or row["status"] != Status.RUNNING
        return self.cancel_seen

    async def save_results(self, summary: Mapping[str, Any]) -> None:
        if not isinstance(summary, Mapping):
            raise TypeError(f"save_results expects a mapping, got {type(summary).__name__}")
        size = encoded_size(summary)
        if size > MAX_SUMMARY_BYTES:
            raise EventTooLargeError(
                f"results summary of {size} bytes exceeds the maximum of {MAX_SUMMARY_BYTES} bytes: keep the "
                "summary small and put full reports in an artifact (ctx.artifact_path), referenced by URL"
            )
        async with self.events.single_statement() as (conn, bus):
            await lifecycle.mark_completed(conn, bus, self.experiment_id, summary, self.gpu_hours())
        self.completed = True
        self.ended = True


async def run_experiment(
    db: asyncpg.Pool,
    experiment_id: uuid.UUID,
    bus: EventBus,
    *,
    settings: Settings | None = None,
    collaborators: Mapping[str, Any] | None = None,
) -> Status:
    """Run experiment `experiment_id` to a terminal state and return that state.

    An experiment that is not queued (cancelled before it started, or already handled) is
    left as it is, and its current state is returned.
    """
    settings = settings or load_settings()
    events = RunEvents(db, bus, experiment_id)
    # Watched from before the start, so no cancel request can fall between the start and the watch.
    events.watch()
    try:
        return await _run(db, events, experiment_id, settings, collaborators)
    finally:
        events.close()


async def _run(
    db: asyncpg.Pool,
    events: RunEvents,
    experiment_id: uuid.UUID,
    settings: Settings,
    collaborators: Mapping[str, Any] | None,
) -> Status:
    log_fields: dict[str, Any] = {"experiment_id": str(experiment_id)}

    try:
        async with events.single_statement() as (conn, bus):
            row = await lifecycle.mark_running(conn, bus, experiment_id, WORKER_IDENTITY)
    except InvalidTransitionError as exc:
        logger.info("experiment not started: not queued", extra={**log_fields, "status": exc.current})
        return Status(exc.current) if exc.current else Status.FAILED

    tool_id = row["tool_id"]
    log_fields.update(org_id=str(row["org_id"]), tool_id=tool_id)
    if row["queued_at"] is not None:
        wait = (row["started_at"] - row["queued_at"]).total_seconds()
        metrics.experiment_queue_wait_seconds.labels(tool_id).observe(max(0.0, wait))
    logger.info("experiment started", extra=log_fields)

    backend = _RunBackend(db, events, row, settings)
    handler = get_handler(tool_id)
    if handler is None:
        status, message = (
            Status.FAILED,
            f"tool {tool_id!r} is not registered in this worker: install the package that provides it",
        )
    else:
        ctx = ExperimentContext(
            experiment_id=experiment_id,
            org_id=row["org_id"],
            tool_id=tool_id,
            target=row["target"],
            input_config=row["input_config"],
            goal=row["goal"],
            created_by=row["created_by"],
            artifact_dir=settings.artifact_dir / str(experiment_id),
            artifact_base_url=settings.public_url,
            backend=backend,
            collaborators=collaborators,
        )
        timeout = handler.timeout_seconds or row["timeout_seconds"]
        task = asyncio.create_task(handler.run(ctx), name=f"iiq-handler-{experiment_id}")
        handler_tasks[task] = experiment_id
        try:
            status, message = await _supervise(task, backend, timeout, settings, log_fields)
        except asyncio.CancelledError:
            # The worker is shutting down and its grace period is over: end the run rather
            # than leave it running with no one behind it.
            if backend.cancel_seen:
                # A cancel requested before the shutdown still ends the run as cancelled.
                ending, message = Status.CANCELLED, "cancelled on request"
            else:
                ending, message = Status.FAILED, "worker shut down before the run finished; submit the experiment again"
            await asyncio.shield(_finish(backend, ending, message, tool_id, log_fields))
            raise
        finally:
            handler_tasks.pop(task, None)

    return await _finish(backend, status, message, tool_id, log_fields)


async def _supervise(
    task: asyncio.Task[None], backend: _RunBackend, timeout: float, settings: Settings, log_fields: dict[str, Any]
) -> tuple[Status, str]:
    """Wait for the handler; return the terminal state and message it earned."""
    loop = asyncio.get_running_loop()
    deadline = backend.started + timeout
    cancel_deadline = math.inf
    cause: Status | None = None
    poll_seconds = settings.cancel_poll_seconds
    if backend.events.watching:
        poll_seconds = max(poll_seconds, run_events.WATCHED_CANCEL_POLL_SECONDS)

    try:
        while not task.done():
            now = loop.time()
            wake = min(deadline, cancel_deadline, now + poll_seconds)
            # Woken early by a cancel request's notification, when this process watches the run.
            await asyncio.wait(
                {task, backend.events.next_news()}, timeout=max(0.0, wake - now), return_when=asyncio.FIRST_COMPLETED
            )
            # Whatever woke it, the row is read next; news from here on wakes the next wait.
            backend.events.take_news()
            if task.done():
                break
            now = loop.time()
            if now >= deadline:
                cause = Status.TIMED_OUT
            elif now >= cancel_deadline:
                cause = Status.CANCELLED
            elif cancel_deadline == math.inf and await backend.check_cancelled():
                cancel_deadline = now + settings.cancel_grace_seconds
                continue
            if cause is not None:
                logger.info("handler task cancelled", extra={**log_fields, "cause": cause.value})
                task.cancel()
                break
    except asyncio.CancelledError:
        # The worker itself is stopping: stop the handler too, then let the caller see it.
        task.cancel()
        await asyncio.wait({task}, timeout=settings.cancel_grace_seconds)
        raise

    await asyncio.wait({task}, timeout=settings.cancel_grace_seconds)
    if not task.done():
        logger.error("handler ignored cancellation; its task is abandoned", extra=log_fields)
    error = None if not task.done() or task.cancelled() else task.exception()

    if backend.completed:
        if error is not None:
            logger.warning("handler raised after saving results", extra={**log_fields, "error": repr(error)})
        return Status.COMPLETED, ""
    if cause is Status.TIMED_OUT:
        return Status.TIMED_OUT, f"exceeded the soft time limit of {timeout:g} s"
    if error is not None:
        logger.info("handler raised", extra={**log_fields, "error": repr(error)})
        return Status.FAILED, f"{type(error).__name__}: {error}"
    if cause is Status.CANCELLED or backend.cancel_seen or await backend.check_cancelled():
        return Status.CANCELLED, "cancelled on request"
    if task.cancelled():
        return Status.FAILED, "handler task was cancelled by something other than the engine"
    return Status.FAILED, "handler returned without saving results: call ctx.save_results(summary) before returning"


async def _finish(
    backend: _RunBackend,
    status: Status,
    message: str,
    tool_id: str,
    log_fields: dict[str, Any],
) -> Status:
    elapsed = asyncio.get_running_loop().time() - backend.started
    backend.ended = True
    if status is not Status.COMPLETED:
        try:
            async with backend.events.single_statement() as (conn, bus):
                await lifecycle.mark_ended(conn, bus, backend.experiment_id, status, message, backend.gpu_hours())
        except InvalidTransitionError as exc:
            # Another terminal write won (results saved at the last moment, or recovery).
            logger.info("terminal state already written", extra={**log_fields, "status": exc.current})
            return Status(exc.current) if exc.current else status

    metrics.experiments_completed_total.labels(tool_id, status.value).inc()
    metrics.experiment_duration_seconds.labels(tool_id, status.value).observe(elapsed)
    level = logging.WARNING if status in (Status.FAILED, Status.TIMED_OUT) else logging.INFO
    logger.log(level, "experiment finished", extra={**log_fields, "status": status.value, "error": message or None})
    return status
