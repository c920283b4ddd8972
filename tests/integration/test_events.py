"""Event stream guarantees: exactly once and in order, across reconnects, lost LISTEN and sizes."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from iiq.api.stream import _follow
from iiq.db.pool import connect_admin
from iiq.db.tx import service_transaction
from iiq.experiments import metrics
from iiq.experiments.events import EVENTS_CHANNEL, append_event
from iiq.orgs import Principal
from iiq.runtime import LISTEN_APPLICATION_NAME
from tests.conftest import Server, Tenant
from tests.support.lifecycle import create_unqueued, fetch_events
from tests.support.sse import read_stream

TARGET = {"model_id": "meta-llama/Llama-3.1-8B-Instruct", "hardware": "H100-SXM", "engine": "vllm"}


async def _create(tenant: Tenant, tool_id: str, **config: Any) -> dict[str, Any]:
    response = await tenant.client.post(
        "/experiments", json={"tool_id": tool_id, "target": TARGET, "input_config": config}
    )
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


async def test_burst_with_reconnects_is_exactly_once(tenant: Tenant) -> None:
    experiment = await _create(tenant, "test.emit", count=2000, size=20)
    seen: list[int] = []
    last = ""
    for _ in range(60):
        headers = {"Last-Event-ID": last} if last else {}
        batch, _ = await asyncio.wait_for(
            read_stream(tenant.client, experiment["events_url"], headers=headers, limit=300), timeout=30
        )
        seen.extend(int(message.id or 0) for message in batch)
        if batch:
            last = batch[-1].id or last
        if batch and batch[-1].event == "status" and batch[-1].data["stage"] == "completed":
            break

    total = (await tenant.client.get(f"/experiments/{experiment['id']}")).json()
    assert total["status"] == "completed"
    assert seen == list(range(1, len(seen) + 1))
    assert len(seen) == 2000 + 4  # pending, queued, running, 2000 progress, completed


@pytest.mark.parametrize(("size", "char"), [(7_900, "x"), (8_000, "x"), (50_000, "x"), (4_000, "€")])
async def test_large_payload_delivered_whole(tenant: Tenant, size: int, char: str) -> None:
    experiment = await _create(tenant, "test.emit", count=2, size=size, char=char)

    messages, _ = await asyncio.wait_for(read_stream(tenant.client, experiment["events_url"]), timeout=30)

    progress = [message for message in messages if message.event == "progress"]
    assert len(progress) == 2
    assert all(message.data["payload"]["text"] == char * size for message in progress)
    if char == "€":
        assert len(progress[0].data["payload"]["text"].encode()) == 12_000


async def test_payload_over_maximum_rejected(tenant: Tenant, server: Server) -> None:
    limit = server.settings.max_event_payload_bytes
    experiment = await _create(tenant, "test.emit", count=1, size=limit + 1)

    messages, _ = await asyncio.wait_for(read_stream(tenant.client, experiment["events_url"]), timeout=30)

    final = (await tenant.client.get(f"/experiments/{experiment['id']}")).json()
    assert final["status"] == "failed"
    assert "EventTooLargeError" in final["error_message"]
    assert f"maximum of {limit} bytes" in final["error_message"]
    assert messages[-1].data["stage"] == "failed"


async def test_writer_holding_lock_keeps_order(server: Server, tenant: Tenant) -> None:
    """An API-side writer holds the row lock; the worker's emit waits, so sequence = commit order."""
    experiment = await _create(tenant, "test.sleep", steps=40, step_seconds=0.05)
    stream = asyncio.create_task(read_stream(tenant.client, experiment["events_url"]))
    await asyncio.sleep(0.3)

    async with server.runtime.pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT set_config('app.rls_bypass', 'true', true)")
        api_event = await append_event(conn, experiment["id"], "note", "api", {"held": True}, max_payload_bytes=1000)
        await server.runtime.bus.publish(conn, api_event)
        await asyncio.sleep(0.5)  # the worker's emits queue up behind this row lock

    messages, _ = await asyncio.wait_for(stream, timeout=30)
    ids = [int(message.id or 0) for message in messages]
    assert ids == list(range(1, len(ids) + 1))
    assert any(message.event == "note" for message in messages)
    stored = await fetch_events(server.runtime.pool, experiment["id"])
    assert [event["seq"] for event in stored] == ids


async def test_lost_listen_connection_recovers(server: Server, tenant: Tenant) -> None:
    before = metrics.listen_reconnects_total._value.get()
    experiment = await _create(tenant, "test.sleep", steps=30, step_seconds=0.1)
    stream = asyncio.create_task(read_stream(tenant.client, experiment["events_url"]))
    await asyncio.sleep(0.5)

    conn = await connect_admin(server.runtime.dsn)
    try:
        killed = await conn.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = $1 AND datname = current_database()",
            LISTEN_APPLICATION_NAME,
        )
    finally:
        await conn.close()
    messages, _ = await asyncio.wait_for(stream, timeout=30)

    assert killed == 1
    assert [int(message.id or 0) for message in messages] == list(range(1, len(messages) + 1))
    assert messages[-1].data["stage"] == "completed"
    assert len([message for message in messages if message.event == "progress"]) == 30
    assert metrics.listen_reconnects_total._value.get() == before + 1
    assert server.runtime.hub is not None and server.runtime.hub.connected


async def _backend_count(dsn: str) -> int:
    conn = await connect_admin(dsn)
    try:
        count: int = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND application_name LIKE 'iiq%'"
        )
    finally:
        await conn.close()
    return count


async def test_dropped_streams_free_everything(server: Server, tenant: Tenant) -> None:
    hub = server.runtime.hub
    assert hub is not None
    experiment = await _create(tenant, "test.sleep", steps=1, step_seconds=60)
    baseline_subscribers = hub.subscriber_count()
    baseline_backends = await _backend_count(server.runtime.dsn)

    limits = httpx.Limits(max_connections=250, max_keepalive_connections=0)
    async with httpx.AsyncClient(
        base_url=server.base_url, headers=tenant.client.headers, limits=limits, timeout=10
    ) as client:
        for _ in range(10):
            streams = await asyncio.gather(
                *(client.send(client.build_request("GET", experiment["events_url"]), stream=True) for _ in range(200))
            )
            assert all(response.status_code == 200 for response in streams)
            # Closing an unfinished streaming response drops its TCP connection.
            await asyncio.gather(*(response.aclose() for response in streams))
            for _ in range(100):
                if hub.subscriber_count() == baseline_subscribers:
                    break
                await asyncio.sleep(0.05)
            assert hub.subscriber_count() == baseline_subscribers

    # The pool may grow to its maximum under 200 streams. Beyond it only the two LISTEN
    # connections (event hub and procrastinate) and this count's own connection are allowed.
    assert await _backend_count(server.runtime.dsn) <= max(baseline_backends, server.settings.pool_max_size + 3)
    await tenant.client.post(f"/experiments/{experiment['id']}/cancel")


async def test_event_json_shape(tenant: Tenant) -> None:
    experiment = await _create(tenant, "test.sleep", steps=1, step_seconds=0.01)

    async with tenant.client.stream("GET", experiment["events_url"]) as response:
        first = ""
        async for line in response.aiter_lines():
            if line.startswith("data:"):
                first = line[5:].strip()
                break

    event = json.loads(first)
    assert set(event) == {"seq", "event_type", "stage", "payload", "created_at"}
    assert event["seq"] == 1


async def _lock_waits(observer: Any) -> int:
    """Count the reads of the events table that wait for a lock (runs of other tests may write meanwhile)."""
    count: int = await observer.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock' "
        "AND query LIKE 'SELECT seq, event_type, stage, payload, created_at%'"
    )
    return count


async def test_dropped_stream_finishes_its_read(
    server: Server, tenant: Tenant, caplog: pytest.LogCaptureFixture
) -> None:
    hub = server.runtime.hub
    assert hub is not None
    pool = server.runtime.pool
    # Without a job, so that no runner writes events while the table is locked.
    experiment_id = await create_unqueued(pool, server.settings, tenant.org_id, "test.sleep", {"steps": 1})
    principal = Principal(org_id=tenant.org_id, key_id=tenant.key_id, key_name="test")
    locker = await connect_admin(server.runtime.dsn)
    observer = await connect_admin(server.runtime.dsn)
    try:
        # The stream's first read from the events table waits behind this lock...
        async with locker.transaction():
            await locker.execute("LOCK TABLE iiq.experiment_events IN ACCESS EXCLUSIVE MODE")
            stream = _follow(server.runtime, hub, principal, experiment_id, 0)
            first = asyncio.ensure_future(anext(stream))
            for _ in range(1000):
                if await _lock_waits(observer):
                    break
                await asyncio.sleep(0.01)
            assert await _lock_waits(observer) == 1
            # ...when its client disconnects, which cancels the stream.
            first.cancel()
            with pytest.raises(asyncio.CancelledError):
                await first
            # The read goes on: it ends its transaction itself, rather than have its query
            # cancelled and its connection handed back to the pool mid-transaction.
            assert await _lock_waits(observer) == 1
        for _ in range(500):
            if pool.get_idle_size() == pool.get_size():
                break
            await asyncio.sleep(0.01)
        assert pool.get_idle_size() == pool.get_size()
        assert not [record for record in caplog.records if "active transaction" in record.getMessage()]
    finally:
        await locker.close()
        await observer.close()


async def test_only_events_after_create_notify(server: Server, tenant: Tenant) -> None:
    listener = await connect_admin(server.runtime.dsn)
    notified: list[str] = []
    try:
        await listener.add_listener(EVENTS_CHANNEL, lambda *args: notified.append(args[-1]))
        experiment_id = await create_unqueued(
            server.runtime.pool, server.settings, tenant.org_id, "test.sleep", {"steps": 1}
        )
        async with service_transaction(server.runtime.pool) as conn:
            await append_event(conn, experiment_id, "note", "after create", {}, max_payload_bytes=1000)
        for _ in range(500):
            if any(payload.startswith(str(experiment_id)) for payload in notified):
                break
            await asyncio.sleep(0.01)
    finally:
        await listener.close()

    # The create's pending and queued events commit before anyone can follow the experiment.
    assert [payload for payload in notified if payload.startswith(str(experiment_id))] == [f"{experiment_id}:3"]
