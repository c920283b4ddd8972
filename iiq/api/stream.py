"""`GET /experiments/{id}/events`: Server-Sent Events that replay stored events, then follow live ones.

The stream subscribes to the LISTEN hub before it replays, so an event committed during the
replay wakes it and is read once. The SSE `id` of each message is the event's sequence
number; a reconnecting client sends it back as `Last-Event-ID` and gets only later events.
The stream ends after the terminal status event.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Annotated

import msgspec
from litestar import get
from litestar.di import NamedDependency
from litestar.exceptions import ServiceUnavailableException, ValidationException
from litestar.params import FromPath, HeaderParameter
from litestar.response import ServerSentEvent, ServerSentEventMessage

from iiq.api.responses import READ_RESPONSES
from iiq.db.queries import query
from iiq.db.tx import org_transaction
from iiq.errors import NotFoundError
from iiq.experiments.events import StoredEvent, read_events
from iiq.experiments.hub import EventHub
from iiq.experiments.states import STATUS_EVENT, TERMINAL
from iiq.orgs import Principal
from iiq.runtime import Runtime

_BATCH = 500


def _is_terminal(event: StoredEvent) -> bool:
    return event.event_type == STATUS_EVENT and event.stage in TERMINAL


def _message(event: StoredEvent) -> ServerSentEventMessage:
    data = msgspec.json.encode(
        {
            "seq": event.seq,
            "event_type": event.event_type,
            "stage": event.stage,
            "payload": event.payload,
            "created_at": event.created_at,
        }
    ).decode()
    return ServerSentEventMessage(data=data, event=event.event_type, id=str(event.seq))


def parse_last_event_id(value: str | None) -> int:
    if value is None or value == "":
        return 0
    if not value.isdigit() or len(value) > 9:
        raise ValidationException(
            f"invalid Last-Event-ID {value[:40]!r}: expected the non-negative integer id of an event"
        )
    return int(value)


async def _follow(
    runtime: Runtime, hub: EventHub, principal: Principal, experiment_id: uuid.UUID, after: int
) -> AsyncIterator[ServerSentEventMessage]:
    keepalive = runtime.settings.sse_keepalive_seconds
    # Subscribed before the first read, so nothing committed from here on can be missed.
    subscription = hub.subscribe(experiment_id)
    try:
        while True:
            async with org_transaction(runtime.pool, principal.org_id) as conn:
                events = await read_events(conn, experiment_id, after, _BATCH)
                state = None if events else await conn.fetchrow(query("get_experiment"), experiment_id)
            for event in events:
                yield _message(event)
                after = event.seq
                if _is_terminal(event):
                    return
            if len(events) == _BATCH:
                continue
            if state is None and not events:
                return  # the experiment was deleted while followed
            if state is not None and state["status"] in TERMINAL and after >= state["last_event_seq"]:
                return
            if subscription.closed:
                return  # the process is shutting down; the client reconnects with Last-Event-ID
            if not events and not await subscription.wait(keepalive):
                yield ServerSentEventMessage(comment="keep-alive", data=None)
    finally:
        subscription.close()


@get(
    "/experiments/{experiment_id:uuid}/events",
    media_type="text/event-stream",
    responses=READ_RESPONSES,
    tags=["experiments"],
    summary="Follow an experiment's events (Server-Sent Events)",
)
async def stream_events(
    experiment_id: FromPath[uuid.UUID],
    principal: NamedDependency[Principal],
    runtime: NamedDependency[Runtime],
    last_event_id: Annotated[str | None, HeaderParameter(name="Last-Event-ID", required=False, max_length=40)] = None,
) -> ServerSentEvent:
    after = parse_last_event_id(last_event_id)
    if runtime.hub is None:
        raise ServiceUnavailableException("this process does not serve event streams")
    async with org_transaction(runtime.pool, principal.org_id) as conn:
        row = await conn.fetchrow(query("get_experiment"), experiment_id)
    if row is None:
        raise NotFoundError("experiment", experiment_id)
    if after > row["last_event_seq"]:
        raise ValidationException(
            f"Last-Event-ID {after} is beyond the last event ({row['last_event_seq']}) of experiment {experiment_id}"
        )
    return ServerSentEvent(_follow(runtime, runtime.hub, principal, experiment_id, after))
