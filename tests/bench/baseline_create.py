"""The create baseline: iiq's create statements in a tight asyncpg loop, with no HTTP and no framework.

    python -m tests.bench.baseline_create SPEC.json RESULT.json

Each of `connections` connections (as iiq's service role, with iiq's codecs) runs the same
statements that one `POST /experiments` runs, as prepared statements. The API-key lookup
runs on its own. Then the one statement that sets the org's scope, admits, defers and
inserts the experiment with its events runs as its own transaction, as iiq sends it when the
request has no Idempotency-Key. Keep it in step with `iiq.orgs.authenticate` and `iiq.experiments.create`: the smoke
test catches a renamed or changed query, but not a statement added to or dropped from the
create path. The loop stops after
`total` iterations or `deadline_s` seconds. What it leaves out is iiq's own cost: HTTP,
Litestar, validation and the pool's reset on release.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg

from iiq.db.pool import service_server_settings
from iiq.db.queries import query
from iiq.experiments.create import config_hash
from iiq.orgs import hash_key
from iiq.queue.codecs import init_connection
from iiq.queue.names import EXPERIMENTS_QUEUE, RUN_TASK
from tests.bench.loadgen import cpu_seconds

# The estimate of the benchmark's no-op tool.
_ESTIMATE = 0.01
_STATEMENTS = {
    "find_api_key": query("find_api_key"),
    "create_experiment": query("create_experiment"),
}


def _one(row: asyncpg.Record | None) -> asyncpg.Record:
    if row is None:
        raise RuntimeError("a create statement returned no row: the baseline no longer matches iiq's statements")
    return row


class Loop:
    """One connection with its prepared statements."""

    def __init__(
        self, conn: asyncpg.Connection, statements: dict[str, asyncpg.prepared_stmt.PreparedStatement]
    ) -> None:
        self.conn = conn
        self.s = statements

    async def create(self, key: dict[str, str], tool_id: str, target: dict[str, Any]) -> None:
        prefix = key["api_key"].split("_")[1]
        # One statement outside a transaction, as `iiq.orgs.authenticate` runs it.
        found = await self.s["find_api_key"].fetchrow(prefix)
        if found is None or not hmac.compare_digest(found["key_hash"], hash_key(key["api_key"])):
            raise RuntimeError(f"API key of org {key['org_id']} not found")

        org_id = found["org_id"]
        experiment_id = uuid.uuid4()
        # Outside a transaction: the statement sets the scope and commits by itself.
        _one(
            await self.s["create_experiment"].fetchrow(
                experiment_id,
                org_id,
                tool_id,
                target,
                {},
                None,
                _ESTIMATE,
                1,
                1800.0,
                f"api_key:{found['id']}",
                None,
                config_hash(tool_id, target, {}, None),
                None,
                EXPERIMENTS_QUEUE,
                RUN_TASK,
                {"experiment_id": str(experiment_id)},
            )
        )


async def open_loop(dsn: str) -> Loop:
    conn = await asyncpg.connect(dsn, server_settings=service_server_settings())
    await init_connection(conn)
    statements = {name: await conn.prepare(sql) for name, sql in _STATEMENTS.items()}
    return Loop(conn, statements)


async def run(spec: dict[str, Any]) -> dict[str, Any]:
    keys = spec["keys"]
    total = int(spec["total"])
    deadline = time.monotonic() + float(spec["deadline_s"])
    loops = [await open_loop(spec["dsn"]) for _ in range(int(spec["connections"]))]
    latencies: list[float] = []
    issued = 0

    async def drive(loop: Loop) -> None:
        nonlocal issued
        while issued < total and time.monotonic() < deadline:
            key = keys[issued % len(keys)]
            issued += 1
            began = time.perf_counter()
            await loop.create(key, spec["tool_id"], spec["target"])
            latencies.append((time.perf_counter() - began) * 1000.0)

    cpu_before = cpu_seconds()
    began = time.perf_counter()
    try:
        await asyncio.gather(*(drive(loop) for loop in loops))
    finally:
        elapsed = time.perf_counter() - began
        for loop in loops:
            await loop.conn.close()
    return {"ok": len(latencies), "elapsed_s": elapsed, "latencies_ms": latencies, "cpu_s": cpu_seconds() - cpu_before}


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m tests.bench.baseline_create SPEC.json RESULT.json", file=sys.stderr)
        return 2
    result = asyncio.run(run(json.loads(Path(argv[0]).read_text())))
    Path(argv[1]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
