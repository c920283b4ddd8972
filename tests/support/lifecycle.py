"""Helpers for driving `run_experiment` directly, with a recording event bus and no queue."""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg

from iiq.db.tx import org_transaction, service_transaction
from iiq.experiments.create import create_experiment
from iiq.experiments.events import StoredEvent
from iiq.experiments.quota import utc_now
from iiq.orgs import Principal
from iiq.settings import Settings

# Experiments created here have no procrastinate job, so no worker ever picks them up.
NO_JOB = -1


class RecordingBus:
    """An event bus that records what it is asked to announce instead of notifying."""

    def __init__(self) -> None:
        self.published: list[StoredEvent] = []

    async def publish(self, conn: asyncpg.Connection, event: StoredEvent) -> None:
        self.published.append(event)

    def types_and_stages(self) -> list[tuple[str, str | None]]:
        return [(event.event_type, event.stage) for event in self.published]


async def create_unqueued(
    pool: asyncpg.Pool,
    settings: Settings,
    org_id: uuid.UUID,
    tool_id: str,
    input_config: dict[str, Any],
    target: dict[str, Any] | None = None,
    goal: str | None = None,
) -> uuid.UUID:
    principal = Principal(org_id=org_id, key_id=uuid.uuid4(), key_name="test")
    target = target or {"model_id": "meta-llama/Llama-3.1-8B-Instruct", "hardware": "H100-SXM", "engine": "vllm"}
    async with org_transaction(pool, org_id) as conn:
        row = await create_experiment(
            conn,
            RecordingBus(),
            settings,
            principal,
            tool_id=tool_id,
            target=target,
            input_config=input_config,
            goal=goal,
            now=utc_now(),
        )
        # Deleted before the commit, so no worker can fetch the job.
        await conn.execute("DELETE FROM procrastinate.procrastinate_jobs WHERE id = $1", row["job_id"])
        await conn.execute("UPDATE iiq.experiments SET job_id = $2 WHERE id = $1", row["id"], NO_JOB)
    experiment_id: uuid.UUID = row["id"]
    return experiment_id


async def fetch_experiment(pool: asyncpg.Pool, experiment_id: uuid.UUID) -> asyncpg.Record:
    async with service_transaction(pool) as conn:
        row = await conn.fetchrow("SELECT * FROM iiq.experiments WHERE id = $1", experiment_id)
    assert row is not None
    return row


async def fetch_events(pool: asyncpg.Pool, experiment_id: uuid.UUID) -> list[asyncpg.Record]:
    async with service_transaction(pool) as conn:
        return await conn.fetch(
            "SELECT seq, event_type, stage, payload FROM iiq.experiment_events WHERE experiment_id = $1 ORDER BY seq",
            experiment_id,
        )
