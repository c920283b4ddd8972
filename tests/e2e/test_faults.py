"""Faults with real processes: a worker killed with SIGKILL, and SIGTERM with runs and streams open."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from iiq.db.pool import connect_admin
from tests.conftest import Tenant, free_port, make_tenant
from tests.support.processes import IIQProcess, wait_until_healthy
from tests.support.sse import read_stream

TARGET = {"model_id": "meta-llama/Llama-3.1-8B-Instruct", "hardware": "H100-SXM", "engine": "vllm", "gpu_count": 2}


async def _create(tenant: Tenant, **config: Any) -> dict[str, Any]:
    response = await tenant.client.post(
        "/experiments", json={"tool_id": "test.sleep", "target": TARGET, "input_config": config}
    )
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


async def _wait_for_status(tenant: Tenant, experiment_id: str, expected: set[str], timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        experiment: dict[str, Any] = (await tenant.client.get(f"/experiments/{experiment_id}")).json()
        if experiment["status"] in expected:
            return experiment
        await asyncio.sleep(0.1)
    raise AssertionError(f"experiment {experiment_id} not in {expected} after {timeout} s: {experiment['status']}")


async def _jobs_left(database_url: str, experiment_id: str) -> list[str]:
    conn = await connect_admin(database_url)
    try:
        rows = await conn.fetch(
            "SELECT status::text FROM procrastinate.procrastinate_jobs WHERE args ->> 'experiment_id' = $1 "
            "AND status IN ('todo', 'doing')",
            experiment_id,
        )
    finally:
        await conn.close()
    return [row["status"] for row in rows]


async def _used_gpu_hours(database_url: str, org_id: uuid.UUID) -> float:
    conn = await connect_admin(database_url)
    try:
        value: float = await conn.fetchval("SELECT used_gpu_hours FROM iiq.experiment_quota WHERE org_id = $1", org_id)
    finally:
        await conn.close()
    return value


async def _kill_worker_mid_run(e2e_database: str, tmp_path: Path, restart_same_name: bool) -> None:
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    api = IIQProcess(["serve", "--no-worker", "--port", str(port)], e2e_database, tmp_path / "api.log")
    worker = IIQProcess(["worker"], e2e_database, tmp_path / "worker-1.log", IIQ_WORKER_NAME="worker-a")
    processes = [api, worker]
    try:
        await asyncio.to_thread(wait_until_healthy, base_url, api)
        tenant = await make_tenant(e2e_database, base_url)
        experiment = await _create(tenant, steps=600, step_seconds=0.1)
        await _wait_for_status(tenant, experiment["id"], {"running"}, timeout=20)
        await asyncio.sleep(0.5)

        worker.kill()
        if restart_same_name:
            processes.append(
                IIQProcess(["worker"], e2e_database, tmp_path / "worker-2.log", IIQ_WORKER_NAME="worker-a")
            )

        final = await _wait_for_status(tenant, experiment["id"], {"failed", "completed", "cancelled"}, timeout=20)
        messages, _ = await asyncio.wait_for(read_stream(tenant.client, experiment["events_url"]), timeout=10)

        assert final["status"] == "failed"
        assert final["error_message"].startswith("worker lost")
        assert final["actual_gpu_hours"] > 0
        assert await _used_gpu_hours(e2e_database, tenant.org_id) == final["actual_gpu_hours"]
        statuses = [message.data["stage"] for message in messages if message.event == "status"]
        assert statuses == ["pending", "queued", "running", "failed"]
        assert await _jobs_left(e2e_database, experiment["id"]) == []
        await tenant.client.aclose()
    finally:
        for process in processes:
            process.stop()


async def test_killed_worker_run_recovered(e2e_database: str, tmp_path: Path) -> None:
    await _kill_worker_mid_run(e2e_database, tmp_path, restart_same_name=False)


async def test_killed_worker_restarted_same_name(e2e_database: str, tmp_path: Path) -> None:
    await _kill_worker_mid_run(e2e_database, tmp_path, restart_same_name=True)


async def test_sigterm_ends_runs_and_streams(e2e_database: str, tmp_path: Path) -> None:
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    serve = IIQProcess(["serve", "--port", str(port)], e2e_database, tmp_path / "serve.log")
    try:
        await asyncio.to_thread(wait_until_healthy, base_url, serve)
        tenant = await make_tenant(e2e_database, base_url)
        short = await _create(tenant, steps=10, step_seconds=0.1)
        long = await _create(tenant, steps=600, step_seconds=0.1)
        await _wait_for_status(tenant, long["id"], {"running"}, timeout=20)
        streams = [asyncio.create_task(read_stream(tenant.client, long["events_url"])) for _ in range(3)]
        await asyncio.sleep(0.3)

        started = time.monotonic()
        serve.terminate()
        exit_code = await asyncio.to_thread(serve.wait, 20)
        elapsed = time.monotonic() - started

        # uvicorn re-raises the signal it caught once shutdown is complete.
        assert exit_code in (0, -signal.SIGTERM)
        assert "iiq stopped" in serve.log()
        assert elapsed < 2 + 4  # grace period of 2 s plus start-up of the shutdown
        done, pending = await asyncio.wait(streams, timeout=5)
        assert pending == set()
        for task in done:
            assert not isinstance(task.exception(), httpx.ReadTimeout)

        conn = await connect_admin(e2e_database)
        try:
            rows = {
                str(row["id"]): row
                for row in await conn.fetch(
                    "SELECT id, status, error_message FROM iiq.experiments WHERE id = ANY($1::uuid[])",
                    [short["id"], long["id"]],
                )
            }
        finally:
            await conn.close()
        assert rows[short["id"]]["status"] == "completed"
        assert rows[long["id"]]["status"] == "failed"
        assert await _used_gpu_hours(e2e_database, tenant.org_id) > 0
        assert "worker shut down" in rows[long["id"]]["error_message"]
        assert await _jobs_left(e2e_database, long["id"]) == []
        assert await _jobs_left(e2e_database, short["id"]) == []
        await tenant.client.aclose()
    finally:
        serve.stop()
