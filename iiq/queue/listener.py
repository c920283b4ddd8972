"""LISTEN on a dedicated asyncpg connection that is re-established whenever it is lost."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, NoReturn

import asyncpg
from procrastinate import connector

if TYPE_CHECKING:
    Connection = asyncpg.Connection[asyncpg.Record]
    # A notification as (channel, payload), or None once the connection has closed.
    EventQueue = asyncio.Queue[tuple[str, str] | None]

logger = logging.getLogger(__name__)

# Errors after which the listening connection is dropped and opened again.
CONNECTION_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)


@dataclasses.dataclass(frozen=True)
class ListenOptions:
    """Timing of the LISTEN connection, in seconds."""

    # Silence after which `SELECT 1` checks the connection. A half-open TCP connection
    # (peer gone without a FIN or RST) is noticed only by such a query.
    check_interval: float = connector.LISTEN_TIMEOUT
    # Time the check query, and a graceful close, may take before the connection counts as lost.
    check_timeout: float = 10.0
    # Time to connect and send every LISTEN before the attempt counts as failed.
    connect_timeout: float = 10.0
    # Wait before the first reconnect. It doubles after each failed attempt, up to the maximum.
    reconnect_initial_delay: float = 0.5
    reconnect_max_delay: float = 30.0


async def listen_forever(
    *,
    connect: Callable[[], Awaitable[Connection]],
    on_notification: connector.Notify,
    channels: Sequence[str],
    options: ListenOptions,
) -> NoReturn:
    """Relay every notification on `channels` to `on_notification` until cancelled.

    Connection failures never end the loop: each is logged and retried with capped
    exponential backoff. An exception raised by `on_notification` ends it, as it does
    in procrastinate's psycopg connector.
    """
    failed_attempts = 0
    delay = 0.0
    reconnecting = False
    log_fields = {"channels": list(channels)}

    while True:
        if delay:
            await asyncio.sleep(delay)

        events: EventQueue = asyncio.Queue()
        try:
            connection = await _open_listening_connection(connect, channels, events, options)
        except CONNECTION_ERRORS as error:
            failed_attempts += 1
            delay = min(
                options.reconnect_max_delay,
                options.reconnect_initial_delay * 2**failed_attempts,
            )
            logger.warning(
                "Listener connection failed, retrying",
                extra={
                    **log_fields,
                    "action": "listen_connect_failed",
                    "attempt": failed_attempts,
                    "retry_in_seconds": delay,
                    "error": repr(error),
                },
            )
            continue

        if reconnecting:
            logger.info(
                "Listener reconnected",
                extra={
                    **log_fields,
                    "action": "listen_reconnected",
                    "failed_attempts": failed_attempts,
                },
            )
        else:
            # Connecting at start is routine, unless it took retries.
            logger.log(
                logging.INFO if failed_attempts else logging.DEBUG,
                "Listener connected",
                extra={
                    **log_fields,
                    "action": "listen_connected",
                    "failed_attempts": failed_attempts,
                },
            )
        failed_attempts = 0

        loss_reason = await _relay_until_lost(connection, events, on_notification, options)

        reconnecting = True
        delay = options.reconnect_initial_delay
        logger.warning(
            "Listener connection lost, reconnecting",
            extra={
                **log_fields,
                "action": "listen_connection_lost",
                "reason": loss_reason,
                "retry_in_seconds": delay,
            },
        )


async def _open_listening_connection(
    connect: Callable[[], Awaitable[Connection]],
    channels: Sequence[str],
    events: EventQueue,
    options: ListenOptions,
) -> Connection:
    def on_notify(_connection: object, _pid: int, channel: str, payload: object) -> None:
        events.put_nowait((channel, str(payload)))

    def on_terminate(_connection: object) -> None:
        events.put_nowait(None)

    async with asyncio.timeout(options.connect_timeout):
        connection = await connect()
        try:
            connection.add_termination_listener(on_terminate)
            for channel in channels:
                # add_listener sends LISTEN with the channel quoted as an identifier.
                await connection.add_listener(channel, on_notify)
        except BaseException:
            connection.terminate()
            raise
    return connection


async def _relay_until_lost(
    connection: Connection,
    events: EventQueue,
    on_notification: connector.Notify,
    options: ListenOptions,
) -> str:
    """Relay notifications until the connection is lost, and return why it was lost.

    The connection is closed on return and on any exception, cancellation included.
    """
    loss_reason: str | None = None
    try:
        while loss_reason is None:
            try:
                event = await asyncio.wait_for(events.get(), timeout=options.check_interval)
            except TimeoutError:
                loss_reason = await _check_connection(connection, options)
                continue

            if event is None:
                loss_reason = "connection closed"
            else:
                channel, payload = event
                await on_notification(channel=channel, payload=payload)
        return loss_reason
    finally:
        if loss_reason is None:
            await _close_gracefully(connection, options)
        else:
            connection.terminate()


async def _check_connection(connection: Connection, options: ListenOptions) -> str | None:
    try:
        await connection.fetchval("SELECT 1", timeout=options.check_timeout)
    except CONNECTION_ERRORS as error:
        return f"check query failed: {error!r}"
    return None


async def _close_gracefully(connection: Connection, options: ListenOptions) -> None:
    # A failed close must not replace the exception or cancellation that is ending the relay.
    try:
        await connection.close(timeout=options.check_timeout)
    except CONNECTION_ERRORS:
        connection.terminate()
    except BaseException:
        connection.terminate()
        raise
