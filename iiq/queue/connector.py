"""Procrastinate connector over asyncpg, so deferring a job can join iiq's own transactions."""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, LiteralString, NoReturn

import asyncpg
from procrastinate import connector, exceptions, manager

from iiq.queue import listener
from iiq.queue.codecs import init_connection

if TYPE_CHECKING:
    from asyncpg.types import Type

    from iiq.db.types import Connection

    Pool = asyncpg.Pool[asyncpg.Record]

__all__ = ["AsyncpgConnector", "init_connection"]

# Errors that mean the database or the driver failed, as opposed to a bug in the caller.
DRIVER_ERRORS = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    OSError,
    TimeoutError,
)

_PLACEHOLDER = re.compile(r"%\((?P<name>[^)]+)\)s|%%")
_UNIQUE_KEY_DETAIL = re.compile(r"Key \((?P<column>.*?)\)=\((?P<value>.*?)\)")
# Postgres infers one of these types for a parameter used with `||` on text.
_TEXT_TYPES = frozenset({"text", "varchar", "bpchar", "name"})


@functools.lru_cache(maxsize=512)
def translate_query(query: str) -> tuple[str, tuple[str, ...]]:
    """Rewrite `%(name)s` placeholders as `$n` and `%%` as `%`.

    Returns the new query and the argument name for each `$n` in order. A name used
    several times keeps the number of its first use.
    """
    numbers: dict[str, int] = {}

    def replace(match: re.Match[str]) -> str:
        name = match.group("name")
        if name is None:
            return "%"
        if name not in numbers:
            numbers[name] = len(numbers) + 1
        return f"${numbers[name]}"

    return _PLACEHOLDER.sub(replace, query), tuple(numbers)


def _to_text(value: Any) -> Any:
    # psycopg sends Python numbers as numbers, which Postgres casts to text. asyncpg
    # encodes each argument by its parameter's type and rejects a number for text.
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _converters_for(parameters: Sequence[Type]) -> tuple[Callable[[Any], Any] | None, ...]:
    return tuple(_to_text if parameter.name in _TEXT_TYPES else None for parameter in parameters)


def _raise_translated(error: Exception) -> NoReturn:
    if isinstance(error, asyncpg.UniqueViolationError):
        constraint_name = getattr(error, "constraint_name", None)
        queueing_lock = None
        if constraint_name == manager.QUEUEING_LOCK_CONSTRAINT:
            match = _UNIQUE_KEY_DETAIL.search(getattr(error, "detail", None) or "")
            if match and match.group("column") == "queueing_lock":
                queueing_lock = match.group("value")
        raise exceptions.UniqueViolation(
            str(error), constraint_name=constraint_name, queueing_lock=queueing_lock
        ) from error
    raise exceptions.ConnectorException(f"{type(error).__name__}: {error}") from error


@contextlib.contextmanager
def _wrap_driver_errors() -> Iterator[None]:
    try:
        yield
    except DRIVER_ERRORS as error:
        _raise_translated(error)


class AsyncpgConnector(connector.BaseAsyncConnector):
    """Procrastinate connector that runs its queries on an asyncpg pool.

    Only the async API is supported. The pool must have `init_connection` as its `init`,
    and every session that touches the queue needs procrastinate's schema in its
    `search_path`, because procrastinate's trigger bodies use unqualified names.
    """

    def __init__(
        self,
        pool: Pool | None = None,
        *,
        dsn: str,
        server_settings: dict[str, str] | None = None,
        listen_options: listener.ListenOptions | None = None,
    ) -> None:
        """Set up the connector on `pool`, or on a pool that `open_async` creates from `dsn`.

        `dsn` and `server_settings` also open the dedicated LISTEN connection.
        """
        self._pool: Pool | None = pool
        self._owns_pool = False
        self._dsn = dsn
        self._server_settings = dict(server_settings or {})
        self._listen_options = listen_options or listener.ListenOptions()
        # Per translated query, the converter for each parameter (None keeps the value).
        self._converters: dict[str, tuple[Callable[[Any], Any] | None, ...]] = {}

    @property
    def pool(self) -> Pool:
        if self._pool is None:
            raise exceptions.AppNotOpen
        return self._pool

    def get_sync_connector(self) -> connector.BaseConnector:
        # The sync methods below raise, so procrastinate's sync API fails with a clear error.
        return self

    async def open_async(self, pool: Pool | None = None) -> None:
        """Use `pool`, keep the pool already set, or create one with `init_connection`."""
        if pool is not None:
            if self._pool is not None and self._pool is not pool:
                raise exceptions.ConnectorException(
                    "AsyncpgConnector already uses another pool: pass that same pool,"
                    " or create a new connector for this one"
                )
            self._pool = pool
            return
        if self._pool is not None:
            return

        with _wrap_driver_errors():
            self._pool = await asyncpg.create_pool(
                self._dsn, init=init_connection, server_settings=self._server_settings
            )
        self._owns_pool = True

    async def close_async(self) -> None:
        """Close the pool if this connector created it, and leave a pool passed in open."""
        if self._pool is None or not self._owns_pool:
            return
        pool, self._pool, self._owns_pool = self._pool, None, False
        with _wrap_driver_errors():
            await pool.close()

    async def _fetch(self, connection: Connection, query: str, arguments: dict[str, Any]) -> list[asyncpg.Record]:
        sql, names = translate_query(query)
        try:
            values = [arguments[name] for name in names]
        except KeyError as error:
            raise exceptions.ConnectorException(
                f"missing query argument {error.args[0]!r}: pass it as a keyword argument"
            ) from None
        if not values:
            return await connection.fetch(sql)

        converters = self._converters.get(sql)
        if converters is None:
            # Learn the parameter types once per query from a prepared statement, and
            # run this first call on that statement to avoid a second Parse.
            statement = await connection.prepare(sql)
            converters = _converters_for(statement.get_parameters())
            self._converters[sql] = converters
            return await statement.fetch(*_convert(values, converters))
        return await connection.fetch(sql, *_convert(values, converters))

    async def _fetch_on_pool(self, query: str, arguments: dict[str, Any]) -> list[asyncpg.Record]:
        with _wrap_driver_errors():
            async with self.pool.acquire() as connection:
                return await self._fetch(connection, query, arguments)

    async def _fetch_on_connection(
        self, connection: Connection, query: str, arguments: dict[str, Any]
    ) -> list[asyncpg.Record]:
        with _wrap_driver_errors():
            return await self._fetch(connection, query, arguments)

    async def execute_query_async(self, query: LiteralString, **arguments: Any) -> None:
        sql, names = translate_query(query)
        if names:
            await self._fetch_on_pool(query, arguments)
            return
        # Without arguments asyncpg uses the simple query protocol, which accepts the
        # multi-statement script of SchemaManager.apply_schema_async.
        with _wrap_driver_errors():
            async with self.pool.acquire() as connection:
                await connection.execute(sql)

    async def execute_query_one_async(self, query: LiteralString, **arguments: Any) -> dict[str, Any]:
        return _first_row(await self._fetch_on_pool(query, arguments))

    async def execute_query_all_async(self, query: LiteralString, **arguments: Any) -> list[dict[str, Any]]:
        return [dict(row) for row in await self._fetch_on_pool(query, arguments)]

    async def execute_query_one_async_with_connection(
        self, connection: Connection, query: LiteralString, **arguments: Any
    ) -> dict[str, Any]:
        """Run the query on the caller's connection, inside any transaction it has open."""
        return _first_row(await self._fetch_on_connection(connection, query, arguments))

    async def execute_query_all_async_with_connection(
        self, connection: Connection, query: LiteralString, **arguments: Any
    ) -> list[dict[str, Any]]:
        """Run the query on the caller's connection, inside any transaction it has open."""
        rows = await self._fetch_on_connection(connection, query, arguments)
        return [dict(row) for row in rows]

    async def listen_notify(self, on_notification: connector.Notify, channels: Iterable[str]) -> None:
        """Relay notifications on `channels` to `on_notification` until cancelled.

        Uses a dedicated connection outside the pool and reconnects whenever it is lost.
        Notifications sent while it is down are lost, as with any LISTEN.
        """
        await listener.listen_forever(
            connect=self._connect_listener,
            on_notification=on_notification,
            channels=list(channels),
            options=self._listen_options,
        )

    async def _connect_listener(self) -> asyncpg.Connection[asyncpg.Record]:
        return await asyncpg.connect(
            self._dsn,
            server_settings=self._server_settings,
            timeout=self._listen_options.connect_timeout,
        )

    def open(self, pool: Any = None) -> None:
        _reject_sync("open")

    def close(self) -> None:
        _reject_sync("close")

    def execute_query(self, query: LiteralString, **arguments: Any) -> None:
        _reject_sync("execute_query")

    def execute_query_one(self, query: LiteralString, **arguments: Any) -> dict[str, Any]:
        _reject_sync("execute_query_one")

    def execute_query_all(self, query: LiteralString, **arguments: Any) -> list[dict[str, Any]]:
        _reject_sync("execute_query_all")

    def execute_query_one_with_connection(
        self, connection: Any, query: LiteralString, **arguments: Any
    ) -> dict[str, Any]:
        _reject_sync("execute_query_one_with_connection")

    def execute_query_all_with_connection(
        self, connection: Any, query: LiteralString, **arguments: Any
    ) -> list[dict[str, Any]]:
        _reject_sync("execute_query_all_with_connection")


def _convert(values: list[Any], converters: Sequence[Callable[[Any], Any] | None]) -> list[Any]:
    return [
        value if converter is None else converter(value) for value, converter in zip(values, converters, strict=True)
    ]


def _first_row(rows: list[asyncpg.Record]) -> dict[str, Any]:
    if not rows:
        raise exceptions.NoResult
    return dict(rows[0])


def _reject_sync(method: str) -> NoReturn:
    raise exceptions.ConnectorException(
        f"AsyncpgConnector.{method} is not supported because the connector is async only: "
        "use the async API (for example defer_async or open_async) from an event loop"
    )
