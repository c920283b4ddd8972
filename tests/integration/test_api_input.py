"""Input handling of the HTTP API against a real server and Postgres: bad bodies, bad
parameters, tool validation, the tool catalog, OpenAPI and API-key authentication."""

from __future__ import annotations

import json
import logging
import secrets
import uuid
from typing import Any

import httpx
import pytest

from iiq.db.pool import connect_admin
from iiq.orgs import create_key, revoke_key
from tests.conftest import Server, Tenant
from tools import l0_hardware_profiling, l2_quantization, l5_batching

SHIPPED_TOOLS = {"L0": l0_hardware_profiling, "L2": l2_quantization, "L5": l5_batching}
L5_TARGET = dict(l5_batching.EXAMPLE_TARGET)
L5_CONFIG = dict(l5_batching.EXAMPLE_INPUT_CONFIG)
SLEEP_TARGET = {"model_id": "meta-llama/Llama-3.1-8B-Instruct", "hardware": "H100-SXM"}
# The API's request_max_body_size in iiq.api.app.
MAX_BODY_BYTES = 1_000_000


def errors_of(response: httpx.Response) -> list[str]:
    """Return `extra.errors` of a 422 body, or an empty list when the body has none."""
    extra = response.json().get("extra") or {}
    errors: list[str] = extra.get("errors", []) if isinstance(extra, dict) else []
    return errors


def has_error_about(errors: list[str], field: str) -> bool:
    return any(field in error for error in errors)


async def post_raw(tenant: Tenant, body: bytes) -> httpx.Response:
    return await tenant.client.post("/experiments", content=body, headers={"Content-Type": "application/json"})


# --- request body: JSON and types ---


async def test_create_unknown_tool_lists_tools(tenant: Tenant) -> None:
    response = await tenant.client.post("/experiments", json={"tool_id": "L99", "target": L5_TARGET})

    assert 400 <= response.status_code < 500, response.text
    text = " ".join(errors_of(response)) or response.json()["detail"]
    assert "L99" in text
    for tool_id in SHIPPED_TOOLS:
        assert tool_id in text, f"{tool_id} is missing from the unknown-tool error: {text}"


async def test_create_malformed_json(tenant: Tenant) -> None:
    response = await post_raw(tenant, b'{"tool_id": "L5", "target": {')

    assert response.status_code == 400, response.text


async def test_create_body_not_object(tenant: Tenant) -> None:
    response = await post_raw(tenant, b'["L5"]')

    assert response.status_code == 400, response.text


@pytest.mark.parametrize(
    "body",
    [
        {"tool_id": 5, "target": L5_TARGET, "input_config": L5_CONFIG},
        {"tool_id": "L5", "target": ["meta-llama/Llama-3.1-8B-Instruct", "H100-SXM"], "input_config": L5_CONFIG},
        {"tool_id": "L5", "target": L5_TARGET, "input_config": [1, 8]},
        {"tool_id": "L5", "target": L5_TARGET, "input_config": L5_CONFIG, "goal": 3},
    ],
    ids=["tool_id-int", "target-list", "input_config-list", "goal-int"],
)
async def test_create_wrong_type(tenant: Tenant, body: dict[str, Any]) -> None:
    response = await tenant.client.post("/experiments", json=body)

    assert response.status_code == 400, response.text


async def test_create_unknown_top_level_field(tenant: Tenant) -> None:
    body = {"tool_id": "L5", "target": L5_TARGET, "input_config": L5_CONFIG, "priority": "high"}

    response = await tenant.client.post("/experiments", json=body)

    assert response.status_code == 400, response.text
    assert "priority" in response.text


async def test_create_missing_target(tenant: Tenant) -> None:
    response = await tenant.client.post("/experiments", json={"tool_id": "L5", "input_config": L5_CONFIG})

    assert response.status_code == 400, response.text


# --- request body: engine and tool validation ---


async def test_create_lists_every_engine_error(tenant: Tenant) -> None:
    body = {"tool_id": "test.sleep", "target": {"engine": "vllm"}, "goal": "fastest"}

    response = await tenant.client.post("/experiments", json=body)

    assert response.status_code == 422, response.text
    errors = errors_of(response)
    assert has_error_about(errors, "target.model_id"), errors
    assert has_error_about(errors, "target.hardware"), errors
    assert has_error_about(errors, "fastest"), errors
    assert len(errors) == 3, errors


async def test_create_lists_every_l5_error(tenant: Tenant) -> None:
    target = {**L5_TARGET, "hardware": "TPU-v9"}
    body = {"tool_id": "L5", "target": target, "input_config": {**L5_CONFIG, "batch_sizes": []}}

    response = await tenant.client.post("/experiments", json=body)

    assert response.status_code == 422, response.text
    errors = errors_of(response)
    assert has_error_about(errors, "batch_sizes"), errors
    assert has_error_about(errors, "TPU-v9"), errors


async def test_create_l5_errors_match_validate(tenant: Tenant) -> None:
    target = {**L5_TARGET, "hardware": "TPU-v9"}
    config = {**L5_CONFIG, "batch_sizes": [], "prompt_tokens": 0, "colour": "blue"}

    response = await tenant.client.post(
        "/experiments", json={"tool_id": "L5", "target": target, "input_config": config}
    )

    assert response.status_code == 422, response.text
    expected = l5_batching.validate({**config, "target": target})
    assert len(expected) >= 4, expected
    errors = errors_of(response)
    for error in expected:
        assert error in errors, f"tool error {error!r} is missing from the response: {errors}"


@pytest.mark.parametrize("gpu_count", [0, -1, 65, "2", 1.5, True], ids=repr)
async def test_create_invalid_gpu_count(tenant: Tenant, gpu_count: Any) -> None:
    body = {"tool_id": "test.sleep", "target": {**SLEEP_TARGET, "gpu_count": gpu_count}}

    response = await tenant.client.post("/experiments", json=body)

    assert response.status_code == 422, response.text
    assert has_error_about(errors_of(response), "target.gpu_count"), response.text


async def test_create_l5_gpu_count_above_tool_max(tenant: Tenant) -> None:
    body = {"tool_id": "L5", "target": {**L5_TARGET, "gpu_count": 32}, "input_config": L5_CONFIG}

    response = await tenant.client.post("/experiments", json=body)

    assert response.status_code == 422, response.text
    assert has_error_about(errors_of(response), "target.gpu_count"), response.text


async def test_rejected_create_leaves_nothing(tenant: Tenant) -> None:
    body = {"tool_id": "L5", "target": {**L5_TARGET, "hardware": "TPU-v9"}, "input_config": L5_CONFIG}

    response = await tenant.client.post("/experiments", json=body)
    listing = await tenant.client.get("/experiments")
    quota = await tenant.client.get("/quota")

    assert response.status_code == 422, response.text
    assert listing.json()["items"] == []
    assert quota.json()["active"] == 0
    assert quota.json()["reserved_gpu_hours"] == 0


# --- request body: size and characters Postgres cannot store ---


async def test_create_body_over_limit(tenant: Tenant) -> None:
    padding = "x" * (MAX_BODY_BYTES + 1000)
    body = json.dumps({"tool_id": "test.sleep", "target": SLEEP_TARGET, "input_config": {"padding": padding}})

    response = await post_raw(tenant, body.encode())

    assert response.status_code == 413, response.text


async def test_create_body_under_limit(tenant: Tenant) -> None:
    padding = "x" * (MAX_BODY_BYTES - 10_000)
    body = json.dumps(
        {"tool_id": "test.sleep", "target": SLEEP_TARGET, "input_config": {"steps": 0, "padding": padding}}
    )

    response = await post_raw(tenant, body.encode())

    assert response.status_code == 201, response.text


@pytest.mark.parametrize(
    "body",
    [
        b'{"tool_id": "test.sleep", "target": {"model_id": "m", "hardware": "h"}, "input_config": {"note": "a\\u0000b"}}',  # noqa: E501
        b'{"tool_id": "test.sleep", "target": {"model_id": "m", "hardware": "h"}, "input_config": {"a\\u0000": 1}}',
        b'{"tool_id": "test.sleep", "target": {"model_id": "m", "hardware": "h", "note": "\\u0000"}}',
    ],
    ids=["config-value", "config-key", "target-value"],
)
async def test_create_nul_character(tenant: Tenant, body: bytes) -> None:
    response = await post_raw(tenant, body)

    assert 400 <= response.status_code < 500, response.text


async def test_create_nul_character_leaves_nothing(tenant: Tenant) -> None:
    body = (
        b'{"tool_id": "test.sleep", "target": {"model_id": "m", "hardware": "h"}, "input_config": {"note": "\\u0000"}}'
    )

    response = await post_raw(tenant, body)
    listing = await tenant.client.get("/experiments")
    quota = await tenant.client.get("/quota")

    assert 400 <= response.status_code < 500, response.text
    assert listing.json()["items"] == []
    assert quota.json()["active"] == 0


@pytest.mark.parametrize("depth", [1000, 5000])
async def test_create_deeply_nested_config(tenant: Tenant, depth: int) -> None:
    # A few kilobytes, far below the body limit, but nested past the default Python recursion
    # limit of 1000, which bounds the JSON decoder.
    nested = "[" * depth + "]" * depth
    body = (
        '{"tool_id": "test.sleep", "target": {"model_id": "m", "hardware": "h"}, "input_config": {"d": ' + nested + "}}"
    )

    response = await post_raw(tenant, body.encode())

    assert 400 <= response.status_code < 500, response.text


# --- a valid create and the tool catalog ---


async def test_create_valid_l5(tenant: Tenant) -> None:
    body = {"tool_id": "L5", "target": L5_TARGET, "input_config": L5_CONFIG, "goal": "throughput"}

    response = await tenant.client.post("/experiments", json=body)

    assert response.status_code == 201, response.text
    created = response.json()
    expected_estimate = l5_batching.estimate_cost({**L5_CONFIG, "target": L5_TARGET})
    assert expected_estimate > 0
    assert created["status"] == "queued"
    assert created["estimated_gpu_hours"] == pytest.approx(expected_estimate)
    assert created["tool_id"] == "L5"
    assert created["target"] == L5_TARGET
    assert created["input_config"] == L5_CONFIG
    assert created["goal"] == "throughput"
    assert created["events_url"] == f"/experiments/{created['id']}/events"


async def test_create_then_read(tenant: Tenant) -> None:
    body = {"tool_id": "L5", "target": L5_TARGET, "input_config": L5_CONFIG}

    created = (await tenant.client.post("/experiments", json=body)).json()
    response = await tenant.client.get(f"/experiments/{created['id']}")

    assert response.status_code == 200, response.text
    assert response.json()["id"] == created["id"]
    assert response.json()["estimated_gpu_hours"] == created["estimated_gpu_hours"]


async def test_tools_list_shipped_tools(tenant: Tenant) -> None:
    response = await tenant.client.get("/tools")

    assert response.status_code == 200, response.text
    tool_ids = {tool["tool_id"] for tool in response.json()}
    for tool_id in SHIPPED_TOOLS:
        assert tool_id in tool_ids, f"{tool_id} is missing from GET /tools: {sorted(tool_ids)}"


@pytest.mark.parametrize("tool_id", sorted(SHIPPED_TOOLS))
async def test_tool_example_creates(tenant: Tenant, tool_id: str) -> None:
    tools = {tool["tool_id"]: tool for tool in (await tenant.client.get("/tools")).json()}
    tool = tools[tool_id]
    assert tool["example_target"], f"{tool_id} has no example_target"
    assert tool["example_input_config"], f"{tool_id} has no example_input_config"

    body = {"tool_id": tool_id, "target": tool["example_target"], "input_config": tool["example_input_config"]}
    response = await tenant.client.post("/experiments", json=body)

    assert response.status_code == 201, response.text
    expected_estimate = SHIPPED_TOOLS[tool_id].estimate_cost(
        {**tool["example_input_config"], "target": tool["example_target"]}
    )
    assert response.json()["estimated_gpu_hours"] == pytest.approx(expected_estimate)


async def test_openapi_lists_experiments(server: Server) -> None:
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30.0) as client:
        response = await client.get("/schema/openapi.json")

    assert response.status_code == 200, response.text
    paths = response.json()["paths"]
    assert "/experiments" in paths, sorted(paths)
    assert "post" in paths["/experiments"]
    assert "get" in paths["/experiments"]


# --- path, query and header parameters ---


@pytest.mark.parametrize("experiment_id", ["not-a-uuid", "123", "00000000-0000-0000-0000-00000000000g"])
async def test_read_non_uuid_id(tenant: Tenant, experiment_id: str) -> None:
    response = await tenant.client.get(f"/experiments/{experiment_id}")

    assert 400 <= response.status_code < 500, response.text


async def test_read_unknown_id(tenant: Tenant) -> None:
    response = await tenant.client.get(f"/experiments/{uuid.uuid4()}")

    assert response.status_code == 404, response.text


@pytest.mark.parametrize(
    "params",
    [
        {"status": "bogus"},
        {"limit": "0"},
        {"limit": "-1"},
        {"limit": "201"},
        {"limit": "ten"},
        {"cursor": "garbage"},
        {"cursor": "bm90IGEgY3Vyc29y"},
        {"cursor": "x" * 600},
    ],
    ids=[
        "status-bogus",
        "limit-0",
        "limit-negative",
        "limit-201",
        "limit-text",
        "cursor-garbage",
        "cursor-base64-text",
        "cursor-too-long",
    ],
)
async def test_list_invalid_filter(tenant: Tenant, params: dict[str, str]) -> None:
    response = await tenant.client.get("/experiments", params=params)

    assert response.status_code == 400, response.text


async def test_list_valid_filters(tenant: Tenant) -> None:
    response = await tenant.client.get("/experiments", params={"status": "queued", "limit": "200", "tool_id": "L5"})

    assert response.status_code == 200, response.text


@pytest.mark.parametrize("last_event_id", ["garbage", "-1", "1.5", "9" * 12, "x" * 60], ids=repr)
async def test_events_invalid_last_event_id(tenant: Tenant, last_event_id: str) -> None:
    body = {"tool_id": "test.sleep", "target": SLEEP_TARGET, "input_config": {"steps": 1}}
    experiment_id = (await tenant.client.post("/experiments", json=body)).json()["id"]

    async with tenant.client.stream(
        "GET", f"/experiments/{experiment_id}/events", headers={"Last-Event-ID": last_event_id}, timeout=10.0
    ) as response:
        status = response.status_code

    assert status == 400


async def test_events_unknown_id(tenant: Tenant) -> None:
    async with tenant.client.stream("GET", f"/experiments/{uuid.uuid4()}/events", timeout=10.0) as response:
        status = response.status_code

    assert status == 404


# --- authentication ---


def well_formed_unknown_key() -> str:
    return f"iiq_{secrets.token_hex(8)}_{secrets.token_urlsafe(32)}"


@pytest.mark.parametrize(
    "authorization",
    [None, "Basic x", "Bearer", "bearer-token", "Bearer not-a-key", "unknown", "Token"],
    ids=repr,
)
async def test_auth_rejects_header(server: Server, authorization: str | None) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    async with httpx.AsyncClient(base_url=server.base_url, headers=headers, timeout=30.0) as client:
        response = await client.get("/experiments")

    assert response.status_code == 401, response.text
    assert response.headers.get("WWW-Authenticate", "").startswith("Bearer")


async def test_auth_rejects_unknown_key(server: Server) -> None:
    headers = {"Authorization": f"Bearer {well_formed_unknown_key()}"}
    async with httpx.AsyncClient(base_url=server.base_url, headers=headers, timeout=30.0) as client:
        response = await client.get("/experiments")

    assert response.status_code == 401, response.text


async def test_auth_rejects_wrong_secret(server: Server, tenant: Tenant) -> None:
    # Same prefix as a real key, so the row is found but the hash differs.
    prefix = tenant.api_key.split("_")[1]
    forged = f"iiq_{prefix}_{secrets.token_urlsafe(32)}"
    async with httpx.AsyncClient(
        base_url=server.base_url, headers={"Authorization": f"Bearer {forged}"}, timeout=30.0
    ) as client:
        response = await client.get("/experiments")

    assert response.status_code == 401, response.text


async def test_auth_accepts_valid_key(tenant: Tenant) -> None:
    response = await tenant.client.get("/experiments")

    assert response.status_code == 200, response.text


@pytest.mark.parametrize("path", ["/experiments", "/quota", "/tools", f"/experiments/{uuid.uuid4()}"])
async def test_auth_required_on_route(server: Server, path: str) -> None:
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30.0) as client:
        response = await client.get(path)

    assert response.status_code == 401, response.text


async def test_auth_required_on_create(server: Server) -> None:
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30.0) as client:
        response = await client.post(
            "/experiments", json={"tool_id": "L5", "target": L5_TARGET, "input_config": L5_CONFIG}
        )

    assert response.status_code == 401, response.text


async def test_revoked_key_next_request(tenant: Tenant, database_url: str) -> None:
    before = await tenant.client.get("/experiments")

    conn = await connect_admin(database_url)
    try:
        async with conn.transaction():
            await revoke_key(conn, tenant.key_id)
    finally:
        await conn.close()
    after = await tenant.client.get("/experiments")

    assert before.status_code == 200, before.text
    assert after.status_code == 401, after.text


async def test_revoked_key_other_key_works(tenant_factory: Any, database_url: str) -> None:
    tenant: Tenant = await tenant_factory()
    conn = await connect_admin(database_url)
    try:
        async with conn.transaction():
            second = await create_key(conn, tenant.org_id, "second")
            await revoke_key(conn, tenant.key_id)
    finally:
        await conn.close()

    revoked = await tenant.client.get("/experiments")
    other = await tenant.client.get("/experiments", headers={"Authorization": f"Bearer {second.secret}"})

    assert revoked.status_code == 401, revoked.text
    assert other.status_code == 200, other.text


async def test_api_key_never_logged(tenant: Tenant, caplog: pytest.LogCaptureFixture) -> None:
    from iiq.logs import JsonFormatter

    body = {"tool_id": "test.sleep", "target": {"model_id": "m", "hardware": "h"}, "input_config": {"steps": 1}}
    with caplog.at_level(logging.DEBUG):
        await tenant.client.post("/experiments", json=body)
        await tenant.client.get("/experiments", headers={"Authorization": f"Bearer {tenant.api_key}x"})
        await tenant.client.get("/quota")

    formatter = JsonFormatter()
    secret = tenant.api_key.rsplit("_", 1)[1]
    # iiq's own records; an HTTP access log, when an operator enables one, records URLs only.
    records = [record for record in caplog.records if record.name.startswith(("iiq", "procrastinate"))]
    assert records
    assert all(secret not in formatter.format(record) for record in records)


async def test_events_future_last_event_id(tenant: Tenant) -> None:
    body = {"tool_id": "test.sleep", "target": SLEEP_TARGET, "input_config": {"steps": 1}}
    experiment_id = (await tenant.client.post("/experiments", json=body)).json()["id"]

    response = await tenant.client.get(f"/experiments/{experiment_id}/events", headers={"Last-Event-ID": "999"})

    assert response.status_code == 400
    assert "beyond the last event" in response.json()["detail"]


@pytest.mark.parametrize("raw", [b'{"tool_id": "L5\xff", "target": {}}', b"\xc3\x28", b'{"tool_id": "\xed\xa0\x80"}'])
async def test_create_invalid_utf8(tenant: Tenant, raw: bytes) -> None:
    response = await tenant.client.post("/experiments", content=raw, headers={"Content-Type": "application/json"})

    assert response.status_code == 400, response.text
    assert response.json()["detail"]


async def test_template_name_too_long(tenant: Tenant) -> None:
    body = {"name": "n" * 201, "tool_id": "test.sleep", "target": SLEEP_TARGET, "input_config": {}}

    response = await tenant.client.post("/experiment-templates", json=body)

    assert 400 <= response.status_code < 500, response.text
    assert "200" in response.text


@pytest.mark.parametrize("value", ["²", "٣", "１２"])
async def test_events_non_ascii_digits_rejected(tenant: Tenant, value: str) -> None:
    body = {"tool_id": "test.sleep", "target": SLEEP_TARGET, "input_config": {"steps": 1}}
    experiment_id = (await tenant.client.post("/experiments", json=body)).json()["id"]

    response = await tenant.client.get(f"/experiments/{experiment_id}/events", params={"last_event_id": value})

    assert response.status_code == 400


async def test_artifact_name_too_long_404(tenant: Tenant) -> None:
    body = {"tool_id": "test.sleep", "target": SLEEP_TARGET, "input_config": {"steps": 1}}
    experiment_id = (await tenant.client.post("/experiments", json=body)).json()["id"]

    response = await tenant.client.get(f"/experiments/{experiment_id}/artifacts/{'a' * 300}")

    assert response.status_code == 404


async def test_events_api_key_as_parameter_name(tenant: Tenant) -> None:
    body = {"tool_id": "test.sleep", "target": SLEEP_TARGET, "input_config": {"steps": 1}}
    experiment_id = (await tenant.client.post("/experiments", json=body)).json()["id"]

    response = await tenant.client.get(f"/experiments/{experiment_id}/events?{tenant.api_key}=1")

    assert response.status_code == 401
