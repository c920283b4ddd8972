"""Storing experiment events and announcing them.

`append_event` writes the row; an `EventBus` announces it. The Postgres bus sends one
``pg_notify`` carrying only ``<experiment_id>:<seq>``: payloads can exceed NOTIFY's
7999-byte limit, and NOTIFY bypasses row-level security, so listeners re-read rows under
their own org. The notification is delivered when the transaction commits, with the row.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import msgspec

from iiq.db.queries import query
from iiq.db.types import Connection
from iiq.errors import EventTooLargeError, InvalidTransitionError

# Channel names carry a version so a future payload format can run beside this one.
EVENTS_CHANNEL = "iiq_events_v1"


@dataclass(frozen=True)
class StoredEvent:
    experiment_id: uuid.UUID
    seq: int
    event_type: str
    stage: str | None
    payload: dict[str, Any]
    created_at: datetime


class EventBus(Protocol):
    """Announces a stored event; the real bus uses the transaction's connection."""

    async def publish(self, conn: Connection, event: StoredEvent) -> None: ...


class PostgresEventBus:
    async def publish(self, conn: Connection, event: StoredEvent) -> None:
        await conn.execute(query("notify_event"), EVENTS_CHANNEL, f"{event.experiment_id}:{event.seq}")


def encoded_size(payload: Mapping[str, Any]) -> int:
    return len(msgspec.json.encode(payload))


async def append_event(
    conn: Connection,
    experiment_id: uuid.UUID,
    event_type: str,
    stage: str | None,
    payload: Mapping[str, Any],
    *,
    max_payload_bytes: int,
    require_running: bool = False,
) -> StoredEvent:
    """Insert one event with the experiment's next sequence number, inside `conn`'s transaction."""
    if not event_type or len(event_type) > 64:
        raise ValueError(f"event_type must be 1 to 64 characters, got {event_type!r}")
    if stage is not None and len(stage) > 200:
        raise ValueError(f"stage must be at most 200 characters, got {len(stage)}")
    size = encoded_size(payload)
    if size > max_payload_bytes:
        raise EventTooLargeError(
            f"event payload of {size} bytes exceeds the maximum of {max_payload_bytes} bytes "
            "(IIQ_MAX_EVENT_PAYLOAD_BYTES): write large data to an artifact and emit its URL"
        )
    name = "append_running_event" if require_running else "append_event"
    row = await conn.fetchrow(query(name), experiment_id, event_type, stage, dict(payload))
    if row is None:
        current = await conn.fetchrow(query("get_experiment_status"), experiment_id)
        if current is None:
            raise LookupError(f"experiment {experiment_id} not found while appending an event")
        raise InvalidTransitionError(experiment_id, current["status"], "emit")
    return StoredEvent(
        experiment_id=experiment_id,
        seq=row["seq"],
        event_type=event_type,
        stage=stage,
        payload=dict(payload),
        created_at=row["created_at"],
    )


async def read_events(
    conn: Connection, experiment_id: uuid.UUID, after_seq: int, limit: int = 500
) -> list[StoredEvent]:
    rows = await conn.fetch(query("read_events"), experiment_id, after_seq, limit)
    return [
        StoredEvent(
            experiment_id=experiment_id,
            seq=row["seq"],
            event_type=row["event_type"],
            stage=row["stage"],
            payload=row["payload"],
            created_at=row["created_at"],
        )
        for row in rows
    ]
