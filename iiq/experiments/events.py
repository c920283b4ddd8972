"""Storing experiment events and announcing them.

`append_event` and the lifecycle transitions write the rows. A trigger on the events table
(migrations 007 and 011) sends one ``pg_notify`` per row after the create's first two, which
commit before anyone can follow the experiment. It carries only ``<experiment_id>:<seq>``:
payloads can exceed NOTIFY's 7999-byte limit, and NOTIFY bypasses row-level security, so
listeners re-read rows under their own org. The notification is delivered when the
transaction commits, with the row. Writers still pass each stored event to an `EventBus`,
which is where a process hands its own events to its own streams, and where tests record
them.

A process that both writes events and serves their streams (`iiq serve` with its worker)
need not wait for its own notification: the runner hands each stored event to the bus's
`local` streams once its transaction has committed. The notification is still sent, for
every other process.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

import msgspec

from iiq.db.queries import query
from iiq.db.types import Connection
from iiq.errors import EventTooLargeError, InvalidTransitionError

# Channel names carry a version so a future payload format can run beside this one. The
# trigger function iiq.notify_event (sql/migrations/007_notify_events.sql) names it too.
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


class LocalStreams(Protocol):
    """The event streams of this process (the LISTEN hub), from the side of a writer in this process.

    A writer calls `expect` for each event it publishes, then, once its transaction has
    ended, `deliver` if the commit succeeded and `abandon` otherwise (or when it cannot tell).
    A rolled-back event must never be delivered. A writer whose statement commits by itself
    calls `begin_write` before sending it, then `expect` and `deliver` for its events, then
    `end_write`.
    """

    def expect(self, event: StoredEvent) -> None: ...

    def begin_write(self, experiment_id: uuid.UUID) -> None: ...

    def end_write(self, experiment_id: uuid.UUID) -> None: ...

    def deliver(self, event: StoredEvent) -> None: ...

    def abandon(self, event: StoredEvent) -> None: ...

    def watch(self, experiment_id: uuid.UUID, callback: Callable[[int | None], None]) -> None: ...

    def unwatch(self, experiment_id: uuid.UUID, callback: Callable[[int | None], None]) -> None: ...


@runtime_checkable
class LocalEventBus(EventBus, Protocol):
    """A bus that also reaches the streams of its own process, when that process has any."""

    local: LocalStreams | None


class PostgresEventBus:
    """The bus of a running process. `local` is this process's streams, if any.

    Publishing sends nothing: the database notifies every process of each stored event.
    """

    def __init__(self, local: LocalStreams | None = None) -> None:
        self.local = local

    async def publish(self, conn: Connection, event: StoredEvent) -> None:
        return None


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
    """Insert one event with the experiment's next sequence number.

    Inside `conn`'s transaction; with `require_running`, `conn` may also be outside any
    transaction, and the insert then commits by itself.
    """
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
    if require_running:
        # Sets its own scope when `conn` has none, so it may be sent outside a transaction.
        row = await conn.fetchrow(query("append_running_event"), experiment_id, event_type, stage, dict(payload))
        status = None if row is None else row["status"]
    else:
        row = await conn.fetchrow(query("append_event"), experiment_id, event_type, stage, dict(payload))
        if row is None:
            current = await conn.fetchrow(query("get_experiment_status"), experiment_id)
            status = None if current is None else current["status"]
    if row is None or row["seq"] is None:
        if status is None:
            raise LookupError(f"experiment {experiment_id} not found while appending an event")
        raise InvalidTransitionError(experiment_id, status, "emit")
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
