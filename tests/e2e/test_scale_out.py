"""Scale-out with real processes: two API processes and two workers against one Postgres."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from iiq.db.pool import connect_admin
from tests.conftest import free_port, make_tenant
from tests.support.processes import IIQProcess, wait_until_healthy
from tests.support.sse import read_stream

TARGET = {"model_id": "meta-llama/Llama-3.1-8B-Instruct", "hardware": "H100-SXM", "engine": "vllm"}
BATCH = 40


def _sample_sum(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(key) == value for key, value in labels.items()):
                total += sample.value
    return total


async def _wait_for_succeeded_jobs(database_url: str, experiment_ids: list[str]) -> None:
    conn = await connect_admin(database_url)
    try:
        for _ in range(300):
            succeeded = await conn.fetchval(
                """
                SELECT count(*) FROM procrastinate.procrastinate_jobs j
                JOIN iiq.experiments e ON e.job_id = j.id
                WHERE e.id = ANY($1::uuid[]) AND j.status = 'succeeded'
                """,
                experiment_ids,
            )
            if succeeded == len(experiment_ids):
                return
            await asyncio.sleep(0.05)
    finally:
        await conn.close()
    raise AssertionError(f"{succeeded} of {len(experiment_ids)} jobs succeeded after 15 s")


async def test_two_apis_two_workers_share_work(e2e_database: str, tmp_path: Path) -> None:
    api_ports = [free_port(), free_port()]
    metric_ports = [free_port(), free_port()]
    apis = [
        IIQProcess(["serve", "--no-worker", "--port", str(port)], e2e_database, tmp_path / f"api-{i}.log")
        for i, port in enumerate(api_ports)
    ]
    workers = [
        IIQProcess(
            ["worker"],
            e2e_database,
            tmp_path / f"worker-{i}.log",
            IIQ_WORKER_CONCURRENCY="5",
            IIQ_WORKER_METRICS_PORT=str(port),
        )
        for i, port in enumerate(metric_ports)
    ]
    try:
        for api, port in zip(apis, api_ports, strict=True):
            await asyncio.to_thread(wait_until_healthy, f"http://127.0.0.1:{port}", api)
        # One org, reached through either API process.
        same_org = await make_tenant(e2e_database, f"http://127.0.0.1:{api_ports[0]}", max_concurrent=BATCH)
        other_client = httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{api_ports[1]}", headers=same_org.client.headers, timeout=30
        )
        clients = [same_org.client, other_client]
        body = {"tool_id": "test.sleep", "target": TARGET, "input_config": {"steps": 3, "step_seconds": 0.3}}

        created = []
        for index in range(BATCH):
            response = await clients[index % 2].post("/experiments", json=body)
            assert response.status_code == 201, response.text
            created.append(response.json())
        # Follow each experiment on the API process that did not create it.
        streams = await asyncio.wait_for(
            asyncio.gather(
                *(
                    read_stream(clients[(index + 1) % 2], experiment["events_url"])
                    for index, experiment in enumerate(created)
                )
            ),
            timeout=120,
        )

        runners: set[str] = set()
        for messages, _ in streams:
            statuses = [message.data["stage"] for message in messages if message.event == "status"]
            assert statuses == ["pending", "queued", "running", "completed"]
            assert [int(message.id or 0) for message in messages] == list(range(1, len(messages) + 1))
            running = next(message for message in messages if message.data["stage"] == "running")
            runners.add(running.data["payload"]["worker"])
        assert len(runners) == 2

        # A worker counts a run after its terminal commit, which the streams may see first.
        # procrastinate marks the job succeeded only after the run returned, counter included.
        await _wait_for_succeeded_jobs(e2e_database, [experiment["id"] for experiment in created])
        created_total = 0.0
        for port in api_ports:
            text = (await same_org.client.get(f"http://127.0.0.1:{port}/metrics")).text
            created_total += _sample_sum(text, "experiments_created_total", tool="test.sleep")
        completed_total = 0.0
        for port in metric_ports:
            text = (await same_org.client.get(f"http://127.0.0.1:{port}/metrics")).text
            completed_total += _sample_sum(text, "experiments_completed_total", tool="test.sleep", status="completed")
        assert created_total == BATCH
        assert completed_total == BATCH

        for client in clients:
            await client.aclose()
    finally:
        for process in [*apis, *workers]:
            process.stop()
