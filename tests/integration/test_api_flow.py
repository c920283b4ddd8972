"""Create to completed over real HTTP, following the event stream."""

from __future__ import annotations

import asyncio

from tests.conftest import Tenant
from tests.support.sse import read_stream

L5_BODY = {
    "tool_id": "L5",
    "target": {
        "model_id": "meta-llama/Llama-3.1-70B-Instruct",
        "hardware": "H100-SXM",
        "engine": "vllm",
        "gpu_count": 4,
    },
    "input_config": {"batch_sizes": [1, 16, 64], "prompt_tokens": 1024, "output_tokens": 256, "weight_format": "bf16"},
    "goal": "throughput",
}


async def test_create_to_completed_stream(tenant: Tenant) -> None:
    created = await tenant.client.post("/experiments", json=L5_BODY)
    assert created.status_code == 201
    experiment = created.json()
    assert experiment["status"] == "queued"

    messages, _ = await asyncio.wait_for(read_stream(tenant.client, experiment["events_url"]), timeout=30)

    stages = [(message.event, message.data["stage"]) for message in messages]
    assert stages[:3] == [("status", "pending"), ("status", "queued"), ("status", "running")]
    assert stages[3] == ("progress", "setup")
    assert [stage for kind, stage in stages if kind == "progress"][1:] == ["candidate-1", "candidate-2", "candidate-3"]
    assert stages[-1] == ("status", "completed")
    assert [message.id for message in messages] == [str(n) for n in range(1, len(messages) + 1)]

    final = (await tenant.client.get(f"/experiments/{experiment['id']}")).json()
    assert final["status"] == "completed"
    assert final["results_summary"]["winner"].startswith("batch-")
    assert final["actual_gpu_hours"] > 0
    report = await tenant.client.get(final["results_summary"]["report_url"])
    assert report.status_code == 200
    assert report.json()


async def test_stream_resumes_after_last_event_id(tenant: Tenant) -> None:
    created = (await tenant.client.post("/experiments", json=L5_BODY)).json()
    everything, _ = await read_stream(tenant.client, created["events_url"])

    rest, _ = await read_stream(tenant.client, created["events_url"], headers={"Last-Event-ID": "3"})

    assert [message.id for message in rest] == [message.id for message in everything[3:]]


async def test_stream_of_finished_experiment_closes(tenant: Tenant) -> None:
    created = (await tenant.client.post("/experiments", json=L5_BODY)).json()
    everything, _ = await read_stream(tenant.client, created["events_url"])

    tail, _ = await asyncio.wait_for(
        read_stream(tenant.client, created["events_url"], headers={"Last-Event-ID": everything[-1].id or ""}),
        timeout=10,
    )

    assert tail == []


async def test_stream_sends_keepalive(tenant: Tenant) -> None:
    body = {"tool_id": "test.sleep", "target": L5_BODY["target"], "input_config": {"steps": 2, "step_seconds": 1.5}}
    created = (await tenant.client.post("/experiments", json=body)).json()

    messages, comments = await asyncio.wait_for(read_stream(tenant.client, created["events_url"]), timeout=30)

    assert messages[-1].data["stage"] == "completed"
    assert "keep-alive" in comments


async def test_stream_headers(tenant: Tenant) -> None:
    created = (await tenant.client.post("/experiments", json=L5_BODY)).json()

    async with tenant.client.stream("GET", created["events_url"]) as response:
        headers = response.headers

    assert headers["content-type"].startswith("text/event-stream")
    assert headers["cache-control"] == "no-cache"
    assert headers["x-accel-buffering"] == "no"


async def test_list_filters_and_pages(tenant_factory) -> None:  # type: ignore[no-untyped-def]
    tenant = await tenant_factory()
    ids = []
    for _ in range(5):
        ids.append((await tenant.client.post("/experiments", json=L5_BODY)).json()["id"])
    ids.append((await tenant.client.post("/experiments", json={**L5_BODY, "tool_id": "test.sleep"})).json()["id"])

    seen: list[str] = []
    cursor = None
    for _ in range(10):
        params = {"limit": 2, "tool_id": "L5"} | ({"cursor": cursor} if cursor else {})
        page = (await tenant.client.get("/experiments", params=params)).json()
        seen.extend(item["id"] for item in page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            break

    assert sorted(seen) == sorted(ids[:5])
    assert len(seen) == len(set(seen))
    everything = (await tenant.client.get("/experiments", params={"limit": 200})).json()["items"]
    assert len(everything) == 6


async def test_cancel_queued_and_twice(tenant: Tenant) -> None:
    from iiq.experiments.states import Status

    body = {"tool_id": "test.sleep", "target": L5_BODY["target"], "input_config": {"steps": 100}}
    created = (await tenant.client.post("/experiments", json=body)).json()

    first = await tenant.client.post(f"/experiments/{created['id']}/cancel")
    second = await tenant.client.post(f"/experiments/{created['id']}/cancel")

    assert first.status_code == 200
    assert second.status_code == 200
    # The worker may already have started it; either way it ends cancelled.
    for _ in range(100):
        status = (await tenant.client.get(f"/experiments/{created['id']}")).json()["status"]
        if status == Status.CANCELLED:
            break
        await asyncio.sleep(0.05)
    assert status == "cancelled"


async def test_cancel_finished_is_conflict(tenant: Tenant) -> None:
    created = (await tenant.client.post("/experiments", json=L5_BODY)).json()
    await read_stream(tenant.client, created["events_url"])

    response = await tenant.client.post(f"/experiments/{created['id']}/cancel")

    assert response.status_code == 409
    assert "completed" in response.json()["detail"]
