"""The queue baselines: plain procrastinate jobs through iiq's asyncpg connector, with no iiq runner.

    python -m tests.bench.baseline_queue worker SPEC.json RESULT.json
    python -m tests.bench.baseline_queue defer SPEC.json RESULT.json
    python -m tests.bench.baseline_queue fill SPEC.json RESULT.json

``worker`` runs a procrastinate worker on queue ``bench_raw`` whose task records when it
starts and does nothing else. On SIGTERM it stops and writes each job's start time (Unix
seconds). ``defer`` defers `total` jobs at a steady `rate` per second and writes when each
defer returned. ``fill`` defers `total` jobs as fast as it can, for a drain. The worker's
options match those `iiq serve` and `iiq worker` pass.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import procrastinate

from iiq.db.pool import service_server_settings
from iiq.queue.connector import AsyncpgConnector
from tests.bench.loadgen import cpu_seconds

RAW_QUEUE = "bench_raw"
RAW_TASK = "bench.raw_noop"
_FILL_BATCH = 500


def build_app(dsn: str, started: dict[int, float]) -> procrastinate.App:
    app = procrastinate.App(connector=AsyncpgConnector(dsn=dsn, server_settings=service_server_settings()))

    @app.task(name=RAW_TASK, queue=RAW_QUEUE, pass_context=True)
    async def raw_noop(context: procrastinate.JobContext) -> None:
        assert context.job.id is not None
        started[context.job.id] = time.time()

    return app


async def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    started: dict[int, float] = {}
    app = build_app(spec["dsn"], started)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    cpu_before = cpu_seconds()
    async with app.open_async():
        worker = asyncio.create_task(
            app.run_worker_async(
                queues=[RAW_QUEUE],
                concurrency=int(spec["concurrency"]),
                name="bench-raw-worker",
                install_signal_handlers=False,
                shutdown_graceful_timeout=5.0,
                update_heartbeat_interval=5.0,
                stalled_worker_timeout=30.0,
            )
        )
        Path(spec["ready_path"]).write_text("ready")  # noqa: ASYNC240 - one tiny write, before any job
        await asyncio.wait({worker, asyncio.create_task(stop.wait())}, return_when=asyncio.FIRST_COMPLETED)
        worker.cancel()
        await asyncio.gather(worker, return_exceptions=True)
    return {"started": {str(job_id): when for job_id, when in started.items()}, "cpu_s": cpu_seconds() - cpu_before}


async def run_defer(spec: dict[str, Any]) -> dict[str, Any]:
    app = build_app(spec["dsn"], {})
    total = int(spec["total"])
    rate = float(spec["rate"])
    deferred: dict[str, float] = {}

    async def defer_one() -> None:
        job_id = await app.tasks[RAW_TASK].defer_async()
        deferred[str(job_id)] = time.time()

    async with app.open_async():
        tasks = []
        began = time.perf_counter()
        for index in range(total):
            pause = began + index / rate - time.perf_counter()
            if pause > 0:
                await asyncio.sleep(pause)
            tasks.append(asyncio.create_task(defer_one()))
        await asyncio.gather(*tasks)
    return {"deferred": deferred}


async def run_fill(spec: dict[str, Any]) -> dict[str, Any]:
    app = build_app(spec["dsn"], {})
    total = int(spec["total"])
    ids: list[int] = []
    async with app.open_async():
        task = app.tasks[RAW_TASK]
        for first in range(0, total, _FILL_BATCH):
            batch: list[dict[str, Any]] = [{} for _ in range(min(_FILL_BATCH, total - first))]
            ids += await task.batch_defer_async(*batch)
    return {"job_ids": ids}


_MODES = {"worker": run_worker, "defer": run_defer, "fill": run_fill}


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] not in _MODES:
        print(
            f"usage: python -m tests.bench.baseline_queue {{{','.join(_MODES)}}} SPEC.json RESULT.json", file=sys.stderr
        )
        return 2
    result = asyncio.run(_MODES[argv[0]](json.loads(Path(argv[1]).read_text())))
    Path(argv[2]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
