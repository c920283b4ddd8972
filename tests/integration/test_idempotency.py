"""Idempotency-Key on creates over real HTTP: retries sequential and concurrent, mismatched
requests, rejected creates, expiry, and the quota charged once."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from iiq.db.pool import connect_admin
from iiq.errors import ConfigurationError
from iiq.settings import load_settings
from tests.conftest import Server, Tenant

TARGET = {"model_id": "meta-llama/Llama-3.1-8B-Instruct", "hardware": "H100-SXM", "engine": "vllm"}
# 600 steps of 0.1 s: the experiment stays active until the test cancels it.
LONG_SLEEP = {"steps": 600, "step_seconds": 0.1}
CONCURRENT_REQUESTS = 20


def _body(cost: float = 0.5, **config: Any) -> dict[str, Any]:
    return {"tool_id": "test.sleep", "target": TARGET, "input_config": {**LONG_SLEEP, "cost": cost, **config}}


def _key() -> dict[str, str]:
    return {"Idempotency-Key": str(uuid.uuid4())}


@pytest.fixture
async def admin(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await connect_admin(database_url)
    try:
        yield conn
    finally:
        await conn.close()


async def _experiment_ids(admin: asyncpg.Connection, org_id: uuid.UUID) -> list[str]:
    rows = await admin.fetch("SELECT id FROM iiq.experiments WHERE org_id = $1 ORDER BY created_at", org_id)
    return [str(row["id"]) for row in rows]


async def _key_row(admin: asyncpg.Connection, org_id: uuid.UUID, key: str) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await admin.fetchrow(
        "SELECT * FROM iiq.idempotency_keys WHERE org_id = $1 AND key = $2", org_id, key
    )
    return row


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


async def _save_template(tenant: Tenant) -> str:
    response = await tenant.client.post(
        "/experiment-templates",
        json={
            "name": f"template-{uuid.uuid4()}",
            "tool_id": "test.sleep",
            "target": TARGET,
            "input_config": _body()["input_config"],
        },
    )
    assert response.status_code == 201, response.text
    template_id: str = response.json()["id"]
    return template_id


# --- sequential retries ---


async def test_retry_returns_first_experiment(tenant: Tenant, admin: asyncpg.Connection) -> None:
    headers = _key()

    first = await tenant.client.post("/experiments", json=_body(), headers=headers)
    retry = await tenant.client.post("/experiments", json=_body(), headers=headers)

    assert first.status_code == 201, first.text
    assert "Idempotent-Replayed" not in first.headers
    assert retry.status_code == 201, retry.text
    assert retry.headers["Idempotent-Replayed"] == "true"
    assert retry.json()["id"] == first.json()["id"]
    assert retry.json()["config_hash"] == first.json()["config_hash"]
    assert await _experiment_ids(admin, tenant.org_id) == [first.json()["id"]]
    quota = (await tenant.client.get("/quota")).json()
    assert quota["active"] == 1
    assert quota["reserved_gpu_hours"] == pytest.approx(0.5)
    await _cancel_all(tenant)


async def test_retry_with_reordered_keys_replays(tenant: Tenant, admin: asyncpg.Connection) -> None:
    headers = _key()
    body = _body()
    reordered = {
        "input_config": dict(reversed(body["input_config"].items())),
        "target": TARGET,
        "tool_id": "test.sleep",
    }

    first = await tenant.client.post("/experiments", json=body, headers=headers)
    retry = await tenant.client.post("/experiments", json=reordered, headers=headers)

    assert retry.status_code == 201, retry.text
    assert retry.headers["Idempotent-Replayed"] == "true"
    assert retry.json()["id"] == first.json()["id"]
    await _cancel_all(tenant)


async def test_replay_skips_quota_admission(tenant_factory: Any, admin: asyncpg.Connection) -> None:
    tenant = await tenant_factory(max_concurrent=1)
    headers = _key()

    first = await tenant.client.post("/experiments", json=_body(), headers=headers)
    retry = await tenant.client.post("/experiments", json=_body(), headers=headers)
    new_key = await tenant.client.post("/experiments", json=_body(), headers=_key())

    assert first.status_code == 201, first.text
    assert retry.status_code == 201, retry.text
    assert retry.json()["id"] == first.json()["id"]
    assert new_key.status_code == 429, new_key.text
    await _cancel_all(tenant)


async def test_key_different_body_422(tenant: Tenant, admin: asyncpg.Connection) -> None:
    headers = _key()

    first = await tenant.client.post("/experiments", json=_body(), headers=headers)
    changed = await tenant.client.post("/experiments", json=_body(cost=0.6), headers=headers)

    assert first.status_code == 201, first.text
    assert changed.status_code == 422, changed.text
    error = changed.json()
    assert headers["Idempotency-Key"] in error["detail"]
    assert "new key" in error["detail"]
    assert error["extra"]["idempotency_key"] == headers["Idempotency-Key"]
    assert await _experiment_ids(admin, tenant.org_id) == [first.json()["id"]]
    await _cancel_all(tenant)


async def test_key_other_route_422(tenant: Tenant, admin: asyncpg.Connection) -> None:
    template_id = await _save_template(tenant)
    other_template_id = await _save_template(tenant)
    headers = _key()

    first = await tenant.client.post(f"/experiments/from-template/{template_id}", json={}, headers=headers)
    replay = await tenant.client.post(f"/experiments/from-template/{template_id}", json={}, headers=headers)
    other_template = await tenant.client.post(
        f"/experiments/from-template/{other_template_id}", json={}, headers=headers
    )
    plain = await tenant.client.post("/experiments", json=_body(), headers=headers)

    assert first.status_code == 201, first.text
    assert first.json()["template_id"] == template_id
    assert replay.status_code == 201, replay.text
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert replay.json()["id"] == first.json()["id"]
    assert other_template.status_code == 422, other_template.text
    assert plain.status_code == 422, plain.text
    assert await _experiment_ids(admin, tenant.org_id) == [first.json()["id"]]
    await _cancel_all(tenant)


async def test_key_scoped_to_org(tenant_factory: Any) -> None:
    first_org = await tenant_factory()
    second_org = await tenant_factory()
    headers = _key()

    first = await first_org.client.post("/experiments", json=_body(), headers=headers)
    second = await second_org.client.post("/experiments", json=_body(), headers=headers)

    assert first.status_code == 201, first.text
    assert second.status_code == 201, second.text
    assert "Idempotent-Replayed" not in second.headers
    assert second.json()["id"] != first.json()["id"]
    await _cancel_all(first_org)
    await _cancel_all(second_org)


async def test_without_key_creates_each_time(tenant: Tenant, admin: asyncpg.Connection) -> None:
    first = await tenant.client.post("/experiments", json=_body())
    second = await tenant.client.post("/experiments", json=_body())

    assert first.json()["id"] != second.json()["id"]
    assert len(await _experiment_ids(admin, tenant.org_id)) == 2
    assert await admin.fetchval("SELECT count(*) FROM iiq.idempotency_keys WHERE org_id = $1", tenant.org_id) == 0
    await _cancel_all(tenant)


# --- rejected creates leave no key ---


async def test_rejected_create_leaves_no_key(tenant_factory: Any, admin: asyncpg.Connection) -> None:
    tenant = await tenant_factory(monthly_gpu_hours=0.3)
    headers = _key()
    key = headers["Idempotency-Key"]

    over_budget = await tenant.client.post("/experiments", json=_body(cost=0.5), headers=headers)
    assert over_budget.status_code == 402, over_budget.text
    assert await _key_row(admin, tenant.org_id, key) is None

    invalid = await tenant.client.post("/experiments", json={**_body(), "goal": "speed"}, headers=headers)
    assert invalid.status_code == 422, invalid.text
    assert "extra" in invalid.json()
    assert await _key_row(admin, tenant.org_id, key) is None

    accepted = await tenant.client.post("/experiments", json=_body(cost=0.2), headers=headers)
    assert accepted.status_code == 201, accepted.text
    assert "Idempotent-Replayed" not in accepted.headers
    stored = await _key_row(admin, tenant.org_id, key)
    assert stored is not None
    assert str(stored["experiment_id"]) == accepted.json()["id"]
    await _cancel_all(tenant)


async def test_missing_template_leaves_no_key(tenant: Tenant, admin: asyncpg.Connection) -> None:
    headers = _key()

    response = await tenant.client.post(f"/experiments/from-template/{uuid.uuid4()}", json={}, headers=headers)

    assert response.status_code == 404, response.text
    assert await _key_row(admin, tenant.org_id, headers["Idempotency-Key"]) is None


@pytest.mark.parametrize("key", ["", "k" * 201])
async def test_key_length_400(tenant: Tenant, admin: asyncpg.Connection, key: str) -> None:
    response = await tenant.client.post("/experiments", json=_body(), headers={"Idempotency-Key": key})

    assert response.status_code == 400, response.text
    assert "Idempotency-Key must be 1 to 200 characters" in response.json()["detail"]
    assert await _experiment_ids(admin, tenant.org_id) == []


# --- expiry ---


async def test_key_expires_after_setting(tenant: Tenant, server: Server, admin: asyncpg.Connection) -> None:
    headers = _key()

    await tenant.client.post("/experiments", json=_body(), headers=headers)

    stored = await _key_row(admin, tenant.org_id, headers["Idempotency-Key"])
    assert stored is not None
    lifetime = (stored["expires_at"] - stored["created_at"]).total_seconds()
    assert lifetime == server.settings.idempotency_key_ttl_seconds
    assert server.settings.idempotency_key_ttl_seconds == 24 * 3600
    await _cancel_all(tenant)


async def test_expired_key_creates_new(tenant: Tenant, admin: asyncpg.Connection) -> None:
    headers = _key()
    key = headers["Idempotency-Key"]
    first = (await tenant.client.post("/experiments", json=_body(), headers=headers)).json()
    await admin.execute(
        "UPDATE iiq.idempotency_keys SET expires_at = now() - interval '1 second' WHERE org_id = $1 AND key = $2",
        tenant.org_id,
        key,
    )

    again = await tenant.client.post("/experiments", json=_body(cost=0.1), headers=headers)
    replay = await tenant.client.post("/experiments", json=_body(cost=0.1), headers=headers)

    assert again.status_code == 201, again.text
    assert "Idempotent-Replayed" not in again.headers
    assert again.json()["id"] != first["id"]
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert replay.json()["id"] == again.json()["id"]
    stored = await _key_row(admin, tenant.org_id, key)
    assert stored is not None
    assert str(stored["experiment_id"]) == again.json()["id"]
    assert len(await _experiment_ids(admin, tenant.org_id)) == 2
    await _cancel_all(tenant)


async def test_keyed_create_purges_expired_keys(tenant: Tenant, admin: asyncpg.Connection) -> None:
    old_keys = [_key() for _ in range(3)]
    for headers in old_keys:
        await tenant.client.post("/experiments", json=_body(cost=0.01), headers=headers)
    await admin.execute(
        "UPDATE iiq.idempotency_keys SET expires_at = now() - interval '1 second' WHERE org_id = $1", tenant.org_id
    )

    await tenant.client.post("/experiments", json=_body(cost=0.01), headers=_key())

    remaining = await admin.fetchval("SELECT count(*) FROM iiq.idempotency_keys WHERE org_id = $1", tenant.org_id)
    assert remaining == 1
    assert len(await _experiment_ids(admin, tenant.org_id)) == 4
    await _cancel_all(tenant)


def test_settings_reject_nonpositive_ttl() -> None:
    with pytest.raises(ConfigurationError, match="IIQ_IDEMPOTENCY_KEY_TTL_SECONDS=0"):
        load_settings({"IIQ_IDEMPOTENCY_KEY_TTL_SECONDS": "0"})

    assert load_settings({}).idempotency_key_ttl_seconds == 86400
    assert load_settings({"IIQ_IDEMPOTENCY_KEY_TTL_SECONDS": "60"}).idempotency_key_ttl_seconds == 60


# --- concurrent requests with one key ---


async def test_concurrent_same_key_one_experiment(tenant: Tenant, admin: asyncpg.Connection) -> None:
    headers = _key()

    responses = await asyncio.gather(
        *(tenant.client.post("/experiments", json=_body(), headers=headers) for _ in range(CONCURRENT_REQUESTS))
    )

    assert [response.status_code for response in responses] == [201] * CONCURRENT_REQUESTS
    ids = {response.json()["id"] for response in responses}
    assert len(ids) == 1
    replayed = [response for response in responses if response.headers.get("Idempotent-Replayed") == "true"]
    assert len(replayed) == CONCURRENT_REQUESTS - 1
    assert await _experiment_ids(admin, tenant.org_id) == list(ids)
    quota = (await tenant.client.get("/quota")).json()
    assert quota["active"] == 1
    assert quota["reserved_gpu_hours"] == pytest.approx(0.5)
    await _cancel_all(tenant)


async def test_concurrent_from_template_one_experiment(tenant: Tenant, admin: asyncpg.Connection) -> None:
    template_id = await _save_template(tenant)
    headers = _key()
    path = f"/experiments/from-template/{template_id}"

    responses = await asyncio.gather(
        *(
            tenant.client.post(path, json={"input_config": {"seed": 3}}, headers=headers)
            for _ in range(CONCURRENT_REQUESTS)
        )
    )

    assert [response.status_code for response in responses] == [201] * CONCURRENT_REQUESTS
    ids = {response.json()["id"] for response in responses}
    assert len(ids) == 1
    assert await _experiment_ids(admin, tenant.org_id) == list(ids)
    quota = (await tenant.client.get("/quota")).json()
    assert quota["active"] == 1
    assert quota["reserved_gpu_hours"] == pytest.approx(0.5)
    await _cancel_all(tenant)


async def test_concurrent_mixed_bodies_one_experiment(tenant: Tenant, admin: asyncpg.Connection) -> None:
    headers = _key()
    bodies = [_body(cost=0.5), _body(cost=0.25)] * (CONCURRENT_REQUESTS // 2)

    responses = await asyncio.gather(
        *(tenant.client.post("/experiments", json=body, headers=headers) for body in bodies)
    )

    created = [response for response in responses if response.status_code == 201]
    rejected = [response for response in responses if response.status_code == 422]
    assert len(created) + len(rejected) == CONCURRENT_REQUESTS
    assert len(created) == CONCURRENT_REQUESTS // 2
    assert len({response.json()["id"] for response in created}) == 1
    assert len({response.json()["estimated_gpu_hours"] for response in created}) == 1
    assert len(await _experiment_ids(admin, tenant.org_id)) == 1
    await _cancel_all(tenant)
