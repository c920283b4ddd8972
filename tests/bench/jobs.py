"""Dispatch and drain: how fast queued experiments start and finish, against plain procrastinate jobs.

Dispatch latency is measured from the moment the deferring transaction is known to have
committed to the moment the job starts its work. For iiq that is from the arrival of the
`201` response (a load client's clock) to the experiment's `started_at` (Postgres `now()` of
the transaction that marks it running). For the baseline it is from the return of
`defer_async` to the first line of the task. All clocks are this machine's wall clock.

Drain throughput is read from procrastinate's own job events for both sides: jobs divided
by the time from the first job's `started` event to the last job's `succeeded` event.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tests.bench.context import BenchContext
from tests.bench.harness import (
    BenchError,
    Child,
    CpuMeter,
    CpuTrace,
    IiqProcess,
    Tenant,
    create_request,
    experiment_body,
    fetch,
    make_tenants,
    run_python_module,
    scenario_database,
    start_iiq_serve,
    start_iiq_worker,
    start_python_module,
    wait_for_file,
    wait_until,
)
from tests.bench.report import Target
from tests.bench.stats import percentile

DISPATCH = "Dispatch"
DRAIN = "Drain"
_ORGS = 10
# Seconds a drain of one round may take before the benchmark gives up on it.
_DRAIN_TIMEOUT_S = 300.0


def _start_raw_worker(ctx: BenchContext, dsn: str, concurrency: int) -> tuple[Child, Path]:
    ready = ctx.workspace.file("raw-worker-ready", ".txt")
    result = ctx.workspace.file("raw-worker-result")
    spec = ctx.workspace.write_spec("raw-worker", {"dsn": dsn, "concurrency": concurrency, "ready_path": str(ready)})
    child = start_python_module(
        ctx.workspace, "raw-worker", "tests.bench.baseline_queue", ["worker", str(spec), str(result)]
    )
    wait_for_file(ready, child, 60)
    return child, result


def _stop_raw_worker(child: Child, result_path: Path) -> dict[str, Any]:
    child.stop()
    if child.process.returncode != 0 or not result_path.exists():
        raise BenchError(
            f"raw worker exited with {child.process.returncode}; log {child.log_path}:\n{child.log_tail()}"
        )
    loaded: dict[str, Any] = json.loads(result_path.read_text())
    return loaded


def _create_load(ctx: BenchContext, server: IiqProcess, tenants: list[Tenant], spec: dict[str, Any]) -> dict[str, Any]:
    spec = {
        "host": "127.0.0.1",
        "port": server.port,
        "expect_status": 201,
        "requests": [create_request(tenant, experiment_body()) for tenant in tenants],
        **spec,
    }
    spec_path = ctx.workspace.write_spec("queue-load", spec)
    result_path = ctx.workspace.file("queue-load-result")
    timeout = float(spec["deadline_s"]) + 60
    return run_python_module(
        ctx.workspace, "loadgen-queue", "tests.bench.loadgen", [str(spec_path), str(result_path)], timeout
    )


def _count_finished(dsn: str, ids: list[str]) -> int:
    rows = fetch(
        dsn, "SELECT count(*) AS n FROM iiq.experiments WHERE id = ANY($1::uuid[]) AND finished_at IS NOT NULL", ids
    )
    return int(rows[0]["n"])


def _wait_finished(dsn: str, ids: list[str], description: str) -> None:
    wait_until(lambda: _count_finished(dsn, ids) == len(ids), 120, description)


def run_dispatch(ctx: BenchContext) -> None:
    sizes = ctx.sizes
    total = max(1, round(sizes.dispatch_rate * sizes.dispatch_seconds))
    case = f"{sizes.dispatch_rate:g} creates/s, worker concurrency {sizes.worker_concurrency}"
    open_spec = {"mode": "open", "rate": sizes.dispatch_rate, "total": total, "deadline_s": sizes.dispatch_seconds + 30}
    with scenario_database(ctx.postgres, "dispatch") as dsn:
        tenants = make_tenants(dsn, _ORGS, "dispatch")
        server = start_iiq_serve(
            ctx.workspace, dsn, "iiq-serve-dispatch", IIQ_WORKER_CONCURRENCY=str(sizes.worker_concurrency)
        )
        try:
            warmup = _create_load(ctx, server, tenants, {**open_spec, "total": min(total, 25)})
            ids = [response["id"] for response in warmup["responses"]]
            _wait_finished(dsn, ids, "the dispatch warm-up to finish")

            for _round in range(ctx.rounds):
                ctx.wait_for_quiet("dispatch")
                meter = CpuMeter({"iiq serve": server.child.cpu_seconds, "Postgres": ctx.postgres.cpu_seconds})
                meter.start()
                with ctx.profiler.record(server.child.pid, "dispatch", dsn):
                    outcome = _create_load(ctx, server, tenants, open_spec)
                shares = meter.stop()
                responses = outcome["responses"]
                ids = [response["id"] for response in responses]
                if outcome["error_count"] or len(ids) < total:
                    ctx.results.notes.append(
                        f"{DISPATCH}: {len(ids)} of {total} creates succeeded; errors: {outcome['errors'][:1]}"
                    )
                _wait_finished(dsn, ids, "dispatched experiments to finish")
                rows = fetch(
                    dsn,
                    "SELECT id::text AS id, queued_at, started_at FROM iiq.experiments WHERE id = ANY($1::uuid[])",
                    ids,
                )
                started = {row["id"]: row["started_at"].timestamp() for row in rows}
                iiq_ms = [(started[r["id"]] - r["received"]) * 1000.0 for r in responses]
                # The engine's own queue wait starts at `queued_at`, the start of the create transaction,
                # so it also counts the rest of that transaction: shown for reference, without a baseline.
                waits_ms = [(row["started_at"] - row["queued_at"]).total_seconds() * 1000.0 for row in rows]
                shares["load client"] = 100.0 * outcome["cpu_s"] / outcome["elapsed_s"]
                ctx.results.record_cpu(DISPATCH, case, "iiq", shares)

                base_ms = _dispatch_baseline(ctx, dsn, total, case)
                _record_latencies(ctx, DISPATCH, case, iiq_ms, base_ms, [Target("ratio_at_most", 2.0)])
                for fraction, name in ((0.50, "p50"), (0.99, "p99")):
                    figure = ctx.results.figure(DISPATCH, case, f"{name} queued_at to started_at (iiq's own)", "ms")
                    figure.iiq.append(percentile(waits_ms, fraction))
        finally:
            server.child.stop()


def _dispatch_baseline(ctx: BenchContext, dsn: str, total: int, case: str) -> list[float]:
    sizes = ctx.sizes
    worker, worker_result = _start_raw_worker(ctx, dsn, sizes.worker_concurrency)
    try:
        ctx.wait_for_quiet("dispatch baseline")
        meter = CpuMeter({"procrastinate worker": worker.cpu_seconds, "Postgres": ctx.postgres.cpu_seconds})
        meter.start()
        spec = ctx.workspace.write_spec("raw-defer", {"dsn": dsn, "total": total, "rate": sizes.dispatch_rate})
        result = ctx.workspace.file("raw-defer-result")
        deferred = run_python_module(
            ctx.workspace,
            "raw-defer",
            "tests.bench.baseline_queue",
            ["defer", str(spec), str(result)],
            sizes.dispatch_seconds + 60,
        )["deferred"]
        ids = list(deferred)
        wait_until(lambda: _raw_succeeded(dsn, ids) == len(ids), 120, "baseline jobs to finish")
        shares = meter.stop()
    finally:
        started = _stop_raw_worker(worker, worker_result)["started"]
    ctx.results.record_cpu(DISPATCH, case, "baseline", shares)
    return [(started[job_id] - deferred_at) * 1000.0 for job_id, deferred_at in deferred.items()]


def _raw_succeeded(dsn: str, job_ids: list[str]) -> int:
    return _succeeded(dsn, [int(job_id) for job_id in job_ids])


def _record_latencies(
    ctx: BenchContext, scenario: str, case: str, iiq_ms: list[float], base_ms: list[float], p99_targets: list[Target]
) -> None:
    median = ctx.results.figure(scenario, case, "p50 latency", "ms")
    median.iiq.append(percentile(iiq_ms, 0.50))
    median.baseline.append(percentile(base_ms, 0.50))
    tail = ctx.results.figure(scenario, case, "p99 latency", "ms", p99_targets)
    tail.iiq.append(percentile(iiq_ms, 0.99))
    tail.baseline.append(percentile(base_ms, 0.99))


def _drain_window(dsn: str, job_ids: list[int]) -> tuple[float, float]:
    """Return the Unix times of the first `started` and the last `succeeded` event of `job_ids`."""
    rows = fetch(
        dsn,
        "SELECT min(at) FILTER (WHERE type = 'started') AS first_start, "
        "max(at) FILTER (WHERE type = 'succeeded') AS last_end, "
        "count(*) FILTER (WHERE type = 'succeeded') AS succeeded "
        "FROM procrastinate.procrastinate_events WHERE job_id = ANY($1::bigint[])",
        job_ids,
    )
    row = rows[0]
    if row["succeeded"] != len(job_ids):
        raise BenchError(f"{row['succeeded']} of {len(job_ids)} jobs succeeded")
    return row["first_start"].timestamp(), row["last_end"].timestamp()


def _wait_with_trace(trace: CpuTrace, condition: Any, description: str) -> None:
    deadline = time.monotonic() + _DRAIN_TIMEOUT_S
    trace.sample()
    while not condition():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {_DRAIN_TIMEOUT_S:g} s waiting for {description}")
        time.sleep(0.1)
        trace.sample()
    trace.sample()


def run_drain(ctx: BenchContext) -> None:
    sizes = ctx.sizes
    jobs = sizes.drain_jobs
    with scenario_database(ctx.postgres, "drain") as dsn:
        tenants = make_tenants(dsn, _ORGS, "drain")
        api = start_iiq_serve(ctx.workspace, dsn, "iiq-serve-drain-api", worker=False)
        try:
            for _round in range(ctx.rounds):
                for concurrency in sizes.drain_concurrency:
                    case = f"{jobs:,} no-op experiments, worker concurrency {concurrency}"
                    iiq_rate = _drain_iiq(ctx, dsn, api, tenants, concurrency, case)
                    base_rate = _drain_baseline(ctx, dsn, concurrency, case)
                    figure = ctx.results.figure(DRAIN, case, "experiments/s", "/s", [Target("ratio_at_least", 0.5)])
                    figure.iiq.append(iiq_rate)
                    figure.baseline.append(base_rate)
        finally:
            api.child.stop()


def _drain_iiq(
    ctx: BenchContext, dsn: str, api: IiqProcess, tenants: list[Tenant], concurrency: int, case: str
) -> float:
    jobs = ctx.sizes.drain_jobs
    spec = {"mode": "closed", "connections": ctx.sizes.drain_connections, "total": jobs, "deadline_s": 180.0}
    filled = _create_load(ctx, api, tenants, spec)
    if filled["ok"] != jobs:
        raise BenchError(f"{DRAIN}: only {filled['ok']} of {jobs} experiments were created; errors: {filled['errors']}")
    rows = fetch(dsn, "SELECT job_id FROM iiq.experiments WHERE status = 'queued'")
    job_ids = [int(row["job_id"]) for row in rows]
    if len(job_ids) != jobs:
        raise BenchError(f"{DRAIN}: expected {jobs} queued experiments, found {len(job_ids)}")

    ctx.wait_for_quiet(f"drain, concurrency {concurrency}")
    worker = start_iiq_worker(ctx.workspace, dsn, "iiq-worker-drain", IIQ_WORKER_CONCURRENCY=str(concurrency))
    trace = CpuTrace({"iiq worker": worker.cpu_seconds, "Postgres": ctx.postgres.cpu_seconds})
    try:
        with ctx.profiler.record(worker.pid, f"drain-{concurrency}", dsn):
            _wait_with_trace(trace, lambda: _succeeded(dsn, job_ids) == jobs, "the iiq worker to drain its queue")
    finally:
        worker.stop()
    begin, end = _drain_window(dsn, job_ids)
    ctx.results.record_cpu(DRAIN, case, "iiq", trace.shares(begin, end))
    return jobs / (end - begin)


def _succeeded(dsn: str, job_ids: list[int]) -> int:
    rows = fetch(
        dsn,
        "SELECT count(*) AS n FROM procrastinate.procrastinate_jobs "
        "WHERE id = ANY($1::bigint[]) AND status = 'succeeded'",
        job_ids,
    )
    return int(rows[0]["n"])


def _drain_baseline(ctx: BenchContext, dsn: str, concurrency: int, case: str) -> float:
    jobs = ctx.sizes.drain_jobs
    spec = ctx.workspace.write_spec("raw-fill", {"dsn": dsn, "total": jobs})
    result = ctx.workspace.file("raw-fill-result")
    job_ids = run_python_module(
        ctx.workspace, "raw-fill", "tests.bench.baseline_queue", ["fill", str(spec), str(result)], 120
    )["job_ids"]
    ctx.wait_for_quiet(f"drain baseline, concurrency {concurrency}")
    worker, worker_result = _start_raw_worker(ctx, dsn, concurrency)
    trace = CpuTrace({"procrastinate worker": worker.cpu_seconds, "Postgres": ctx.postgres.cpu_seconds})
    try:
        with ctx.profiler.record(worker.pid, f"drain-baseline-{concurrency}", dsn):
            _wait_with_trace(trace, lambda: _succeeded(dsn, job_ids) == jobs, "the raw worker to drain its queue")
    finally:
        _stop_raw_worker(worker, worker_result)
    begin, end = _drain_window(dsn, job_ids)
    ctx.results.record_cpu(DRAIN, case, "baseline", trace.shares(begin, end))
    return jobs / (end - begin)
