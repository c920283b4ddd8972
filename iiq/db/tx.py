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


@asynccontextmanager
async def org_transaction(pool: asyncpg.Pool, org_id: uuid.UUID) -> AsyncIterator[Connection]:
    """Open a transaction in which row-level security shows only `org_id`'s rows."""
    async with pool.acquire() as conn, conn.transaction():
        await set_org(conn, org_id)
        yield conn


@asynccontextmanager
async def service_transaction(pool: asyncpg.Pool) -> AsyncIterator[Connection]:
    """Open a runner-side transaction that bypasses row-level security. Request handlers never use it."""
    async with pool.acquire() as conn, conn.transaction():
        await set_bypass(conn)
        yield conn
