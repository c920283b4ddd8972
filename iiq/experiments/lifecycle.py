"""Lifecycle transitions: each is one statement, in the caller's transaction or, for the runner's, alone.

That statement is a guarded UPDATE of the experiment that also stores its status event and,
for a transition out of pending, queued or running, releases the experiment's quota share and
charges the run's GPU-hours (sql/queries/experiments.sql). A transition that matches no row
raises `InvalidTransitionError` naming the current state. The event row, and the notification
that the events table's trigger sends for it, commit with the transition, so a stream never
shows a state the database does not hold.
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
from iiq.experiments import metrics
from iiq.experiments.events import EventBus, StoredEvent, append_event
from iiq.experiments.states import STATUS_EVENT, Status

logger = logging.getLogger(__name__)

# The error message of an experiment cancelled while pending or queued (see cancel_not_started).
CANCELLED_BEFORE_START = "cancelled before it started"

# Status events are engine-written and small; the limit only guards handler payloads.
_STATUS_EVENT_LIMIT = 1 << 20


async def _transition(
    conn: Connection,
    bus: EventBus,
    experiment_id: uuid.UUID,
    requested: Status,
    name: str,
    *args: Any,
    payload: Mapping[str, Any],
) -> asyncpg.Record:
    """Run transition query `name`, which also stores the status event; announce that event."""
    row = await conn.fetchrow(query(name), experiment_id, *args)
    if row is None:
        await _raise_invalid(conn, experiment_id, requested)
    if row["event_seq"] is None:
        # A transition that sets its own scope reports the current status itself.
        if row["current_status"] is None:
            raise NotFoundError("experiment", experiment_id)
        raise InvalidTransitionError(experiment_id, row["current_status"], requested)
    event = StoredEvent(
        experiment_id=experiment_id,
        seq=row["event_seq"],
        event_type=STATUS_EVENT,
        stage=row["status"],
        payload=dict(payload),
        created_at=row["event_created_at"],
    )
    await bus.publish(conn, event)
    metrics.experiment_events_total.labels(STATUS_EVENT).inc()
    return row


async def _raise_invalid(conn: Connection, experiment_id: uuid.UUID, requested: Status) -> NoReturn:
    current = await conn.fetchrow(query("get_experiment_status"), experiment_id)
    if current is None:
        raise NotFoundError("experiment", experiment_id)
    raise InvalidTransitionError(experiment_id, current["status"], requested)


async def mark_running(conn: Connection, bus: EventBus, experiment_id: uuid.UUID, worker: str) -> asyncpg.Record:
    """Start a queued experiment; `worker` names the process that runs it, in the event."""
    payload = {"status": Status.RUNNING.value, "worker": worker}
    return await _transition(conn, bus, experiment_id, Status.RUNNING, "mark_running", payload, payload=payload)


async def mark_completed(
    conn: Connection,
    bus: EventBus,
    experiment_id: uuid.UUID,
    summary: Mapping[str, Any],
    actual_gpu_hours: float,
    now: datetime | None = None,
) -> asyncpg.Record:
    """Complete a running experiment, charging `actual_gpu_hours` to the month current at `now`.

    `now` None means the database's clock, which production uses so that all processes agree.
    """
    summary = dict(summary)
    payload = {"status": Status.COMPLETED.value, "results_summary": summary, "actual_gpu_hours": actual_gpu_hours}
    return await _transition(
        conn,
        bus,
        experiment_id,
        Status.COMPLETED,
        "finish_running",
        Status.COMPLETED.value,
        summary,
        None,
        actual_gpu_hours,
        payload,
        now,
        payload=payload,
    )


async def mark_ended(
    conn: Connection,
    bus: EventBus,
    experiment_id: uuid.UUID,
    status: Status,
    error_message: str,
    actual_gpu_hours: float,
    now: datetime | None = None,
) -> asyncpg.Record:
    """End a running experiment as failed, cancelled or timed_out, charging its GPU-hours (see mark_completed)."""
    if status not in (Status.FAILED, Status.CANCELLED, Status.TIMED_OUT):
        raise ValueError(f"mark_ended cannot end an experiment as {status}")
    payload = {"status": status.value, "error_message": error_message, "actual_gpu_hours": actual_gpu_hours}
    return await _transition(
        conn,
        bus,
        experiment_id,
        status,
        "finish_running",
        status.value,
        None,
        error_message,
        actual_gpu_hours,
        payload,
        now,
        payload=payload,
    )


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
        # `lock_experiment` locked the row and read a pending or queued status, so this UPDATE matches it.
        payload = {"status": Status.CANCELLED.value, "error_message": CANCELLED_BEFORE_START, "actual_gpu_hours": 0.0}
        row = await _transition(
            conn,
            bus,
            experiment_id,
            Status.CANCELLED,
            "cancel_not_started",
            CANCELLED_BEFORE_START,
            payload,
            None,
            payload=payload,
        )
        if row["job_id"] is not None:
            await remove_job(conn, row["job_id"])
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
