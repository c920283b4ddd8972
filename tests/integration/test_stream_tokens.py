"""Stream tokens over real HTTP: how a browser's EventSource, which cannot send headers, opens one stream."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from iiq.db.pool import connect_admin
from iiq.db.tx import org_transaction
from iiq.orgs import revoke_key
from tests.conftest import Server, Tenant
from tests.support.sse import Message, read_stream

TARGET = {"model_id": "meta-llama/Llama-3.1-8B-Instruct", "hardware": "H100-SXM", "engine": "vllm", "gpu_count": 1}
SLEEP = {"tool_id": "test.sleep", "target": TARGET, "input_config": {"steps": 3, "step_seconds": 0.05}}


@pytest.fixture
async def anonymous(server: Server) -> AsyncIterator[httpx.AsyncClient]:
    """A client without an Authorization header, as a browser's EventSource is."""
    async with httpx.AsyncClient(base_url=server.base_url, timeout=httpx.Timeout(30.0)) as client:
        yield client


async def _create(tenant: Tenant, body: dict[str, Any] = SLEEP) -> dict[str, Any]:
    response = await tenant.client.post("/experiments", json=body)
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


async def _issue(tenant: Tenant, experiment_id: str) -> dict[str, Any]:
    response = await tenant.client.post(f"/experiments/{experiment_id}/stream-tokens")
    assert response.status_code == 201, response.text
    issued: dict[str, Any] = response.json()
    return issued


async def _read(client: httpx.AsyncClient, url: str, **headers: str) -> list[Message]:
    messages, _ = await asyncio.wait_for(read_stream(client, url, headers=headers or None), timeout=30)
    return messages


async def _get(client: httpx.AsyncClient, url: str, **headers: str) -> httpx.Response:
    return await asyncio.wait_for(client.get(url, headers=headers or None), timeout=30)


async def _set_expires_at(database_url: str, token: str, expires_at: str) -> None:
    conn = await connect_admin(database_url)
    try:
        await conn.execute(
            f"UPDATE iiq.stream_tokens SET expires_at = {expires_at} WHERE token_hash = $1",  # noqa: S608
            hashlib.sha256(token.encode()).digest(),
        )
    finally:
        await conn.close()


async def test_token_opens_its_experiment_stream(tenant: Tenant, anonymous: httpx.AsyncClient) -> None:
    experiment = await _create(tenant)

    issued = await _issue(tenant, experiment["id"])
    messages = await _read(anonymous, issued["events_url"])

    assert issued["token"].startswith("iiqs_")
    assert issued["experiment_id"] == experiment["id"]
    assert issued["events_url"] == f"/experiments/{experiment['id']}/events?stream_token={issued['token']}"
    assert [message.id for message in messages] == [str(n) for n in range(1, len(messages) + 1)]
    assert (messages[0].event, messages[0].data["stage"]) == ("status", "pending")
    assert (messages[-1].event, messages[-1].data["stage"]) == ("status", "completed")
    with_header = await _read(tenant.client, experiment["events_url"])
    assert [(m.id, m.event, m.data) for m in messages] == [(m.id, m.event, m.data) for m in with_header]


async def test_token_response_lifetime_and_caching(tenant: Tenant, server: Server) -> None:
    experiment = await _create(tenant)
    before = datetime.now(UTC)

    response = await tenant.client.post(f"/experiments/{experiment['id']}/stream-tokens")

    assert response.status_code == 201
    assert response.headers["cache-control"] == "no-store"
    lifetime = datetime.fromisoformat(response.json()["expires_at"]) - before
    expected = timedelta(seconds=server.settings.stream_token_ttl_seconds)
    assert expected - timedelta(seconds=5) < lifetime < expected + timedelta(seconds=5)


async def test_token_url_contains_no_api_key(tenant: Tenant) -> None:
    experiment = await _create(tenant)

    issued = await _issue(tenant, experiment["id"])

    assert tenant.api_key not in issued["events_url"]
    assert tenant.api_key not in issued["token"]
    assert tenant.api_key.split("_")[1] not in issued["events_url"]  # not even the key's public prefix


async def test_token_stored_only_as_hash(tenant: Tenant, database_url: str) -> None:
    experiment = await _create(tenant)
    issued = await _issue(tenant, experiment["id"])

    conn = await connect_admin(database_url)
    try:
        rows = await conn.fetch("SELECT * FROM iiq.stream_tokens WHERE experiment_id = $1", experiment["id"])
    finally:
        await conn.close()

    assert len(rows) == 1
    assert rows[0]["token_hash"] == hashlib.sha256(issued["token"].encode()).digest()
    assert rows[0]["org_id"] == tenant.org_id
    assert rows[0]["key_id"] == tenant.key_id
    assert all(issued["token"] not in str(value) for value in dict(rows[0]).values())


async def test_token_rejected_for_other_experiment(tenant: Tenant, anonymous: httpx.AsyncClient) -> None:
    first = await _create(tenant)
    second = await _create(tenant)
    issued = await _issue(tenant, first["id"])

    response = await _get(anonymous, f"/experiments/{second['id']}/events?stream_token={issued['token']}")

    assert response.status_code == 401
    assert "not valid for experiment" in response.json()["detail"]
    assert first["id"] not in response.text
    assert "data:" not in response.text


async def test_token_rejected_for_other_org_experiment(tenant_factory: Any, anonymous: httpx.AsyncClient) -> None:
    org_a = await tenant_factory(name="org a")
    org_b = await tenant_factory(name="org b")
    own = await _create(org_a)
    foreign = await _create(org_b)
    issued = await _issue(org_a, own["id"])

    response = await _get(anonymous, f"/experiments/{foreign['id']}/events?stream_token={issued['token']}")

    assert response.status_code in (401, 404)
    assert "data:" not in response.text
    assert "test.sleep" not in response.text


async def test_expired_token_rejected(tenant: Tenant, anonymous: httpx.AsyncClient, database_url: str) -> None:
    experiment = await _create(tenant)
    issued = await _issue(tenant, experiment["id"])
    await _set_expires_at(database_url, issued["token"], "now() - interval '1 second'")

    response = await _get(anonymous, issued["events_url"])

    assert response.status_code == 401
    assert "expired" in response.json()["detail"]
    assert f"POST /experiments/{experiment['id']}/stream-tokens" in response.json()["detail"]
    assert response.headers["www-authenticate"].startswith("Bearer")


async def test_token_valid_until_expiry(tenant: Tenant, anonymous: httpx.AsyncClient, database_url: str) -> None:
    experiment = await _create(tenant)
    issued = await _issue(tenant, experiment["id"])
    await _set_expires_at(database_url, issued["token"], "now() + interval '5 seconds'")

    messages = await _read(anonymous, issued["events_url"])

    assert messages[-1].data["stage"] == "completed"


@pytest.mark.parametrize(
    "token",
    ["garbage", "", "iiqs_" + "A" * 43, "iiqs_" + "A" * 42, "Bearer%20iiqs_x", "%00"],
    ids=["word", "empty", "well-formed-unknown", "short", "bearer-prefix", "nul"],
)
async def test_garbage_token_rejected(tenant: Tenant, anonymous: httpx.AsyncClient, token: str) -> None:
    experiment = await _create(tenant)

    response = await _get(anonymous, f"/experiments/{experiment['id']}/events?stream_token={token}")

    assert response.status_code == 401
    assert "invalid stream token" in response.json()["detail"]


async def test_missing_credentials_rejected(tenant: Tenant, anonymous: httpx.AsyncClient) -> None:
    experiment = await _create(tenant)

    response = await _get(anonymous, f"/experiments/{experiment['id']}/events")

    assert response.status_code == 401
    assert "stream_token" in response.json()["detail"]


@pytest.mark.parametrize("parameter", ["stream_token", "api_key", "access_token"])
async def test_api_key_in_url_rejected(tenant: Tenant, anonymous: httpx.AsyncClient, parameter: str) -> None:
    experiment = await _create(tenant)

    response = await _get(anonymous, f"/experiments/{experiment['id']}/events?{parameter}={tenant.api_key}")

    assert response.status_code == 401
    detail = response.json()["detail"]
    assert "API keys are accepted only in the Authorization header" in detail
    assert "stream token" in detail
    assert tenant.api_key not in response.text
    assert "data:" not in response.text


async def test_api_key_in_url_rejected_beside_header(tenant: Tenant) -> None:
    experiment = await _create(tenant)

    response = await _get(tenant.client, f"/experiments/{experiment['id']}/events?stream_token={tenant.api_key}")

    assert response.status_code == 401
    assert tenant.api_key not in response.text


async def test_truncated_api_key_in_url_rejected(tenant: Tenant, anonymous: httpx.AsyncClient) -> None:
    experiment = await _create(tenant)

    response = await _get(anonymous, f"/experiments/{experiment['id']}/events?stream_token={tenant.api_key[:30]}")

    assert response.status_code == 401
    assert "API keys are accepted only in the Authorization header" in response.json()["detail"]


async def test_token_rejected_on_other_routes(tenant: Tenant, anonymous: httpx.AsyncClient) -> None:
    experiment = await _create(tenant)
    issued = await _issue(tenant, experiment["id"])
    query = f"stream_token={issued['token']}"

    read = await _get(anonymous, f"/experiments/{experiment['id']}?{query}")
    reissue = await anonymous.post(f"/experiments/{experiment['id']}/stream-tokens?{query}")
    cancel = await anonymous.post(f"/experiments/{experiment['id']}/cancel?{query}")
    bearer = await _get(anonymous, f"/experiments/{experiment['id']}", Authorization=f"Bearer {issued['token']}")

    assert read.status_code == 401
    assert reissue.status_code == 401
    assert cancel.status_code == 401
    assert bearer.status_code == 401


async def test_token_of_revoked_key_rejected(
    tenant: Tenant, anonymous: httpx.AsyncClient, database_url: str, server: Server
) -> None:
    experiment = await _create(tenant)
    issued = await _issue(tenant, experiment["id"])

    conn = await connect_admin(database_url)
    try:
        async with conn.transaction():
            await revoke_key(conn, tenant.key_id)
    finally:
        await conn.close()
    response = await _get(anonymous, issued["events_url"])

    assert response.status_code == 401
    assert "revoked" in response.json()["detail"]


async def test_issue_for_other_org_experiment_is_404(tenant_factory: Any) -> None:
    org_a = await tenant_factory(name="org a")
    org_b = await tenant_factory(name="org b")
    foreign = await _create(org_b)

    response = await org_a.client.post(f"/experiments/{foreign['id']}/stream-tokens")

    assert response.status_code == 404
    assert "token" not in response.json()


async def test_issue_for_unknown_experiment_is_404(tenant: Tenant) -> None:
    response = await tenant.client.post("/experiments/00000000-0000-4000-8000-000000000000/stream-tokens")

    assert response.status_code == 404


async def test_issue_requires_api_key(tenant: Tenant, anonymous: httpx.AsyncClient) -> None:
    experiment = await _create(tenant)

    response = await anonymous.post(f"/experiments/{experiment['id']}/stream-tokens")

    assert response.status_code == 401


async def test_last_event_id_resumes_with_token(tenant: Tenant, anonymous: httpx.AsyncClient) -> None:
    experiment = await _create(tenant)
    issued = await _issue(tenant, experiment["id"])
    everything = await _read(anonymous, issued["events_url"])

    rest = await _read(anonymous, issued["events_url"], **{"Last-Event-ID": "3"})

    assert len(everything) > 4
    assert [message.id for message in rest] == [message.id for message in everything[3:]]


async def test_last_event_id_query_resumes(tenant: Tenant, anonymous: httpx.AsyncClient) -> None:
    experiment = await _create(tenant)
    issued = await _issue(tenant, experiment["id"])
    everything = await _read(anonymous, issued["events_url"])

    from_query = await _read(anonymous, issued["events_url"] + "&last_event_id=2")
    header_wins = await _read(anonymous, issued["events_url"] + "&last_event_id=1", **{"Last-Event-ID": "4"})

    assert [message.id for message in from_query] == [message.id for message in everything[2:]]
    assert [message.id for message in header_wins] == [message.id for message in everything[4:]]


async def test_finished_stream_answers_no_content(tenant: Tenant, anonymous: httpx.AsyncClient) -> None:
    experiment = await _create(tenant)
    issued = await _issue(tenant, experiment["id"])
    everything = await _read(anonymous, issued["events_url"])

    response = await _get(anonymous, issued["events_url"], **{"Last-Event-ID": everything[-1].id or ""})

    # 204 is what makes a browser's EventSource stop reconnecting after the terminal event.
    assert response.status_code == 204
    assert response.content == b""


async def test_stream_tokens_isolated_by_org(tenant_factory: Any, server: Server) -> None:
    org_a = await tenant_factory(name="org a")
    org_b = await tenant_factory(name="org b")
    experiment = await _create(org_a)
    await _issue(org_a, experiment["id"])

    async with org_transaction(server.runtime.pool, org_b.org_id) as conn:
        seen_by_b = await conn.fetchval("SELECT count(*) FROM iiq.stream_tokens WHERE org_id = $1", org_a.org_id)
    async with org_transaction(server.runtime.pool, org_a.org_id) as conn:
        seen_by_a = await conn.fetchval("SELECT count(*) FROM iiq.stream_tokens WHERE org_id = $1", org_a.org_id)
    async with server.runtime.pool.acquire() as conn:
        seen_without_org = await conn.fetchval("SELECT count(*) FROM iiq.stream_tokens")

    assert seen_by_b == 0
    assert seen_by_a == 1
    assert seen_without_org == 0


async def test_expired_tokens_deleted_on_issue(tenant: Tenant, database_url: str) -> None:
    experiment = await _create(tenant)
    old = await _issue(tenant, experiment["id"])
    await _set_expires_at(database_url, old["token"], "now() - interval '1 second'")

    await _issue(tenant, experiment["id"])

    conn = await connect_admin(database_url)
    try:
        hashes = await conn.fetch("SELECT token_hash FROM iiq.stream_tokens WHERE org_id = $1", tenant.org_id)
    finally:
        await conn.close()
    assert len(hashes) == 1
    assert hashes[0]["token_hash"] != hashlib.sha256(old["token"].encode()).digest()
