"""Isolation on every route with an id, and on a small shared pool of interleaved requests."""

from __future__ import annotations

import asyncio
import re
import uuid
from typing import Any

import pytest

from iiq.db.pool import connect_admin, create_service_pool
from iiq.db.tx import org_transaction
from tests.conftest import Server, Tenant
from tests.support.sse import read_stream

TARGET = {"model_id": "meta-llama/Llama-3.1-8B-Instruct", "hardware": "H100-SXM", "engine": "vllm"}
TEMPLATE = {"name": "nightly sweep", "tool_id": "test.sleep", "target": TARGET, "input_config": {"steps": 1}}


async def _snapshot(database_url: str, org_id: uuid.UUID) -> dict[str, Any]:
    """Everything org A owns, to compare before and after org B's attempts."""
    conn = await connect_admin(database_url)
    try:
        experiments = await conn.fetch(
            "SELECT id, status, cancel_requested_at, last_event_seq, input_config FROM iiq.experiments "
            "WHERE org_id = $1 ORDER BY id",
            org_id,
        )
        templates = await conn.fetch(
            "SELECT id, name, input_config, updated_at FROM iiq.experiment_templates WHERE org_id = $1 ORDER BY id",
            org_id,
        )
        tokens = await conn.fetchval("SELECT count(*) FROM iiq.stream_tokens WHERE org_id = $1", org_id)
    finally:
        await conn.close()
    return {
        "experiments": [dict(row) for row in experiments],
        "templates": [dict(row) for row in templates],
        "tokens": tokens,
    }


def _routes_with_ids(openapi: dict[str, Any]) -> list[tuple[str, str]]:
    routes = []
    for path, operations in openapi["paths"].items():
        if "{" not in path:
            continue
        for method in operations:
            if method in ("get", "post", "put", "patch", "delete"):
                routes.append((method.upper(), path))
    return routes


async def test_every_id_route_hides_other_org(tenant_factory: Any, server: Server, database_url: str) -> None:
    a: Tenant = await tenant_factory()
    b: Tenant = await tenant_factory()
    experiment = (
        await a.client.post(
            "/experiments",
            json={
                "tool_id": "L5",
                "target": TARGET,
                "input_config": {
                    "batch_sizes": [1, 8],
                    "prompt_tokens": 512,
                    "output_tokens": 256,
                    "weight_format": "bf16",
                },
            },
        )
    ).json()
    await read_stream(a.client, experiment["events_url"])
    template = (await a.client.post("/experiment-templates", json=TEMPLATE)).json()
    ids = {"experiment_id": experiment["id"], "template_id": template["id"], "name": "report.json"}
    openapi = (await a.client.get("/schema/openapi.json")).json()
    routes = _routes_with_ids(openapi)
    before = await _snapshot(database_url, a.org_id)

    checked = []
    for method, path in routes:
        url = re.sub(r"\{(\w+)\}", lambda match: ids[match.group(1)], path)
        body = (
            {"tool_id": "test.sleep", "target": TARGET, "input_config": {}, "name": "stolen"}
            if method in ("PUT", "PATCH")
            else ({} if "from-template" in path else None)
        )
        response = await b.client.request(method, url, json=body)
        assert response.status_code == 404, f"{method} {path}: {response.status_code} {response.text[:200]}"
        checked.append(f"{method} {path}")

    assert await _snapshot(database_url, a.org_id) == before
    # Every kind of id route is covered, so a new route is checked without touching this test.
    assert {
        "GET /experiments/{experiment_id}",
        "POST /experiments/{experiment_id}/cancel",
        "GET /experiments/{experiment_id}/events",
        "DELETE /experiment-templates/{template_id}",
        "POST /experiments/from-template/{template_id}",
    } <= set(checked)


async def test_interleaved_orgs_on_two_connections(tenant_factory: Any, server: Server) -> None:
    a: Tenant = await tenant_factory()
    b: Tenant = await tenant_factory()
    for tenant in (a, b):
        for _ in range(3):
            await tenant.client.post(
                "/experiments", json={"tool_id": "test.sleep", "target": TARGET, "input_config": {"steps": 1}}
            )
    pool = await create_service_pool(server.runtime.dsn, min_size=2, max_size=2)
    mismatches: list[str] = []

    async def read_as(tenant: Tenant) -> None:
        async with org_transaction(pool, tenant.org_id) as conn:
            orgs = await conn.fetch("SELECT DISTINCT org_id FROM iiq.experiments")
            await asyncio.sleep(0)  # let the other org's request take the other connection
            quota_orgs = await conn.fetch("SELECT org_id FROM iiq.experiment_quota")
        seen = {row["org_id"] for row in orgs} | {row["org_id"] for row in quota_orgs}
        if seen != {tenant.org_id}:
            mismatches.append(f"{tenant.org_id} saw {seen}")

    try:
        await asyncio.gather(*(read_as(a if index % 2 else b) for index in range(400)))
        async with pool.acquire() as conn:
            leaked = await conn.fetchval("SELECT count(*) FROM iiq.experiments")
    finally:
        await pool.close()

    assert mismatches == []
    assert leaked == 0


@pytest.mark.parametrize("status", [401, 402, 404, 409, 413, 429])
async def test_openapi_documents_error(tenant: Tenant, status: int) -> None:
    openapi = (await tenant.client.get("/schema/openapi.json")).json()

    documented = {
        code
        for operations in openapi["paths"].values()
        for operation in operations.values()
        for code in operation.get("responses", {})
    }

    assert str(status) in documented


async def test_openapi_create_lists_quota_answers(tenant: Tenant) -> None:
    openapi = (await tenant.client.get("/schema/openapi.json")).json()

    responses = openapi["paths"]["/experiments"]["post"]["responses"]

    assert {"201", "400", "401", "402", "413", "422", "429"} <= set(responses)
