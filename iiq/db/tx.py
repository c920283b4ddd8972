"""Transactions scoped for row-level security.

Both settings are transaction-local (`set_config(..., true)`), so a pooled connection never
carries an org or a bypass into the next transaction. No code path sets them from request
input: the org comes from the authenticated API key.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg

from iiq.db.types import Connection


async def set_org(conn: Connection, org_id: uuid.UUID) -> None:
    await conn.execute("SELECT set_config('app.org_id', $1, true)", str(org_id))


async def set_bypass(conn: Connection) -> None:
    await conn.execute("SELECT set_config('app.rls_bypass', 'true', true)")


class TransactionAbortedError(RuntimeError):
    """Raised when COMMIT rolled back a transaction in which a statement had failed."""


# BEGIN and the scope go to the server as one simple query: one round trip instead of two.
_BEGIN_BYPASS = "BEGIN; SELECT set_config('app.rls_bypass', 'true', true)"
_BEGIN_AS_ORG = "BEGIN; SELECT set_config('app.org_id', '{org_id}', true)"


async def begin_scoped(conn: Connection, org_id: uuid.UUID | None) -> None:
    """Begin a transaction on `conn` that shows only `org_id`'s rows, or every row when `org_id` is None.

    End it with `end_scoped`. Code in it must not open `conn.transaction()`: asyncpg refuses
    it inside a transaction it did not begin.
    """
    if org_id is None:
        begin = _BEGIN_BYPASS
    elif isinstance(org_id, uuid.UUID):
        # The canonical text of a UUID holds only hex digits and dashes, so it is safe inline.
        begin = _BEGIN_AS_ORG.format(org_id=org_id)
    else:
        raise TypeError(f"org_id must be a uuid.UUID or None, got {type(org_id).__name__}")
    await conn.execute(begin)


async def end_scoped(conn: Connection, *, failed: bool) -> None:
    """Commit the transaction that `begin_scoped` began, or roll it back when `failed`."""
    if failed:
        await _rollback(conn)
        return
    # After a failed statement whose error the block caught, Postgres replies to COMMIT with
    # ROLLBACK and raises no error, so the reply is checked here.
    if await conn.execute("COMMIT") != "COMMIT":
        raise TransactionAbortedError(
            "the transaction was rolled back at COMMIT because a statement in it had failed; nothing was stored"
        )


@asynccontextmanager
async def scoped_transaction(conn: Connection, org_id: uuid.UUID | None) -> AsyncIterator[Connection]:
    """Run a transaction on `conn` that shows only `org_id`'s rows, or every row when `org_id` is None.

    Committed when the block ends normally and rolled back when it raises. Code inside must
    not open `conn.transaction()`: asyncpg refuses it inside a transaction it did not begin.
    """
    await begin_scoped(conn, org_id)
    try:
        yield conn
    except BaseException:
        await end_scoped(conn, failed=True)
        raise
    await end_scoped(conn, failed=False)


async def _rollback(conn: Connection) -> None:
    if conn.is_closed():
        return
    try:
        await conn.execute("ROLLBACK")
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
        # The connection is broken or still busy with a cancelled query: releasing it to the
        # pool resets or closes it, which ends the transaction either way.
        pass


@asynccontextmanager
async def org_transaction(pool: asyncpg.Pool, org_id: uuid.UUID) -> AsyncIterator[Connection]:
    """Open a transaction in which row-level security shows only `org_id`'s rows."""
    async with pool.acquire() as conn, scoped_transaction(conn, org_id):
        yield conn


@asynccontextmanager
async def service_transaction(pool: asyncpg.Pool) -> AsyncIterator[Connection]:
    """Open a runner-side transaction that bypasses row-level security. Request handlers never use it."""
    async with pool.acquire() as conn, scoped_transaction(conn, None):
        yield conn
