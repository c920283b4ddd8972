"""`RequestDb`: one connection per request, its org-scoped transaction ended with the request."""

from __future__ import annotations

import uuid

import asyncpg
import pytest

from iiq.api.request_db import RequestDb, provide_db
from iiq.db.tx import TransactionAbortedError, service_transaction
from tests.conftest import Server, Tenant


async def _name(pool: asyncpg.Pool, org_id: uuid.UUID) -> str:
    async with service_transaction(pool) as conn:
        name: str = await conn.fetchval("SELECT name FROM iiq.orgs WHERE id = $1", org_id)
    return name


def _free(pool: asyncpg.Pool) -> int:
    return pool.get_idle_size() + (pool.get_max_size() - pool.get_size())


async def test_lookup_and_route_share_connection(server: Server, tenant: Tenant) -> None:
    db = RequestDb(server.runtime)
    unscoped = await db.connection()
    scoped = await db.scoped(tenant.org_id)

    assert scoped is unscoped
    assert await scoped.fetchval("SELECT iiq.current_org()") == tenant.org_id
    await db.close(None)


async def test_request_success_commits(server: Server, tenant: Tenant) -> None:
    pool = server.runtime.pool
    free = _free(pool)
    dependency = provide_db(server.runtime)
    db = await anext(dependency)
    conn = await db.scoped(tenant.org_id)
    await conn.execute("UPDATE iiq.orgs SET name = 'renamed by request' WHERE id = $1", tenant.org_id)

    with pytest.raises(StopAsyncIteration):
        await anext(dependency)

    assert await _name(pool, tenant.org_id) == "renamed by request"
    assert _free(pool) == free


async def test_request_failure_rolls_back(server: Server, tenant: Tenant) -> None:
    pool = server.runtime.pool
    before = await _name(pool, tenant.org_id)
    free = _free(pool)
    dependency = provide_db(server.runtime)
    db = await anext(dependency)
    conn = await db.scoped(tenant.org_id)
    await conn.execute("UPDATE iiq.orgs SET name = 'renamed by a failed request' WHERE id = $1", tenant.org_id)

    # Litestar throws the route's exception into the dependency.
    with pytest.raises(RuntimeError, match="route failed"):
        await dependency.athrow(RuntimeError("route failed"))

    assert await _name(pool, tenant.org_id) == before
    assert _free(pool) == free


async def test_aborted_commit_raises_and_releases(server: Server, tenant: Tenant) -> None:
    pool = server.runtime.pool
    free = _free(pool)
    db = RequestDb(server.runtime)
    conn = await db.scoped(tenant.org_id)
    with pytest.raises(asyncpg.UndefinedTableError):
        await conn.execute("SELECT * FROM iiq.no_such_table")

    # The route caught the statement's error, but nothing of the transaction may be stored.
    with pytest.raises(TransactionAbortedError):
        await db.close(None)

    assert _free(pool) == free
    async with pool.acquire() as fresh:
        assert not fresh.is_in_transaction()


async def test_unused_request_takes_no_connection(server: Server) -> None:
    pool = server.runtime.pool
    free = _free(pool)
    db = RequestDb(server.runtime)

    await db.close(None)

    assert _free(pool) == free
