"""`scoped_transaction`: begun with its scope in one round trip, committed or rolled back, never leaking its scope."""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg
import pytest

from iiq.db.tx import TransactionAbortedError, org_transaction, scoped_transaction, service_transaction
from tests.conftest import Server, Tenant


async def _renamed_count(pool: asyncpg.Pool, org_id: uuid.UUID) -> int:
    async with service_transaction(pool) as conn:
        value: int = await conn.fetchval("SELECT count(*) FROM iiq.orgs WHERE id = $1 AND name = 'renamed'", org_id)
    return value


async def test_commits_when_the_block_ends(server: Server, tenant: Tenant) -> None:
    pool = server.runtime.pool
    async with org_transaction(pool, tenant.org_id) as conn:
        await conn.execute("UPDATE iiq.orgs SET name = 'renamed' WHERE id = $1", tenant.org_id)

    assert await _renamed_count(pool, tenant.org_id) == 1


async def test_rolls_back_when_the_block_raises(server: Server, tenant: Tenant) -> None:
    pool = server.runtime.pool
    with pytest.raises(RuntimeError, match="boom"):
        async with org_transaction(pool, tenant.org_id) as conn:
            await conn.execute("UPDATE iiq.orgs SET name = 'renamed' WHERE id = $1", tenant.org_id)
            raise RuntimeError("boom")

    assert await _renamed_count(pool, tenant.org_id) == 0
    async with pool.acquire() as conn:
        assert not conn.is_in_transaction()


async def test_rolls_back_after_a_failed_statement(server: Server, tenant: Tenant) -> None:
    pool = server.runtime.pool
    with pytest.raises(asyncpg.UndefinedTableError):
        async with org_transaction(pool, tenant.org_id) as conn:
            await conn.execute("UPDATE iiq.orgs SET name = 'renamed' WHERE id = $1", tenant.org_id)
            await conn.execute("SELECT * FROM iiq.no_such_table")

    assert await _renamed_count(pool, tenant.org_id) == 0


async def test_org_scope_ends_with_transaction(server: Server, tenant: Tenant) -> None:
    pool = server.runtime.pool
    async with pool.acquire() as conn:
        async with scoped_transaction(conn, tenant.org_id):
            visible = await conn.fetchval("SELECT array_agg(id) FROM iiq.orgs")
            setting = await conn.fetchval("SELECT current_setting('app.org_id')")
        after = await conn.fetchval("SELECT coalesce(current_setting('app.org_id', true), '')")
        bypass_after = await conn.fetchval("SELECT coalesce(current_setting('app.rls_bypass', true), '')")

    assert visible == [tenant.org_id]
    assert setting == str(tenant.org_id)
    assert after == ""
    assert bypass_after == ""


async def test_bypass_sees_every_org(server: Server, tenant_factory: Any) -> None:
    a, b = await tenant_factory(), await tenant_factory()
    async with service_transaction(server.runtime.pool) as conn:
        ids = await conn.fetchval("SELECT array_agg(id) FROM iiq.orgs WHERE id = ANY($1::uuid[])", [a.org_id, b.org_id])

    assert set(ids) == {a.org_id, b.org_id}


async def test_non_uuid_org_id_rejected(server: Server) -> None:
    async with server.runtime.pool.acquire() as conn:
        with pytest.raises(TypeError, match="uuid.UUID"):
            async with scoped_transaction(conn, "00000000-0000-0000-0000-000000000000'; DROP TABLE x; --"):  # type: ignore[arg-type]
                pass
        assert not conn.is_in_transaction()


async def test_caught_statement_error_fails_the_commit(server: Server, tenant: Tenant) -> None:
    pool = server.runtime.pool
    with pytest.raises(TransactionAbortedError, match="nothing was stored"):
        async with org_transaction(pool, tenant.org_id) as conn:
            await conn.execute("UPDATE iiq.orgs SET name = 'renamed' WHERE id = $1", tenant.org_id)
            with pytest.raises(asyncpg.DivisionByZeroError):
                await conn.execute("SELECT 1 / 0")

    assert await _renamed_count(pool, tenant.org_id) == 0
