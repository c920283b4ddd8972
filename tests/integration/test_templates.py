"""Experiment templates over real HTTP: CRUD, org isolation, creating experiments from a
template with deep-merged overrides, and quota admission on that route."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import asyncpg
import pytest

from iiq.db.pool import SERVICE_ROLE, connect_admin
from iiq.experiments.create import config_hash
from iiq.experiments.registry import ToolHandler, get_handler, register, unregister
from iiq.experiments.templates import deep_merge
from tests.conftest import Tenant
from tools import l5_batching

TARGET = {"model_id": "meta-llama/Llama-3.1-8B-Instruct", "hardware": "H100-SXM", "engine": "vllm"}
# 600 steps of 0.1 s: the experiment stays active until the test cancels it.
LONG_SLEEP: dict[str, Any] = {"steps": 600, "step_seconds": 0.1}
QUICK = {"steps": 1, "step_seconds": 0.01}
HASH_PATTERN = re.compile(r"^sha256:[0-9a-f]{64}$")


def _template(name: str = "sleep-template", **config: Any) -> dict[str, Any]:
    return {
        "name": name,
        "tool_id": "test.sleep",
        "target": TARGET,
        "input_config": {**QUICK, "cost": 0.25, **config},
        "goal": "latency",
    }


async def _save(tenant: Tenant, body: dict[str, Any]) -> dict[str, Any]:
    response = await tenant.client.post("/experiment-templates", json=body)
    assert response.status_code == 201, response.text
    saved: dict[str, Any] = response.json()
    return saved


async def _experiment_count(database_url: str, org_id: uuid.UUID) -> int:
    conn = await connect_admin(database_url)
    try:
        count: int = await conn.fetchval("SELECT count(*) FROM iiq.experiments WHERE org_id = $1", org_id)
    finally:
        await conn.close()
    return count


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


# --- CRUD ---


async def test_template_crud_round_trip(tenant: Tenant) -> None:
    created = await _save(tenant, _template())

    assert created["name"] == "sleep-template"
    assert created["tool_id"] == "test.sleep"
    assert created["target"] == TARGET
    assert created["input_config"] == {**QUICK, "cost": 0.25}
    assert created["goal"] == "latency"
    assert created["created_at"] == created["updated_at"]

    read = await tenant.client.get(f"/experiment-templates/{created['id']}")
    assert read.status_code == 200, read.text
    assert read.json() == created

    replaced = await tenant.client.put(
        f"/experiment-templates/{created['id']}",
        json={"name": "renamed", "tool_id": "test.sleep", "target": {**TARGET, "gpu_count": 2}},
    )
    assert replaced.status_code == 200, replaced.text
    body = replaced.json()
    assert body["id"] == created["id"]
    assert body["name"] == "renamed"
    assert body["target"]["gpu_count"] == 2
    assert body["input_config"] == {}
    assert body["goal"] is None
    assert body["created_at"] == created["created_at"]
    assert datetime.fromisoformat(body["updated_at"]) > datetime.fromisoformat(created["updated_at"])
    assert (await tenant.client.get(f"/experiment-templates/{created['id']}")).json() == body

    deleted = await tenant.client.delete(f"/experiment-templates/{created['id']}")
    assert deleted.status_code == 204, deleted.text
    assert (await tenant.client.get(f"/experiment-templates/{created['id']}")).status_code == 404
    assert (await tenant.client.delete(f"/experiment-templates/{created['id']}")).status_code == 404
    assert (await tenant.client.put(f"/experiment-templates/{created['id']}", json=_template())).status_code == 404


async def test_template_list_pages_newest_first(tenant: Tenant) -> None:
    ids = [(await _save(tenant, _template(f"template-{index}")))["id"] for index in range(5)]
    l5 = await _save(
        tenant,
        {
            "name": "l5",
            "tool_id": "L5",
            "target": dict(l5_batching.EXAMPLE_TARGET),
            "input_config": dict(l5_batching.EXAMPLE_INPUT_CONFIG),
        },
    )

    listed: list[str] = []
    cursor = None
    for _ in range(10):
        params: dict[str, Any] = {"limit": 2, "tool_id": "test.sleep"}
        if cursor:
            params["cursor"] = cursor
        page = (await tenant.client.get("/experiment-templates", params=params)).json()
        listed.extend(item["id"] for item in page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            break

    assert listed == list(reversed(ids))
    everything = (await tenant.client.get("/experiment-templates")).json()
    assert [item["id"] for item in everything["items"]] == [l5["id"], *reversed(ids)]
    assert everything["next_cursor"] is None


async def test_template_bad_cursor_400(tenant: Tenant) -> None:
    response = await tenant.client.get("/experiment-templates", params={"cursor": "not-a-cursor"})

    assert response.status_code == 400, response.text


async def test_template_name_conflict_409(tenant_factory: Any) -> None:
    tenant = await tenant_factory()
    other = await tenant_factory()
    await _save(tenant, _template("taken"))
    second = await _save(tenant, _template("free"))

    duplicate = await tenant.client.post("/experiment-templates", json=_template("taken"))
    rename = await tenant.client.put(f"/experiment-templates/{second['id']}", json=_template("taken"))
    other_org = await other.client.post("/experiment-templates", json=_template("taken"))

    assert duplicate.status_code == 409, duplicate.text
    assert "'taken'" in duplicate.json()["detail"]
    assert rename.status_code == 409, rename.text
    assert (await tenant.client.get(f"/experiment-templates/{second['id']}")).json()["name"] == "free"
    assert other_org.status_code == 201, other_org.text


async def test_template_unknown_tool_422(tenant: Tenant) -> None:
    response = await tenant.client.post("/experiment-templates", json={**_template(), "tool_id": "no.such.tool"})

    assert response.status_code == 422, response.text
    assert "no.such.tool" in response.json()["extra"]["errors"][0]
    assert (await tenant.client.get("/experiment-templates")).json()["items"] == []


async def test_template_invalid_lists_every_error(tenant: Tenant) -> None:
    body = {
        "name": "   ",
        "tool_id": "L5",
        "target": {"hardware": "H100-SXM", "engine": "vllm"},
        "input_config": {**l5_batching.EXAMPLE_INPUT_CONFIG, "batch_sizes": [0]},
        "goal": "speed",
    }

    response = await tenant.client.post("/experiment-templates", json=body)

    assert response.status_code == 422, response.text
    errors = response.json()["extra"]["errors"]
    assert any(error.startswith("name must not be blank") for error in errors), errors
    assert any("model_id" in error for error in errors), errors
    assert any("batch_sizes[0]" in error for error in errors), errors
    assert any("goal 'speed'" in error for error in errors), errors
    assert (await tenant.client.get("/experiment-templates")).json()["items"] == []


async def test_template_name_too_long_422(tenant: Tenant) -> None:
    response = await tenant.client.post("/experiment-templates", json=_template("x" * 201))

    assert response.status_code == 422, response.text
    assert "201 characters" in response.json()["extra"]["errors"][0]


async def test_template_invalid_update_keeps_old(tenant: Tenant) -> None:
    saved = await _save(tenant, _template())

    response = await tenant.client.put(
        f"/experiment-templates/{saved['id']}", json={**_template(), "target": {**TARGET, "gpu_count": 0}}
    )

    assert response.status_code == 422, response.text
    assert "target.gpu_count" in response.json()["extra"]["errors"][0]
    assert (await tenant.client.get(f"/experiment-templates/{saved['id']}")).json() == saved


async def test_template_unknown_field_400(tenant: Tenant) -> None:
    response = await tenant.client.post("/experiment-templates", json={**_template(), "owner": "someone"})

    assert response.status_code == 400, response.text


# --- isolation between orgs ---


async def test_template_other_org_404(tenant_factory: Any, database_url: str) -> None:
    owner = await tenant_factory()
    intruder = await tenant_factory()
    saved = await _save(owner, _template())
    path = f"/experiment-templates/{saved['id']}"

    read = await intruder.client.get(path)
    replaced = await intruder.client.put(path, json=_template("stolen"))
    deleted = await intruder.client.delete(path)
    used = await intruder.client.post(f"/experiments/from-template/{saved['id']}", json={})
    listed = await intruder.client.get("/experiment-templates")

    assert read.status_code == 404, read.text
    assert replaced.status_code == 404, replaced.text
    assert deleted.status_code == 404, deleted.text
    assert used.status_code == 404, used.text
    assert listed.json()["items"] == []
    assert await _experiment_count(database_url, intruder.org_id) == 0
    assert (await owner.client.get(path)).json() == saved


@pytest.fixture
async def admin(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await connect_admin(database_url)
    try:
        yield conn
    finally:
        await conn.close()


async def test_template_rls_hides_other_org(tenant_factory: Any, admin: asyncpg.Connection) -> None:
    owner = await tenant_factory()
    other = await tenant_factory()
    saved = await _save(owner, _template())
    template_id = uuid.UUID(saved["id"])

    async with admin.transaction():
        await admin.execute(f"SET LOCAL ROLE {SERVICE_ROLE}")
        unset = await admin.fetchval("SELECT count(*) FROM iiq.experiment_templates WHERE id = $1", template_id)
    async with admin.transaction():
        await admin.execute(f"SET LOCAL ROLE {SERVICE_ROLE}")
        await admin.execute("SELECT set_config('app.org_id', $1, true)", str(other.org_id))
        as_other = await admin.fetchval("SELECT count(*) FROM iiq.experiment_templates WHERE id = $1", template_id)
        updated = await admin.execute("UPDATE iiq.experiment_templates SET name = 'x' WHERE id = $1", template_id)

    assert unset == 0
    assert as_other == 0
    assert updated == "UPDATE 0"
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
        async with admin.transaction():
            await admin.execute(f"SET LOCAL ROLE {SERVICE_ROLE}")
            await admin.execute("SELECT set_config('app.org_id', $1, true)", str(other.org_id))
            await admin.execute(
                "INSERT INTO iiq.experiment_templates (id, org_id, name, tool_id, target, input_config) "
                "VALUES ($1, $2, 'forged', 'test.sleep', '{}'::jsonb, '{}'::jsonb)",
                uuid.uuid4(),
                owner.org_id,
            )


# --- creating experiments from a template ---


def test_deep_merge_rules() -> None:
    base = {"a": {"b": 1, "c": [1, 2], "d": {"e": 1}}, "f": 1, "g": {"h": 1}}
    override = {"a": {"c": [3], "d": {"x": 2}}, "f": {"now": "object"}, "g": None, "new": [1]}

    merged = deep_merge(base, override)

    assert merged == {"a": {"b": 1, "c": [3], "d": {"e": 1, "x": 2}}, "f": {"now": "object"}, "g": None, "new": [1]}
    assert base == {"a": {"b": 1, "c": [1, 2], "d": {"e": 1}}, "f": 1, "g": {"h": 1}}


async def test_from_template_nested_overrides(tenant: Tenant) -> None:
    template = await _save(
        tenant,
        _template(
            profile={"batch": {"sizes": [1, 2], "max": 8}, "precision": "bf16"},
            tags=["baseline"],
        ),
    )
    overrides = {
        "target": {"gpu_count": 2, "extra": {"nvlink": True}},
        "input_config": {
            "profile": {"batch": {"sizes": [4], "max": None}, "kv_cache": {"paged": True}},
            "tags": ["tuned"],
            "seed": 7,
        },
    }

    response = await tenant.client.post(f"/experiments/from-template/{template['id']}", json=overrides)

    assert response.status_code == 201, response.text
    experiment = response.json()
    expected_target = {**TARGET, "gpu_count": 2, "extra": {"nvlink": True}}
    expected_config = {
        **QUICK,
        "cost": 0.25,
        "profile": {"batch": {"sizes": [4], "max": None}, "precision": "bf16", "kv_cache": {"paged": True}},
        "tags": ["tuned"],
        "seed": 7,
    }
    assert experiment["tool_id"] == "test.sleep"
    assert experiment["target"] == expected_target
    assert experiment["input_config"] == expected_config
    assert experiment["goal"] == "latency"
    assert experiment["estimated_gpu_hours"] == 0.25
    assert experiment["template_id"] == template["id"]
    assert experiment["config_hash"] == config_hash("test.sleep", expected_target, expected_config, "latency")
    stored = (await tenant.client.get(f"/experiments/{experiment['id']}")).json()
    assert stored["input_config"] == expected_config
    assert stored["config_hash"] == experiment["config_hash"]


async def test_from_template_goal_override(tenant: Tenant) -> None:
    template = await _save(tenant, _template())
    path = f"/experiments/from-template/{template['id']}"

    inherited = (await tenant.client.post(path, json={})).json()
    replaced = (await tenant.client.post(path, json={"goal": "throughput"})).json()
    cleared = (await tenant.client.post(path, json={"goal": None})).json()

    assert inherited["goal"] == "latency"
    assert replaced["goal"] == "throughput"
    assert cleared["goal"] is None
    assert len({inherited["config_hash"], replaced["config_hash"], cleared["config_hash"]}) == 3


async def test_from_template_without_body(tenant: Tenant) -> None:
    template = await _save(tenant, _template())

    response = await tenant.client.post(f"/experiments/from-template/{template['id']}")

    assert response.status_code == 201, response.text
    experiment = response.json()
    assert experiment["target"] == template["target"]
    assert experiment["input_config"] == template["input_config"]
    assert experiment["goal"] == template["goal"]


async def test_from_template_invalid_merge_422(tenant: Tenant, database_url: str) -> None:
    template = await _save(tenant, _template())
    path = f"/experiments/from-template/{template['id']}"

    bad_goal = await tenant.client.post(path, json={"goal": "speed"})
    bad_target = await tenant.client.post(path, json={"target": {"gpu_count": 0, "model_id": ""}})

    assert bad_goal.status_code == 422, bad_goal.text
    assert "goal 'speed'" in bad_goal.json()["extra"]["errors"][0]
    assert bad_target.status_code == 422, bad_target.text
    assert len(bad_target.json()["extra"]["errors"]) == 2
    assert await _experiment_count(database_url, tenant.org_id) == 0


async def test_from_template_unknown_field_400(tenant: Tenant) -> None:
    template = await _save(tenant, _template())

    unknown = await tenant.client.post(f"/experiments/from-template/{template['id']}", json={"tool_id": "L5"})
    null_target = await tenant.client.post(f"/experiments/from-template/{template['id']}", json={"target": None})

    assert unknown.status_code == 400, unknown.text
    assert null_target.status_code == 400, null_target.text


async def test_from_template_missing_404(tenant: Tenant) -> None:
    missing = uuid.uuid4()

    response = await tenant.client.post(f"/experiments/from-template/{missing}", json={})

    assert response.status_code == 404, response.text
    assert str(missing) in response.json()["detail"]


async def test_template_edit_keeps_experiment_config(tenant: Tenant) -> None:
    template = await _save(tenant, _template(profile={"precision": "bf16"}))
    path = f"/experiments/from-template/{template['id']}"
    first = (await tenant.client.post(path, json={"input_config": {"seed": 1}})).json()

    edited = await tenant.client.put(
        f"/experiment-templates/{template['id']}",
        json={**_template(profile={"precision": "fp8"}), "goal": "cost", "target": {**TARGET, "gpu_count": 4}},
    )
    assert edited.status_code == 200, edited.text
    second = (await tenant.client.post(path, json={"input_config": {"seed": 1}})).json()

    before = (await tenant.client.get(f"/experiments/{first['id']}")).json()
    assert before["input_config"] == {**QUICK, "cost": 0.25, "profile": {"precision": "bf16"}, "seed": 1}
    assert before["target"] == TARGET
    assert before["goal"] == "latency"
    assert before["config_hash"] == first["config_hash"]
    assert before["template_id"] == template["id"]
    assert second["input_config"]["profile"] == {"precision": "fp8"}
    assert second["target"]["gpu_count"] == 4
    assert second["goal"] == "cost"
    assert second["config_hash"] != first["config_hash"]

    assert (await tenant.client.delete(f"/experiment-templates/{template['id']}")).status_code == 204
    after_delete = (await tenant.client.get(f"/experiments/{first['id']}")).json()
    assert after_delete["input_config"] == before["input_config"]
    assert after_delete["template_id"] == template["id"]
    assert after_delete["config_hash"] == first["config_hash"]
    assert (await tenant.client.post(path, json={})).status_code == 404


async def test_from_template_unregistered_tool_422(tenant: Tenant, database_url: str) -> None:
    sleep = get_handler("test.sleep")
    assert sleep is not None
    register(
        ToolHandler(tool_id="test.retired", validate=sleep.validate, estimate_cost=sleep.estimate_cost, run=sleep.run)
    )
    try:
        template = await _save(tenant, {**_template(), "tool_id": "test.retired"})
    finally:
        unregister("test.retired")

    response = await tenant.client.post(f"/experiments/from-template/{template['id']}", json={})

    assert response.status_code == 422, response.text
    message = response.json()["extra"]["errors"][0]
    assert "'test.retired'" in message
    assert "not registered" in message
    assert template["id"] in message
    assert await _experiment_count(database_url, tenant.org_id) == 0
    assert (await tenant.client.get(f"/experiment-templates/{template['id']}")).status_code == 200


async def test_plain_create_has_config_hash(tenant: Tenant) -> None:
    config = {**QUICK, "a": {"x": 1, "y": 2}}
    body = {"tool_id": "test.sleep", "target": TARGET, "input_config": config}
    reordered = {
        "input_config": {"a": {"y": 2, "x": 1}, **QUICK},
        "target": dict(reversed(TARGET.items())),
        "tool_id": "test.sleep",
    }

    first = (await tenant.client.post("/experiments", json=body)).json()
    second = (await tenant.client.post("/experiments", json=reordered)).json()

    assert HASH_PATTERN.match(first["config_hash"]), first["config_hash"]
    assert first["config_hash"] == config_hash("test.sleep", TARGET, config, None)
    assert second["config_hash"] == first["config_hash"]
    assert first["template_id"] is None


# --- quota admission on the template route ---


async def test_from_template_concurrency_429(tenant_factory: Any, database_url: str) -> None:
    tenant = await tenant_factory(max_concurrent=1)
    template = await _save(tenant, _template(**LONG_SLEEP))
    path = f"/experiments/from-template/{template['id']}"

    first = await tenant.client.post(path, json={})
    rejected = await tenant.client.post(path, json={"input_config": {"cost": 0.01}})

    assert first.status_code == 201, first.text
    assert rejected.status_code == 429, rejected.text
    assert rejected.json()["extra"]["reason"] == "concurrency"
    assert "Retry-After" in rejected.headers
    assert await _experiment_count(database_url, tenant.org_id) == 1
    await _cancel_all(tenant)


async def test_from_template_budget_402(tenant_factory: Any, database_url: str) -> None:
    tenant = await tenant_factory(monthly_gpu_hours=1.0)
    template = await _save(tenant, _template(**LONG_SLEEP, cost=0.6))
    path = f"/experiments/from-template/{template['id']}"

    first = await tenant.client.post(path, json={})
    rejected = await tenant.client.post(path, json={})
    cheaper = await tenant.client.post(path, json={"input_config": {"cost": 0.4}})

    assert first.status_code == 201, first.text
    assert rejected.status_code == 402, rejected.text
    extra = rejected.json()["extra"]
    assert extra["reason"] == "budget"
    assert extra["estimated_gpu_hours"] == 0.6
    assert extra["reserved_gpu_hours"] == pytest.approx(0.6)
    assert cheaper.status_code == 201, cheaper.text
    assert await _experiment_count(database_url, tenant.org_id) == 2
    quota = (await tenant.client.get("/quota")).json()
    assert quota["reserved_gpu_hours"] == pytest.approx(1.0)
    await _cancel_all(tenant)
