"""`iiq demo`: start Postgres and the server, run one L5 Batching experiment, print what it streams."""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import httpx
import msgspec
import uvicorn

from iiq import orgs as org_store
from iiq.api.app import create_app
from iiq.db.pool import connect_admin
from iiq.experiments import quota
from iiq.runtime import resolve_dsn, run_migrations
from iiq.settings import Settings

DEMO_TARGET = {"model_id": "meta-llama/Llama-3.1-8B-Instruct", "hardware": "H100-SXM", "engine": "vllm", "gpu_count": 1}
DEMO_CONFIG = {
    "batch_sizes": [1, 8, 16, 32, 64, 128, 256],
    "prompt_tokens": 512,
    "output_tokens": 256,
    "weight_format": "bf16",
}


def _say(text: str) -> None:
    print(text, flush=True)


async def _create_tenant(dsn: str) -> str:
    conn = await connect_admin(dsn)
    try:
        async with conn.transaction():
            org = await org_store.create_org(
                conn, "demo", monthly_gpu_hours=100.0, max_concurrent=5, now=quota.utc_now()
            )
            key = await org_store.create_key(conn, org["id"], "demo")
    finally:
        await conn.close()
    _say(f"created org {org['id']} and an API key (key id {key.id})")
    return key.secret


async def _follow(client: httpx.AsyncClient, experiment_id: str) -> None:
    async with client.stream("GET", f"/experiments/{experiment_id}/events") as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            event = json.loads(line[5:])
            payload = json.dumps(event["payload"], separators=(",", ":"))
            _say(f"  event {event['seq']:>2} {event['event_type']:<9} {event['stage'] or '':<14} {payload[:110]}")


async def run_demo(settings: Settings, port: int) -> int:
    dsn = await resolve_dsn(settings)
    _say("database: " + ("embedded PostgreSQL in " + settings.data_dir if settings.embedded else "IIQ_DATABASE_URL"))
    await run_migrations(dsn)
    api_key = await _create_tenant(dsn)

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", port))
    base_url = f"http://127.0.0.1:{sock.getsockname()[1]}"

    app_settings = msgspec.structs.replace(settings, database_url=dsn, public_url=base_url)
    server = uvicorn.Server(
        uvicorn.Config(create_app(app_settings), log_config=None, access_log=False, timeout_graceful_shutdown=2)
    )
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if serving.done():
                serving.result()
                return 1
            await asyncio.sleep(0.05)
        _say(f"server listening on {base_url}")
        async with httpx.AsyncClient(
            base_url=base_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=httpx.Timeout(10.0, read=120.0)
        ) as client:
            return await _run_experiment(client)
    finally:
        server.should_exit = True
        await serving


async def _run_experiment(client: httpx.AsyncClient) -> int:
    tools = (await client.get("/tools")).json()
    _say("tools: " + ", ".join(f"{tool['tool_id']} ({tool['name']})" for tool in tools))
    body: dict[str, Any] = {"tool_id": "L5", "target": DEMO_TARGET, "input_config": DEMO_CONFIG, "goal": "throughput"}
    created = await client.post("/experiments", json=body)
    if created.status_code != 201:
        _say(f"create failed: HTTP {created.status_code} {created.text}")
        return 1
    experiment = created.json()
    _say(
        f"created experiment {experiment['id']}: L5 Batching of {DEMO_TARGET['model_id']} on "
        f"{DEMO_TARGET['hardware']}, estimated {experiment['estimated_gpu_hours']} GPU-hours"
    )
    _say("events:")
    await _follow(client, experiment["id"])

    final = (await client.get(f"/experiments/{experiment['id']}")).json()
    _say(f"status: {final['status']}")
    if final["status"] != "completed":
        _say(f"error: {final['error_message']}")
        return 1
    _say("results: " + json.dumps(final["results_summary"], indent=2))
    report = await client.get(final["results_summary"]["report_url"])
    _say(f"report: HTTP {report.status_code}, {len(report.content)} bytes")
    _say("quota: " + json.dumps((await client.get("/quota")).json()))
    return 0
