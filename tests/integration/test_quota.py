"""Quota admission under concurrency, charging, and the monthly reset."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from iiq.db.pool import connect_admin
from iiq.db.tx import scoped_transaction, service_transaction
from iiq.errors import InvalidTransitionError, QuotaExceeded
from iiq.experiments import lifecycle, quota
from iiq.experiments.create import create_experiment
from iiq.experiments.runner import run_experiment
from iiq.experiments.states import Status
from iiq.orgs import Principal
from tests.conftest import Server, Tenant
from tests.support.lifecycle import RecordingBus, create_unqueued, fetch_experiment

TARGET = {"model_id": "meta-llama/Llama-3.1-8B-Instruct", "hardware": "H100-SXM", "engine": "vllm"}
LONG_SLEEP = {"steps": 600, "step_seconds": 0.1}


def _body(tool_id: str = "test.sleep", **config: Any) -> dict[str, Any]:
    return {"tool_id": tool_id, "target": TARGET, "input_config": config}


async def _org_rows(database_url: str, org_id: uuid.UUID) -> tuple[int, int]:
    """Count the org's experiments and the procrastinate jobs that point at them."""
    conn = await connect_admin(database_url)
    try:
        experiments = await conn.fetchval("SELECT count(*) FROM iiq.experiments WHERE org_id = $1", org_id)
        jobs = await conn.fetchval(
            """
            SELECT count(*) FROM procrastinate.procrastinate_jobs j
            JOIN iiq.experiments e ON e.id = (j.args ->> 'experiment_id')::uuid
            WHERE e.org_id = $1
            """,
            org_id,
        )
        orphans = await conn.fetchval(
            """
            SELECT count(*) FROM procrastinate.procrastinate_jobs j
            WHERE j.task_name = 'iiq.run_experiment'
              AND NOT EXISTS (SELECT 1 FROM iiq.experiments e WHERE e.id = (j.args ->> 'experiment_id')::uuid)
            """
        )
    finally:
        await conn.close()
    assert orphans == 0
    return experiments, jobs


async def _cancel_all(tenant: Tenant) -> None:
    """Cancel every active experiment of the tenant and wait until none is active."""
    for _ in range(100):
        items = (await tenant.client.get("/experiments", params={"limit": 200})).json()["items"]
        active = [item for item in items if item["status"] in ("pending", "queued", "running")]
        if not active:
            return
        for item in active:
            await tenant.client.post(f"/experiments/{item['id']}/cancel")
        await asyncio.sleep(0.1)
    raise AssertionError("experiments still active 10 s after cancellation")


async def test_concurrency_cap_holds_under_load(tenant_factory: Any, database_url: str) -> None:
    tenant = await tenant_factory(max_concurrent=2)

    responses = await asyncio.gather(*(tenant.client.post("/experiments", json=_body(**LONG_SLEEP)) for _ in range(60)))

    codes = sorted(response.status_code for response in responses)
    assert codes.count(201) == 2
    assert codes.count(429) == 58
    assert await _org_rows(database_url, tenant.org_id) == (2, 2)
    rejected = next(response for response in responses if response.status_code == 429)
    assert rejected.headers["Retry-After"] == str(quota.CONCURRENCY_RETRY_AFTER_SECONDS)
    assert rejected.json()["extra"]["reason"] == "concurrency"
    assert rejected.json()["extra"]["max_concurrent"] == 2
    assert rejected.json()["extra"]["active"] == 2
    await _cancel_all(tenant)


async def _wait_for_a_lock_wait(database_url: str) -> None:
    """Return once a backend of the test database waits for a lock, for at most 10 s."""
    conn = await connect_admin(database_url)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            waiting = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
            if waiting:
                return
            await asyncio.sleep(0.01)
    finally:
        await conn.close()
    raise AssertionError("no backend waited for a lock within 10 s")


async def test_create_losing_last_room_leaves_nothing(server: Server, tenant_factory: Any, database_url: str) -> None:
    tenant = await tenant_factory(monthly_gpu_hours=100.0, max_concurrent=1)
    principal = Principal(org_id=tenant.org_id, key_id=tenant.key_id, key_name="test")
    pool = server.runtime.pool
    async with pool.acquire() as first, pool.acquire() as second:
        async with scoped_transaction(first, tenant.org_id):
            # The first create takes the only room and keeps the org's quota row locked until it commits.
            await _create_costing_half(first, server, principal, None)
            # The second finds room in its check without a lock, writes its rows, then waits
            # for the quota row.
            losing = asyncio.ensure_future(_create_costing_half(second, server, principal, None))
            await _wait_for_a_lock_wait(database_url)
        # Once the first has committed, the second's admission finds no room.
        with pytest.raises(QuotaExceeded) as refused:
            await losing

    assert refused.value.reason == "concurrency"
    assert await _org_rows(database_url, tenant.org_id) == (1, 1)
    admin = await connect_admin(database_url)
    try:
        followed = await admin.fetchval(
            "SELECT count(DISTINCT experiment_id) FROM iiq.experiment_events WHERE org_id = $1", tenant.org_id
        )
    finally:
        await admin.close()
    assert followed == 1
    counters, recount = await _counters_and_recount(database_url, tenant.org_id)
    assert counters == recount
    await _cancel_all(tenant)


async def _counters_and_recount(database_url: str, org_id: uuid.UUID) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """Read the org's quota counters and a recount of its experiments from one snapshot."""
    conn = await connect_admin(database_url)
    try:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            counters = await conn.fetchrow(
                "SELECT active, reserved_gpu_hours, used_gpu_hours FROM iiq.experiment_quota WHERE org_id = $1", org_id
            )
            recount = await conn.fetchrow(
                """
                SELECT count(*) FILTER (WHERE status IN ('pending', 'queued', 'running'))::int AS active,
                       coalesce(sum(estimated_gpu_hours) FILTER (WHERE status IN ('pending', 'queued', 'running')), 0)
                           AS reserved,
                       coalesce(sum(actual_gpu_hours), 0) AS used
                FROM iiq.experiments WHERE org_id = $1
                """,
                org_id,
            )
    finally:
        await conn.close()
    assert counters is not None and recount is not None
    return (counters["active"], round(counters["reserved_gpu_hours"], 9), round(counters["used_gpu_hours"], 9)), (
        recount["active"],
        round(recount["reserved"], 9),
        round(recount["used"], 9),
    )


async def test_counters_match_a_recount_through_churn(tenant_factory: Any, database_url: str) -> None:
    tenant = await tenant_factory(monthly_gpu_hours=1000.0, max_concurrent=6)
    short = {"steps": 2, "step_seconds": 0.02}

    for _round in range(6):
        responses = await asyncio.gather(
            *(tenant.client.post("/experiments", json=_body(cost=0.3, **short)) for _ in range(10))
        )
        assert {response.status_code for response in responses} <= {201, 429}
        created = [response.json()["id"] for response in responses if response.status_code == 201]
        assert created
        # Cancel half while the other half runs, and compare while both are under way.
        cancels = asyncio.gather(*(tenant.client.post(f"/experiments/{id_}/cancel") for id_ in created[::2]))
        counters, recount = await _counters_and_recount(database_url, tenant.org_id)
        assert counters == recount
        await cancels

    for _ in range(200):
        counters, recount = await _counters_and_recount(database_url, tenant.org_id)
        if recount[0] == 0:
            break
        await asyncio.sleep(0.05)
    assert counters == recount
    assert counters[:2] == (0, 0)
    assert counters[2] > 0


async def test_budget_admits_exactly_n(tenant_factory: Any, database_url: str) -> None:
    tenant = await tenant_factory(monthly_gpu_hours=1.0, max_concurrent=100)

    responses = await asyncio.gather(
        *(tenant.client.post("/experiments", json=_body(cost=0.1, **LONG_SLEEP)) for _ in range(50))
    )

    codes = sorted(response.status_code for response in responses)
    assert codes.count(201) == 10
    assert codes.count(402) == 40
    assert await _org_rows(database_url, tenant.org_id) == (10, 10)
    rejected = next(response for response in responses if response.status_code == 402).json()["extra"]
    assert rejected["reason"] == "budget"
    assert rejected["monthly_gpu_hours"] == 1.0
    assert rejected["reserved_gpu_hours"] == pytest.approx(1.0)
    assert rejected["estimated_gpu_hours"] == 0.1
    assert "month_resets_at" in rejected
    await _cancel_all(tenant)


async def test_cost_zero_never_refused_for_budget(tenant_factory: Any) -> None:
    tenant = await tenant_factory(monthly_gpu_hours=0.0, max_concurrent=1)

    first = await tenant.client.post("/experiments", json=_body("test.free", **LONG_SLEEP))
    second = await tenant.client.post("/experiments", json=_body("test.free", **LONG_SLEEP))
    priced = await tenant.client.post("/experiments", json=_body(cost=0.5))

    assert first.status_code == 201
    assert second.status_code == 429
    assert priced.status_code == 429
    await _cancel_all(tenant)
    costly = await tenant.client.post("/experiments", json=_body(cost=0.5))
    assert costly.status_code == 402


async def test_quota_route_shows_reservation(tenant_factory: Any) -> None:
    tenant = await tenant_factory(monthly_gpu_hours=5.0, max_concurrent=3)
    await tenant.client.post("/experiments", json=_body(cost=1.5, **LONG_SLEEP))

    quota_body = (await tenant.client.get("/quota")).json()

    assert quota_body["monthly_gpu_hours"] == 5.0
    assert quota_body["reserved_gpu_hours"] == 1.5
    assert quota_body["remaining_gpu_hours"] == 3.5
    assert quota_body["active"] == 1
    assert quota_body["max_concurrent"] == 3
    await _cancel_all(tenant)


async def _used(pool: asyncpg.Pool, org_id: uuid.UUID) -> float:
    async with service_transaction(pool) as conn:
        value: float = await conn.fetchval("SELECT used_gpu_hours FROM iiq.experiment_quota WHERE org_id = $1", org_id)
    return value


@pytest.mark.parametrize(
    ("tool_id", "config", "expected"),
    [
        ("test.sleep", {"steps": 2, "step_seconds": 0.05}, Status.COMPLETED),
        ("test.fail", {}, Status.FAILED),
        ("test.short_timeout", {"seconds": 30}, Status.TIMED_OUT),
    ],
)
async def test_terminal_state_charges_once(
    server: Server, tenant: Tenant, tool_id: str, config: dict[str, Any], expected: Status
) -> None:
    pool = server.runtime.pool
    target = {**TARGET, "gpu_count": 4}
    experiment_id = await create_unqueued(pool, server.settings, tenant.org_id, tool_id, config, target)

    status = await run_experiment(pool, experiment_id, RecordingBus(), settings=server.settings)

    row = await fetch_experiment(pool, experiment_id)
    assert status is expected
    assert row["actual_gpu_hours"] > 0
    assert await _used(pool, tenant.org_id) == pytest.approx(row["actual_gpu_hours"])
    with pytest.raises(InvalidTransitionError):
        async with service_transaction(pool) as conn:
            await lifecycle.mark_ended(
                conn, RecordingBus(), experiment_id, Status.FAILED, "again", 5.0, quota.utc_now()
            )
    assert await _used(pool, tenant.org_id) == pytest.approx(row["actual_gpu_hours"])


async def test_cancelled_run_charges_its_time(server: Server, tenant: Tenant) -> None:
    pool = server.runtime.pool
    experiment_id = await create_unqueued(
        pool,
        server.settings,
        tenant.org_id,
        "test.sleep",
        {"steps": 200, "step_seconds": 0.05},
        {**TARGET, "gpu_count": 2},
    )
    started = time.monotonic()
    run = asyncio.create_task(run_experiment(pool, experiment_id, RecordingBus(), settings=server.settings))
    await asyncio.sleep(0.5)
    await tenant.client.post(f"/experiments/{experiment_id}/cancel")
    await asyncio.wait_for(run, timeout=10)
    elapsed_hours = (time.monotonic() - started) / 3600

    row = await fetch_experiment(pool, experiment_id)
    assert row["status"] == "cancelled"
    assert 0 < row["actual_gpu_hours"] <= elapsed_hours * 2
    assert await _used(pool, tenant.org_id) == pytest.approx(row["actual_gpu_hours"])


async def test_gpu_free_tool_charges_nothing(server: Server, tenant: Tenant) -> None:
    pool = server.runtime.pool
    experiment_id = await create_unqueued(
        pool, server.settings, tenant.org_id, "test.free", {"steps": 2, "step_seconds": 0.05}, TARGET
    )

    await run_experiment(pool, experiment_id, RecordingBus(), settings=server.settings)

    row = await fetch_experiment(pool, experiment_id)
    assert row["status"] == "completed"
    assert row["actual_gpu_hours"] == 0
    assert await _used(pool, tenant.org_id) == 0


async def test_cancel_before_start_charges_nothing(tenant: Tenant, server: Server) -> None:
    experiment = (await tenant.client.post("/experiments", json=_body(**LONG_SLEEP))).json()
    await tenant.client.post(f"/experiments/{experiment['id']}/cancel")

    assert await _used(server.runtime.pool, tenant.org_id) == pytest.approx(0.0, abs=0.01)


# --- monthly reset, with a controlled clock -------------------------------------------------


def _utc(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)


ROLLOVER_CASES = [
    # (reset due at, now, expect a reset, next reset)
    (_utc(2027, 2, 1), _utc(2027, 1, 31, 23, 59, 59), False, _utc(2027, 2, 1)),
    (_utc(2027, 2, 1), _utc(2027, 2, 1, 0, 0, 0), True, _utc(2027, 3, 1)),
    (_utc(2027, 2, 1), _utc(2027, 2, 1, 0, 0, 1), True, _utc(2027, 3, 1)),
    (_utc(2028, 2, 1), _utc(2028, 2, 29, 12, 0, 0), True, _utc(2028, 3, 1)),
    (_utc(2027, 3, 1), _utc(2027, 3, 31, 23, 59, 59), True, _utc(2027, 4, 1)),
    (_utc(2027, 12, 1), _utc(2027, 12, 31, 23, 59, 59), True, _utc(2028, 1, 1)),
]


@pytest.mark.parametrize(("resets_at", "now", "resets", "next_reset"), ROLLOVER_CASES)
@pytest.mark.parametrize("session_zone", ["UTC", "Pacific/Kiritimati", "America/Los_Angeles"])
@pytest.mark.parametrize("step", ["admit", "release"])
async def test_month_rollover(
    server: Server,
    tenant: Tenant,
    resets_at: datetime,
    now: datetime,
    resets: bool,
    next_reset: datetime,
    session_zone: str,
    step: str,
) -> None:
    principal = Principal(org_id=tenant.org_id, key_id=tenant.key_id, key_name="test")
    with pytest.raises(_RolledBack) as rolled_back:
        await _step_then_roll_back(server, tenant, principal, resets_at, now, session_zone, step)
    row = rolled_back.value.row

    if step == "admit":
        assert (row["used_gpu_hours"], row["active"], row["reserved_gpu_hours"]) == (0 if resets else 7, 2, 0.75)
    else:
        assert (row["used_gpu_hours"], row["active"], row["reserved_gpu_hours"]) == (0.5 if resets else 7.5, 0, 0)
    assert row["month_resets_at"] == next_reset


async def _create_costing_half(
    conn: asyncpg.Connection, server: Server, principal: Principal, now: datetime | None
) -> None:
    """Create an experiment estimated at 0.5 GPU-hours at `now` (None: the database's clock)."""
    body = _body(cost=0.5)
    await create_experiment(
        conn,
        RecordingBus(),
        server.settings,
        principal,
        tool_id=body["tool_id"],
        target=body["target"],
        input_config=body["input_config"],
        goal=None,
        now=now,
    )


class _RolledBack(Exception):
    def __init__(self, row: asyncpg.Record) -> None:
        self.row = row


async def _step_then_roll_back(
    server: Server,
    tenant: Tenant,
    principal: Principal,
    resets_at: datetime,
    now: datetime,
    session_zone: str,
    step: str,
) -> None:
    """Admit or release at `now`, read the quota row, then roll back, so no run ever starts."""
    async with server.runtime.pool.acquire() as conn, conn.transaction():
        await conn.execute(f"SET LOCAL TIME ZONE '{session_zone}'")
        await conn.execute("SELECT set_config('app.rls_bypass', 'true', true)")
        await conn.execute(
            "UPDATE iiq.experiment_quota SET used_gpu_hours = 7, month_resets_at = $2, active = 1, "
            "reserved_gpu_hours = 0.25 WHERE org_id = $1",
            tenant.org_id,
            resets_at,
        )
        if step == "admit":
            await _create_costing_half(conn, server, principal, now)
        else:
            # What a terminal transition does for a run of estimate 0.25 that used 0.5 GPU-hours.
            await conn.execute("SELECT iiq.release_quota($1, 0.25, 0.5, $2)", tenant.org_id, now)
        row = await conn.fetchrow("SELECT * FROM iiq.experiment_quota WHERE org_id = $1", tenant.org_id)
        raise _RolledBack(row)


@pytest.mark.parametrize(("resets_at", "now", "resets", "next_reset"), ROLLOVER_CASES)
async def test_sql_next_month_start_matches_python(
    server: Server, resets_at: datetime, now: datetime, resets: bool, next_reset: datetime
) -> None:
    async with server.runtime.pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL TIME ZONE 'Pacific/Kiritimati'")
        value = await conn.fetchval("SELECT iiq.next_month_start($1)", now)

    assert value == quota.next_month_start(now)


@pytest.mark.parametrize("step", ["admit", "release"])
async def test_month_follows_database_clock(server: Server, tenant: Tenant, step: str) -> None:
    """With no `now` given, as in production, the database's clock decides that the month ended."""
    principal = Principal(org_id=tenant.org_id, key_id=tenant.key_id, key_name="test")
    async with server.runtime.pool.acquire() as conn:
        with pytest.raises(_RolledBack) as rolled_back:
            async with conn.transaction():
                await conn.execute("SELECT set_config('app.rls_bypass', 'true', true)")
                db_now = await conn.fetchval(
                    "UPDATE iiq.experiment_quota SET used_gpu_hours = 7, active = 1, reserved_gpu_hours = 0.25, "
                    "month_resets_at = now() - interval '1 second' WHERE org_id = $1 RETURNING now()",
                    tenant.org_id,
                )
                if step == "admit":
                    await _create_costing_half(conn, server, principal, None)
                else:
                    await conn.execute("SELECT iiq.release_quota($1, 0.25, 0.5, NULL)", tenant.org_id)
                raise _RolledBack(
                    await conn.fetchrow("SELECT * FROM iiq.experiment_quota WHERE org_id = $1", tenant.org_id)
                )
    row = rolled_back.value.row

    assert row["used_gpu_hours"] == (0 if step == "admit" else 0.5)
    assert row["month_resets_at"] == quota.next_month_start(db_now)


def test_next_month_start_ignores_process_zone() -> None:
    original = os.environ.get("TZ")
    os.environ["TZ"] = "Asia/Kolkata"
    time.tzset()
    try:
        local_evening = datetime(2027, 1, 31, 23, 0, tzinfo=UTC).astimezone()
        assert quota.next_month_start(local_evening) == _utc(2027, 2, 1)
        assert quota.next_month_start(_utc(2027, 1, 31, 20, 0)) == _utc(2027, 2, 1)
    finally:
        if original is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = original
        time.tzset()


async def test_quota_route_applies_due_reset(server: Server, tenant: Tenant) -> None:
    async with service_transaction(server.runtime.pool) as conn:
        await conn.execute(
            "UPDATE iiq.experiment_quota SET used_gpu_hours = 3, month_resets_at = $2 WHERE org_id = $1",
            tenant.org_id,
            quota.utc_now() - timedelta(seconds=1),
        )

    quota_body = (await tenant.client.get("/quota")).json()

    assert quota_body["used_gpu_hours"] == 0
    assert datetime.fromisoformat(quota_body["month_resets_at"]) == quota.next_month_start(quota.utc_now())
