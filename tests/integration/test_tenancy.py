"""Tenant isolation: over HTTP, one org cannot see or touch another org's experiments, and in
Postgres the service role is bound by forced row-level security on every iiq table."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest

from iiq.db.pool import SERVICE_ROLE, connect_admin
from iiq.db.tx import org_transaction
from iiq.db.types import Connection
from iiq.errors import NotFoundError
from iiq.experiments.create import create_experiment
from iiq.experiments.events import append_event
from iiq.orgs import Principal
from tests.conftest import Server, Tenant, make_tenant
from tools import l5_batching

# Upper bound, in seconds, for an experiment to reach an expected status.
WAIT_SECONDS = 30.0
# 50 steps of 0.1 s: the experiment stays running for about 5 s, longer than the checks take.
LONG_SLEEP = {"steps": 50, "step_seconds": 0.1}
SLEEP_TARGET = {"model_id": "meta-llama/Llama-3.1-8B-Instruct", "hardware": "H100-SXM"}
TERMINAL = {"completed", "failed", "cancelled", "timed_out"}
# Tables that contain org data, with the column that contains the org id.
ORG_TABLES = {
    "experiments": "org_id",
    "experiment_events": "org_id",
    "experiment_quota": "org_id",
    "orgs": "id",
    "api_keys": "org_id",
    "experiment_templates": "org_id",
    "idempotency_keys": "org_id",
    "stream_tokens": "org_id",
}


async def wait_for_status(tenant: Tenant, experiment_id: str, statuses: set[str]) -> dict[str, Any]:
    """Poll GET /experiments/{id} until its status is in `statuses`, for at most WAIT_SECONDS."""
    deadline = time.monotonic() + WAIT_SECONDS
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        response = await tenant.client.get(f"/experiments/{experiment_id}")
        assert response.status_code == 200, response.text
        body = response.json()
        if body["status"] in statuses:
            return body
        await asyncio.sleep(0.05)
    raise AssertionError(
        f"experiment {experiment_id} is {body.get('status')!r} after {WAIT_SECONDS} s; "
        f"expected one of {sorted(statuses)}"
    )


@dataclass
class TwoOrgs:
    a: Tenant
    b: Tenant
    running_id: str
    completed_id: str
    other_id: str
    # Experiments created with an Idempotency-Key, one per org, by org id.
    keyed_ids: dict[uuid.UUID, str]


@pytest.fixture(scope="module")
async def orgs(server: Server, database_url: str) -> AsyncIterator[TwoOrgs]:
    """Create org A with a running test.sleep experiment and a completed L5 run, and org B
    with a completed test.sleep run. Both orgs then have rows in every table."""
    a = await make_tenant(database_url, server.base_url, name="org A")
    b = await make_tenant(database_url, server.base_url, name="org B")
    try:
        completed = await a.client.post(
            "/experiments",
            json={
                "tool_id": "L5",
                "target": dict(l5_batching.EXAMPLE_TARGET),
                "input_config": dict(l5_batching.EXAMPLE_INPUT_CONFIG),
            },
        )
        assert completed.status_code == 201, completed.text
        completed_id = completed.json()["id"]
        await wait_for_status(a, completed_id, TERMINAL)

        running = await a.client.post(
            "/experiments",
            json={
                "tool_id": "test.sleep",
                "target": SLEEP_TARGET,
                "input_config": LONG_SLEEP,
            },
        )
        assert running.status_code == 201, running.text
        running_id = running.json()["id"]
        await wait_for_status(a, running_id, {"running"})

        other = await b.client.post(
            "/experiments",
            json={
                "tool_id": "test.sleep",
                "target": SLEEP_TARGET,
                "input_config": {"steps": 1},
            },
        )
        assert other.status_code == 201, other.text
        other_id = other.json()["id"]
        await wait_for_status(b, other_id, TERMINAL)

        # A row in every other org-owned table: a template, an idempotency key, a stream token.
        keyed_ids: dict[uuid.UUID, str] = {}
        for tenant, owned_id in ((a, completed_id), (b, other_id)):
            template = {"name": "sweep", "tool_id": "test.sleep", "target": SLEEP_TARGET, "input_config": {}}
            assert (await tenant.client.post("/experiment-templates", json=template)).status_code == 201
            keyed = await tenant.client.post(
                "/experiments",
                json={"tool_id": "test.sleep", "target": SLEEP_TARGET, "input_config": {"steps": 1}},
                headers={"Idempotency-Key": f"tenancy-{uuid.uuid4()}"},
            )
            assert keyed.status_code == 201, keyed.text
            keyed_ids[tenant.org_id] = keyed.json()["id"]
            await wait_for_status(tenant, keyed_ids[tenant.org_id], TERMINAL)
            assert (await tenant.client.post(f"/experiments/{owned_id}/stream-tokens")).status_code == 201

        yield TwoOrgs(
            a=a, b=b, running_id=running_id, completed_id=completed_id, other_id=other_id, keyed_ids=keyed_ids
        )

        # Free the worker slot instead of sleeping out the remaining steps.
        await a.client.post(f"/experiments/{running_id}/cancel")
        await wait_for_status(a, running_id, TERMINAL)
    finally:
        await a.client.aclose()
        await b.client.aclose()


@pytest.fixture
async def admin(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await connect_admin(database_url)
    try:
        yield conn
    finally:
        await conn.close()


# --- over HTTP ---


async def test_setup_completed_run(orgs: TwoOrgs) -> None:
    response = await orgs.a.client.get(f"/experiments/{orgs.completed_id}")

    assert response.json()["status"] == "completed", response.text


async def test_owner_reads_artifact(orgs: TwoOrgs) -> None:
    response = await orgs.a.client.get(f"/experiments/{orgs.completed_id}/artifacts/report.json")

    assert response.status_code == 200, response.text
    assert response.json()["experiment_id"] == orgs.completed_id


@pytest.mark.parametrize("which", ["running", "completed"])
async def test_other_org_read_404(orgs: TwoOrgs, which: str) -> None:
    experiment_id = orgs.running_id if which == "running" else orgs.completed_id

    response = await orgs.b.client.get(f"/experiments/{experiment_id}")

    assert response.status_code == 404, response.text


@pytest.mark.parametrize("which", ["running", "completed"])
async def test_other_org_cancel_404(orgs: TwoOrgs, which: str) -> None:
    experiment_id = orgs.running_id if which == "running" else orgs.completed_id

    response = await orgs.b.client.post(f"/experiments/{experiment_id}/cancel")

    assert response.status_code == 404, response.text


@pytest.mark.parametrize("which", ["running", "completed"])
async def test_other_org_events_404(orgs: TwoOrgs, which: str) -> None:
    experiment_id = orgs.running_id if which == "running" else orgs.completed_id

    async with orgs.b.client.stream("GET", f"/experiments/{experiment_id}/events", timeout=10.0) as response:
        status = response.status_code

    assert status == 404


async def test_other_org_artifact_404(orgs: TwoOrgs) -> None:
    response = await orgs.b.client.get(f"/experiments/{orgs.completed_id}/artifacts/report.json")

    assert response.status_code == 404, response.text


@pytest.mark.parametrize("encoded_slash", ["%2F", "%2f", "%5C"])
async def test_other_org_artifact_traversal_404(orgs: TwoOrgs, encoded_slash: str) -> None:
    # B names its own experiment in the path and tries to climb into A's artifact directory.
    name = f"..{encoded_slash}{orgs.completed_id}{encoded_slash}report.json"

    response = await orgs.b.client.get(f"/experiments/{orgs.other_id}/artifacts/{name}")

    assert response.status_code == 404, response.text


async def test_other_org_list_excludes(orgs: TwoOrgs) -> None:
    response = await orgs.b.client.get("/experiments", params={"limit": "200"})

    assert response.status_code == 200, response.text
    listed = {item["id"] for item in response.json()["items"]}
    assert orgs.running_id not in listed
    assert orgs.completed_id not in listed
    assert listed == {orgs.other_id, orgs.keyed_ids[orgs.b.org_id]}


async def test_other_org_list_filtered_excludes(orgs: TwoOrgs) -> None:
    running = await orgs.b.client.get("/experiments", params={"status": "running"})
    by_tool = await orgs.b.client.get("/experiments", params={"tool_id": "L5"})

    assert running.json()["items"] == []
    assert by_tool.json()["items"] == []


async def test_other_org_quota_separate(orgs: TwoOrgs) -> None:
    quota_a = (await orgs.a.client.get("/quota")).json()
    quota_b = (await orgs.b.client.get("/quota")).json()

    assert quota_a["active"] == 1
    assert quota_b["active"] == 0


async def test_owner_list_includes(orgs: TwoOrgs) -> None:
    response = await orgs.a.client.get("/experiments")

    listed = {item["id"] for item in response.json()["items"]}
    assert listed == {orgs.running_id, orgs.completed_id, orgs.keyed_ids[orgs.a.org_id]}


async def test_owner_cannot_read_other(orgs: TwoOrgs) -> None:
    response = await orgs.a.client.get(f"/experiments/{orgs.other_id}")

    assert response.status_code == 404, response.text


async def test_owner_experiment_unchanged(orgs: TwoOrgs) -> None:
    # Runs after the other org's cancel attempts above.
    running = (await orgs.a.client.get(f"/experiments/{orgs.running_id}")).json()
    completed = (await orgs.a.client.get(f"/experiments/{orgs.completed_id}")).json()

    assert running["status"] == "running"
    assert running["cancel_requested"] is False
    assert completed["status"] == "completed"
    assert completed["cancel_requested"] is False


async def test_owner_events_no_cancel(orgs: TwoOrgs, admin: asyncpg.Connection) -> None:
    count = await admin.fetchval(
        "SELECT count(*) FROM iiq.experiment_events WHERE experiment_id = $1 AND event_type = 'cancel_requested'",
        uuid.UUID(orgs.running_id),
    )

    assert count == 0


# --- the service role in Postgres ---


async def test_service_role_not_superuser(admin: asyncpg.Connection) -> None:
    role = await admin.fetchrow("SELECT rolsuper, rolbypassrls FROM pg_roles WHERE rolname = $1", SERVICE_ROLE)

    assert role is not None, f"role {SERVICE_ROLE} does not exist"
    assert role["rolsuper"] is False
    assert role["rolbypassrls"] is False


async def test_every_table_forces_rls(admin: asyncpg.Connection) -> None:
    rows = await admin.fetch(
        """
        SELECT c.relname, c.relrowsecurity, c.relforcerowsecurity
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'iiq' AND c.relkind IN ('r', 'p') AND c.relname <> 'schema_migrations'
        ORDER BY c.relname
        """
    )

    tables = [row["relname"] for row in rows]
    without_rls = [row["relname"] for row in rows if not row["relrowsecurity"]]
    without_force = [row["relname"] for row in rows if not row["relforcerowsecurity"]]
    assert set(ORG_TABLES) <= set(tables), tables
    assert without_rls == []
    assert without_force == []


async def test_service_pool_runs_as_role(server: Server) -> None:
    async with server.runtime.pool.acquire() as conn:
        current = await conn.fetchval("SELECT current_user")

    assert current == SERVICE_ROLE


@pytest.mark.parametrize("table", sorted(ORG_TABLES))
async def test_role_without_org_sees_nothing(orgs: TwoOrgs, admin: asyncpg.Connection, table: str) -> None:
    total = await admin.fetchval(f"SELECT count(*) FROM iiq.{table}")

    async with admin.transaction():
        await admin.execute(f"SET LOCAL ROLE {SERVICE_ROLE}")
        visible = await admin.fetchval(f"SELECT count(*) FROM iiq.{table}")

    assert total > 0, f"iiq.{table} is empty, so this check proves nothing"
    assert visible == 0


@pytest.mark.parametrize("table", sorted(ORG_TABLES))
async def test_role_with_org_sees_own(orgs: TwoOrgs, admin: asyncpg.Connection, table: str) -> None:
    column = ORG_TABLES[table]
    # One snapshot for all four counts: org A's running experiment keeps adding events.
    async with admin.transaction(isolation="repeatable_read"):
        own_total = await admin.fetchval(f"SELECT count(*) FROM iiq.{table} WHERE {column} = $1", orgs.a.org_id)
        other_total = await admin.fetchval(f"SELECT count(*) FROM iiq.{table} WHERE {column} <> $1", orgs.a.org_id)
        await admin.execute(f"SET LOCAL ROLE {SERVICE_ROLE}")
        await admin.execute("SELECT set_config('app.org_id', $1, true)", str(orgs.a.org_id))
        visible_own = await admin.fetchval(f"SELECT count(*) FROM iiq.{table} WHERE {column} = $1", orgs.a.org_id)
        visible_other = await admin.fetchval(f"SELECT count(*) FROM iiq.{table} WHERE {column} <> $1", orgs.a.org_id)

    assert own_total > 0, f"org A has no rows in iiq.{table}, so this check proves nothing"
    assert other_total > 0, f"no other org has rows in iiq.{table}, so this check proves nothing"
    assert visible_own == own_total
    assert visible_other == 0


async def test_role_org_setting_is_local(orgs: TwoOrgs, admin: asyncpg.Connection) -> None:
    async with admin.transaction():
        await admin.execute(f"SET LOCAL ROLE {SERVICE_ROLE}")
        await admin.execute("SELECT set_config('app.org_id', $1, true)", str(orgs.a.org_id))
    async with admin.transaction():
        await admin.execute(f"SET LOCAL ROLE {SERVICE_ROLE}")
        visible = await admin.fetchval("SELECT count(*) FROM iiq.experiments")

    assert visible == 0


async def role_as_org_a(admin: asyncpg.Connection, orgs: TwoOrgs) -> None:
    await admin.execute(f"SET LOCAL ROLE {SERVICE_ROLE}")
    await admin.execute("SELECT set_config('app.org_id', $1, true)", str(orgs.a.org_id))


async def test_role_insert_other_org_experiment(orgs: TwoOrgs, admin: asyncpg.Connection) -> None:
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
        async with admin.transaction():
            await role_as_org_a(admin, orgs)
            await admin.execute(
                """
                INSERT INTO iiq.experiments (id, org_id, tool_id, target, input_config, status,
                                             estimated_gpu_hours, gpu_count, timeout_seconds)
                VALUES ($1, $2, 'test.sleep', '{}'::jsonb, '{}'::jsonb, 'pending', 0, 0, 60)
                """,
                uuid.uuid4(),
                orgs.b.org_id,
            )


async def test_role_insert_other_org_key(orgs: TwoOrgs, admin: asyncpg.Connection) -> None:
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
        async with admin.transaction():
            await role_as_org_a(admin, orgs)
            await admin.execute(
                "INSERT INTO iiq.api_keys (id, org_id, prefix, key_hash, name) VALUES ($1, $2, $3, $4, 'forged')",
                uuid.uuid4(),
                orgs.b.org_id,
                uuid.uuid4().hex[:16],
                b"\x00" * 32,
            )


async def test_role_insert_other_org_event(orgs: TwoOrgs, admin: asyncpg.Connection) -> None:
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
        async with admin.transaction():
            await role_as_org_a(admin, orgs)
            await admin.execute(
                "INSERT INTO iiq.experiment_events (org_id, experiment_id, seq, event_type) "
                "VALUES ($1, $2, 100000, 'forged')",
                orgs.b.org_id,
                uuid.UUID(orgs.running_id),
            )


async def test_role_move_row_to_other_org(orgs: TwoOrgs, admin: asyncpg.Connection) -> None:
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
        async with admin.transaction():
            await role_as_org_a(admin, orgs)
            await admin.execute(
                "UPDATE iiq.experiments SET org_id = $1 WHERE id = $2", orgs.b.org_id, uuid.UUID(orgs.completed_id)
            )


async def test_role_cannot_update_other_org(orgs: TwoOrgs, admin: asyncpg.Connection) -> None:
    async with admin.transaction():
        await admin.execute(f"SET LOCAL ROLE {SERVICE_ROLE}")
        await admin.execute("SELECT set_config('app.org_id', $1, true)", str(orgs.b.org_id))
        updated = await admin.execute(
            "UPDATE iiq.experiments SET cancel_requested_at = now() WHERE id = $1", uuid.UUID(orgs.running_id)
        )
        deleted = await admin.execute("DELETE FROM iiq.experiments WHERE id = $1", uuid.UUID(orgs.completed_id))

    assert updated == "UPDATE 0"
    assert deleted == "DELETE 0"


# --- the writes that set their own scope (migration 008) ---


async def _create_for_org_a(conn: Connection, server: Server, orgs: TwoOrgs) -> asyncpg.Record:
    runtime = server.runtime
    principal = Principal(org_id=orgs.a.org_id, key_id=uuid.uuid4(), key_name="test")
    return await create_experiment(
        conn,
        runtime.bus,
        runtime.settings,
        principal,
        tool_id="test.sleep",
        target=SLEEP_TARGET,
        input_config={"steps": 1},
        goal=None,
    )


async def test_create_alone_leaves_no_scope(orgs: TwoOrgs, server: Server) -> None:
    async with server.runtime.pool.acquire() as conn:
        row = await _create_for_org_a(conn, server, orgs)
        # Committed by itself: no transaction is left open, and no org scope outlives it.
        assert not conn.is_in_transaction()
        assert await conn.fetchval("SELECT iiq.current_org()") is None
        assert await conn.fetchval("SELECT count(*) FROM iiq.experiments WHERE id = $1", row["id"]) == 0

    assert row["org_id"] == orgs.a.org_id
    await wait_for_status(orgs.a, str(row["id"]), TERMINAL)


async def test_create_in_other_org_scope_writes_nothing(
    orgs: TwoOrgs, server: Server, admin: asyncpg.Connection
) -> None:
    count = "SELECT count(*) FROM iiq.experiments WHERE org_id = $1"
    quota = "SELECT active, reserved_gpu_hours FROM iiq.experiment_quota WHERE org_id = $1"
    before = (await admin.fetchval(count, orgs.a.org_id), await admin.fetchrow(quota, orgs.a.org_id))

    # The statement does not widen a scope its caller set: org A's rows stay out of reach.
    with pytest.raises(NotFoundError):
        async with org_transaction(server.runtime.pool, orgs.b.org_id) as conn:
            await _create_for_org_a(conn, server, orgs)

    assert (await admin.fetchval(count, orgs.a.org_id), await admin.fetchrow(quota, orgs.a.org_id)) == before


async def test_emit_in_other_org_scope_writes_nothing(orgs: TwoOrgs, server: Server, admin: asyncpg.Connection) -> None:
    running_id = uuid.UUID(orgs.running_id)

    with pytest.raises(LookupError):
        async with org_transaction(server.runtime.pool, orgs.b.org_id) as conn:
            await append_event(conn, running_id, "note", "forged", {}, max_payload_bytes=1000, require_running=True)

    # The run keeps emitting its own events meanwhile, so look for the forged one itself.
    forged = "SELECT count(*) FROM iiq.experiment_events WHERE experiment_id = $1 AND stage = 'forged'"
    assert await admin.fetchval(forged, running_id) == 0
