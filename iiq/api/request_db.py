"""`RequestDb`: the one pooled connection a request uses, for its API-key lookup and its statements.

One connection per request, rather than one for the key lookup and another for the route,
saves a pool acquire and the pool's reset query (a round trip) on every authenticated request.
Litestar cleans up several generator dependencies of a request side by side, so this is the
only generator dependency that touches the connection: it also ends the org-scoped
transaction, before the connection goes back to the pool.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncGenerator
from contextlib import AbstractAsyncContextManager

from litestar.di import NamedDependency

from iiq.db.tx import begin_scoped, end_scoped
from iiq.db.types import Connection
from iiq.runtime import Runtime


class RequestDb:
    """A request's connection, taken from the pool on first use."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime
        self._acquired: AbstractAsyncContextManager[Connection] | None = None
        self._conn: Connection | None = None
        self._scoped = False

    async def connection(self) -> Connection:
        """Return the request's connection, outside any transaction unless `scoped` began one."""
        if self._conn is None:
            acquired = self._runtime.pool.acquire()
            self._conn = await acquired.__aenter__()
            self._acquired = acquired
        return self._conn

    async def scoped(self, org_id: uuid.UUID) -> Connection:
        """Begin the request's transaction, which shows only `org_id`'s rows; it ends with the request."""
        if self._scoped:
            raise RuntimeError("the request's org-scoped transaction has begun already")
        conn = await self.connection()
        await begin_scoped(conn, org_id)
        self._scoped = True
        return conn

    async def close(self, error: BaseException | None) -> None:
        """Commit the request's transaction, or roll it back after `error`, then release the connection."""
        acquired, self._acquired = self._acquired, None
        if acquired is None:
            return
        conn, self._conn = self._conn, None
        try:
            if self._scoped and conn is not None:
                await end_scoped(conn, failed=error is not None)
        except BaseException as exc:
            await acquired.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        await acquired.__aexit__(None, None, None)


async def provide_db(runtime: NamedDependency[Runtime]) -> AsyncGenerator[RequestDb, None]:
    """Yield the request's `RequestDb`; after the response is built, commit and release its connection."""
    db = RequestDb(runtime)
    try:
        yield db
    except BaseException as exc:
        await db.close(exc)
        raise
    await db.close(None)
