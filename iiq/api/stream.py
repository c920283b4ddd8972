"""`GET /experiments/{id}/events`: Server-Sent Events that replay stored events, then follow live ones.

The stream subscribes to the LISTEN hub before it replays, so an event committed during the
replay wakes it and is read once. The SSE `id` of each message is the event's sequence
number; a reconnecting client sends it back as `Last-Event-ID` and gets only later events.
The stream ends after the terminal status event.

Browsers: `EventSource` cannot send an Authorization header, so `POST .../stream-tokens`
issues a short-lived token for one experiment's stream, passed as `?stream_token=` (see
`iiq.stream_tokens` for what a token may do and why that is safe in a URL).
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

import asyncpg
import msgspec
from litestar import Response, get, post
from litestar.datastructures import CacheControlHeader
from litestar.di import NamedDependency, Provide
from litestar.exceptions import ServiceUnavailableException, ValidationException
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath, HeaderParameter, QueryParameter
from litestar.response import ServerSentEvent, ServerSentEventMessage
from litestar.status_codes import HTTP_204_NO_CONTENT

from iiq.api.auth import provide_stream_principal
from iiq.api.responses import READ_RESPONSES
from iiq.api.schemas import StreamToken
from iiq.db.queries import query
from iiq.db.tx import org_transaction
from iiq.db.types import Connection
from iiq.errors import NotFoundError
from iiq.experiments.events import StoredEvent, read_events
from iiq.experiments.hub import EventHub
from iiq.experiments.states import STATUS_EVENT, TERMINAL
from iiq.orgs import Principal
from iiq.runtime import Runtime
from iiq.stream_tokens import issue_stream_token

logger = logging.getLogger(__name__)

_BATCH = 500
_EVENT_ID = re.compile(r"[0-9]{1,9}")


def _is_terminal(event: StoredEvent) -> bool:
    return event.event_type == STATUS_EVENT and event.stage in TERMINAL


class _EncodedMessage(ServerSentEventMessage):
    """An event's message, encoded once when built: every stream of a feed sends the same object."""

    def __init__(self, event: StoredEvent) -> None:
        data = msgspec.json.encode(
            {
                "seq": event.seq,
                "event_type": event.event_type,
                "stage": event.stage,
                "payload": event.payload,
                "created_at": event.created_at,
            }
        ).decode()
        super().__init__(data=data, event=event.event_type, id=str(event.seq))
        self._wire = super().encode()
        # A feed keeps up to FEED_CAPACITY of these, so only the wire form keeps the data.
        self.data = None

    def encode(self) -> bytes:
        return self._wire


def parse_last_event_id(value: str | None) -> int:
    if value is None or value == "":
        return 0
    # str.isdigit() also accepts digits of other scripts ("²", "٣"), which int() rejects or reads.
    if not _EVENT_ID.fullmatch(value):
        raise ValidationException(
            f"invalid Last-Event-ID {value[:40]!r}: expected the non-negative integer id of an event"
        )
    return int(value)


async def _read_from_table(
    runtime: Runtime, principal: Principal, experiment_id: uuid.UUID, after: int
) -> tuple[list[StoredEvent], asyncpg.Record | None]:
    """Read the events after `after` under the caller's org; with none, also the experiment's row."""
    async with org_transaction(runtime.pool, principal.org_id) as conn:
        events = await read_events(conn, experiment_id, after, _BATCH)
        state = None if events else await conn.fetchrow(query("get_experiment"), experiment_id)
    return events, state


async def _follow(
    runtime: Runtime, hub: EventHub, principal: Principal, experiment_id: uuid.UUID, after: int
) -> AsyncIterator[ServerSentEventMessage]:
    keepalive = runtime.settings.sse_keepalive_seconds
    # Subscribed before the first read, so nothing committed from here on can be missed.
    subscription = hub.subscribe(experiment_id)
    try:
        while True:
            cached = subscription.feed.events_after(after)
            from_table = cached is None
            state = None
            if cached is not None:
                events = cached
            else:
                try:
                    # A client that disconnects cancels this generator. Shielded, the read still
                    # ends its transaction and returns its connection, instead of leaving the
                    # pool to roll back a connection handed back mid-transaction.
                    events, state = await asyncio.shield(_read_from_table(runtime, principal, experiment_id, after))
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                    # The response has started, so no error status can be sent: end the stream and
                    # let the client reconnect with Last-Event-ID, as after a restart.
                    logger.warning(
                        "event stream ended by a database error",
                        extra={"experiment_id": str(experiment_id), "last_event_id": after, "error": repr(exc)},
                    )
                    yield ServerSentEventMessage(
                        comment="database unavailable: reconnect with Last-Event-ID", data=None
                    )
                    return
            for event in events:
                # From the feed, 1,000 streams of one experiment share one encoded message.
                yield _EncodedMessage(event) if from_table else subscription.feed.rendered(event, _EncodedMessage)
                after = event.seq
                if _is_terminal(event):
                    return
            if events:
                continue  # more may be waiting: read again before sleeping
            terminal_seq = subscription.feed.terminal_seq
            if terminal_seq is not None and after >= terminal_seq:
                return  # resumed at or past the terminal event
            if from_table and state is None:
                return  # the experiment was deleted while followed
            if state is not None and state["status"] in TERMINAL and after >= state["last_event_seq"]:
                return
            if subscription.closed:
                # The process is shutting down; the client reconnects with Last-Event-ID.
                yield ServerSentEventMessage(comment="server shutting down: reconnect with Last-Event-ID", data=None)
                return
            if not await subscription.wait(keepalive):
                yield ServerSentEventMessage(comment="keep-alive", data=None)
    finally:
        subscription.close()


@get(
    "/experiments/{experiment_id:uuid}/events",
    media_type="text/event-stream",
    responses={
        **READ_RESPONSES,
        204: ResponseSpec(data_container=None, description="The terminal event was already delivered"),
    },
    tags=["experiments"],
    summary="Follow an experiment's events (Server-Sent Events)",
    description="Authenticate with the Authorization header or, from a browser's EventSource, with "
    "`?stream_token=`. Answers 204 No Content once the terminal event has been delivered, which makes "
    "EventSource stop reconnecting.",
    # This route alone also accepts a stream token. Every other route takes only the header.
    dependencies={"principal": Provide(provide_stream_principal)},
)
async def stream_events(
    experiment_id: FromPath[uuid.UUID],
    principal: NamedDependency[Principal],
    runtime: NamedDependency[Runtime],
    last_event_id: Annotated[str | None, HeaderParameter(name="Last-Event-ID", required=False, max_length=40)] = None,
    last_event_id_query: Annotated[
        str | None,
        QueryParameter(
            name="last_event_id",
            required=False,
            max_length=40,
            description="Resume after this event id in a new EventSource, which cannot set Last-Event-ID. "
            "The header, which EventSource sends on its own reconnects, takes precedence",
        ),
    ] = None,
) -> Response[Any]:
    # EventSource reconnects to the URL it was opened with, so the query value is the stale one.
    after = parse_last_event_id(last_event_id if last_event_id else last_event_id_query)
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
    if row["status"] in TERMINAL and after >= row["last_event_seq"]:
        # EventSource reconnects whenever a stream ends, so a browser that has seen the terminal event
        # would reconnect every few seconds. Any status but 200 makes it fail the connection for good
        # (HTML Standard, server-sent events processing model), and 204 means that nothing more follows.
        return Response(content=None, status_code=HTTP_204_NO_CONTENT)
    return ServerSentEvent(_follow(runtime, runtime.hub, principal, experiment_id, after))


@post(
    "/experiments/{experiment_id:uuid}/stream-tokens",
    status_code=201,
    responses=READ_RESPONSES,
    tags=["experiments"],
    summary="Issue a short-lived token that opens this experiment's event stream from a browser",
    description="The token opens `GET /experiments/{experiment_id}/events?stream_token=...` of this experiment "
    "only, read-only, until `expires_at`. It authenticates no other route. Pass it where a header cannot be "
    "sent, as with a browser's EventSource, and never put an API key in a URL.",
    # The body contains a credential: no cache may keep it.
    cache_control=CacheControlHeader(no_store=True),
)
async def create_stream_token(
    experiment_id: FromPath[uuid.UUID],
    principal: NamedDependency[Principal],
    conn: NamedDependency[Connection],
    runtime: NamedDependency[Runtime],
) -> StreamToken:
    issued = await issue_stream_token(conn, principal, experiment_id, runtime.settings.stream_token_ttl_seconds)
    return StreamToken(
        token=issued.token,
        experiment_id=issued.experiment_id,
        expires_at=issued.expires_at,
        events_url=issued.events_url,
    )
