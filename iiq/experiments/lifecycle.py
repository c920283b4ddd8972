"""Lifecycle transitions: each is one guarded UPDATE plus its event, in the caller's transaction.

A transition that matches no row raises `InvalidTransitionError` naming the current state.
The event row and its NOTIFY commit with the transition, so a stream never shows a state the
database does not hold. Terminal transitions also charge the run's GPU-hours to the org.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime
from typing import Any, NoReturn

import asyncpg

from iiq.db.queries import query
from iiq.db.types import Connection
from iiq.errors import ConflictError, InvalidTransitionError, NotFoundError
from iiq.experiments import metrics, quota
from iiq.experiments.events import EventBus, StoredEvent, append_event
from iiq.experiments.states import STATUS_EVENT, Status

logger = logging.getLogger(__name__)

# Status events are engine-written and small; the limit only guards handler payloads.
_STATUS_EVENT_LIMIT = 1 << 20


async def emit_status(
    conn: Connection, bus: EventBus, row: asyncpg.Record, payload: Mapping[str, Any] | None = None
) -> StoredEvent:
    body = {"status": row["status"], **(payload or {})}
    event = await append_event(
        conn, row["id"], STATUS_EVENT, row["status"], body, max_payload_bytes=_STATUS_EVENT_LIMIT
    )
    await bus.publish(conn, event)
    metrics.experiment_events_total.labels(STATUS_EVENT).inc()
    return event


async def _raise_invalid(conn: Connection, experiment_id: uuid.UUID, requested: Status) -> NoReturn:
    current = await conn.fetchrow(query("get_experiment_status"), experiment_id)
    if current is None:
        raise NotFoundError("experiment", experiment_id)
    raise InvalidTransitionError(experiment_id, current["status"], requested)


async def mark_queued(conn: Connection, bus: EventBus, experiment_id: uuid.UUID, job_id: int) -> asyncpg.Record:
    row = await conn.fetchrow(query("mark_queued"), experiment_id, job_id)
    if row is None:
        await _raise_invalid(conn, experiment_id, Status.QUEUED)
    await emit_status(conn, bus, row)
    return row


async def mark_running(conn: Connection, bus: EventBus, experiment_id: uuid.UUID, worker: str) -> asyncpg.Record:
    """Start a queued experiment; `worker` names the process that runs it, in the event."""
    row = await conn.fetchrow(query("mark_running"), experiment_id)
    if row is None:
        await _raise_invalid(conn, experiment_id, Status.RUNNING)
    await emit_status(conn, bus, row, {"worker": worker})
    return row


async def mark_completed(
    conn: Connection,
    bus: EventBus,
    experiment_id: uuid.UUID,
    summary: Mapping[str, Any],
    actual_gpu_hours: float,
    now: datetime,
) -> asyncpg.Record:
    row = await conn.fetchrow(query("mark_completed"), experiment_id, dict(summary), actual_gpu_hours)
    if row is None:
        await _raise_invalid(conn, experiment_id, Status.COMPLETED)
    await quota.charge(conn, row["org_id"], actual_gpu_hours, now)
    await emit_status(conn, bus, row, {"results_summary": row["results_summary"], "actual_gpu_hours": actual_gpu_hours})
    return row


async def mark_ended(
    conn: Connection,
    bus: EventBus,
    experiment_id: uuid.UUID,
    status: Status,
    error_message: str,
    actual_gpu_hours: float,
    now: datetime,
) -> asyncpg.Record:
    """End a running experiment as failed, cancelled or timed_out, charging its GPU-hours."""
    if status not in (Status.FAILED, Status.CANCELLED, Status.TIMED_OUT):
        raise ValueError(f"mark_ended cannot end an experiment as {status}")
    row = await conn.fetchrow(query("mark_ended"), experiment_id, status.value, error_message, actual_gpu_hours)
    if row is None:
        await _raise_invalid(conn, experiment_id, status)
    await quota.charge(conn, row["org_id"], actual_gpu_hours, now)
    await emit_status(conn, bus, row, {"error_message": error_message, "actual_gpu_hours": actual_gpu_hours})
    return row


RemoveJob = Callable[[Connection, int], Awaitable[None]]


async def cancel(conn: Connection, bus: EventBus, experiment_id: uuid.UUID, remove_job: RemoveJob) -> asyncpg.Record:
    """Cancel an experiment in the caller's transaction and return its row.

    Pending or queued: cancelled at once and its job removed from the queue. Running: flagged,
    so `check_cancelled()` turns true; the runner writes the terminal state. Already
    cancelled: returned unchanged. Any other terminal state raises `ConflictError`.
    """
    row = await conn.fetchrow(query("lock_experiment"), experiment_id)
    if row is None:
        raise NotFoundError("experiment", experiment_id)
    status = Status(row["status"])

    if status in (Status.PENDING, Status.QUEUED):
        row = await conn.fetchrow(query("cancel_not_started"), experiment_id)
        if row is None:
            # `lock_experiment` locked the row and read a pending or queued status, so this UPDATE matches it.
            await _raise_invalid(conn, experiment_id, Status.CANCELLED)
        if row["job_id"] is not None:
            await remove_job(conn, row["job_id"])
        await emit_status(conn, bus, row, {"error_message": row["error_message"], "actual_gpu_hours": 0.0})
        return row

    if status is Status.RUNNING:
        flagged = await conn.fetchrow(query("request_cancel"), experiment_id)
        if flagged is None:
            return row
        event = await append_event(
            conn, experiment_id, "cancel_requested", Status.RUNNING.value, {}, max_payload_bytes=_STATUS_EVENT_LIMIT
        )
        await bus.publish(conn, event)
        metrics.experiment_events_total.labels(event.event_type).inc()
        return flagged

    if status is Status.CANCELLED:
        return row
    raise ConflictError(
        f"experiment {experiment_id} is already {status.value}: only pending, queued or running "
        "experiments can be cancelled"
    )
