"""Create: `POST /experiments` under closed-loop load, against iiq's create statements in a tight asyncpg loop.

`iiq serve --no-worker` serves the API, so created experiments stay queued and no run
competes with the creates. Each round creates fresh orgs, so every case starts with no
experiment in flight: the in-flight count that quota admission reads grows the same way for
iiq and for the baseline, which both make `creates_per_round` experiments.
"""

from __future__ import annotations

from typing import Any

from tests.bench.context import BenchContext
from tests.bench.harness import (
    CpuMeter,
    IiqProcess,
    Tenant,
    create_request,
    experiment_body,
    make_tenants,
    run_python_module,
    scenario_database,
    start_iiq_serve,
)
from tests.bench.report import Target
from tests.bench.stats import percentile

SCENARIO = "Create"
# Seconds one round may take before the load stops; the count normally ends it much sooner.
_ROUND_DEADLINE_S = 120.0


def _layouts(ctx: BenchContext) -> list[tuple[str, int]]:
    return [(f"{ctx.sizes.many_orgs} orgs", ctx.sizes.many_orgs), ("one org", 1)]


def _run_iiq(
    ctx: BenchContext, server: IiqProcess, tenants: list[Tenant], connections: int, total: int
) -> dict[str, Any]:
    spec = {
        "mode": "closed",
        "host": "127.0.0.1",
        "port": server.port,
        "connections": connections,
        "total": total,
        "deadline_s": _ROUND_DEADLINE_S,
        "expect_status": 201,
        "requests": [create_request(tenant, experiment_body()) for tenant in tenants],
    }
    spec_path = ctx.workspace.write_spec("create-load", spec)
    result_path = ctx.workspace.file("create-load-result")
    return run_python_module(
        ctx.workspace,
        "loadgen-create",
        "tests.bench.loadgen",
        [str(spec_path), str(result_path)],
        _ROUND_DEADLINE_S + 30,
    )


def _run_baseline(ctx: BenchContext, dsn: str, tenants: list[Tenant], total: int) -> dict[str, Any]:
    spec = {
        "dsn": dsn,
        "connections": ctx.sizes.baseline_connections,
        "total": total,
        "deadline_s": _ROUND_DEADLINE_S,
        "tool_id": "bench.noop",
        "target": {"model_id": "bench/model-8b", "hardware": "H100-SXM", "gpu_count": 1},
        "keys": [{"org_id": t.org_id, "key_id": t.key_id, "api_key": t.api_key} for t in tenants],
    }
    spec_path = ctx.workspace.write_spec("create-baseline", spec)
    result_path = ctx.workspace.file("create-baseline-result")
    return run_python_module(
        ctx.workspace,
        "baseline-create",
        "tests.bench.baseline_create",
        [str(spec_path), str(result_path)],
        _ROUND_DEADLINE_S + 30,
    )


def run(ctx: BenchContext) -> None:
    sizes = ctx.sizes
    results = ctx.results
    total = sizes.creates_per_round
    with scenario_database(ctx.postgres, "create") as dsn:
        server = start_iiq_serve(ctx.workspace, dsn, "iiq-serve-create", worker=False)
        try:
            # Warm-up: the pool's connections, prepared statements and code paths.
            warmup = make_tenants(dsn, 2, "warmup")
            _run_iiq(ctx, server, warmup, max(sizes.create_connections), max(50, total // 10))

            for round_index in range(ctx.rounds):
                baseline_by_layout: dict[str, dict[str, Any]] = {}
                for layout, org_count in _layouts(ctx):
                    tenants = make_tenants(dsn, org_count, f"baseline {round_index}")
                    ctx.wait_for_quiet(f"create baseline {layout}")
                    meter = CpuMeter({"Postgres": ctx.postgres.cpu_seconds})
                    meter.start()
                    outcome = _run_baseline(ctx, dsn, tenants, total)
                    shares = meter.stop()
                    baseline_by_layout[layout] = outcome
                    case = f"asyncpg loop, {sizes.baseline_connections} connections, {layout}"
                    shares["asyncpg loop"] = 100.0 * outcome["cpu_s"] / outcome["elapsed_s"]
                    results.record_cpu(SCENARIO, case, "baseline", shares)

                for connections in sizes.create_connections:
                    for layout, org_count in _layouts(ctx):
                        tenants = make_tenants(dsn, org_count, f"iiq {round_index}")
                        case = f"{connections} connections, {layout}"
                        ctx.wait_for_quiet(f"create {case}")
                        meter = CpuMeter({"iiq serve": server.child.cpu_seconds, "Postgres": ctx.postgres.cpu_seconds})
                        meter.start()
                        with ctx.profiler.record(server.child.pid, f"create-{connections}-{org_count}", dsn):
                            outcome = _run_iiq(ctx, server, tenants, connections, total)
                        shares = meter.stop()
                        if outcome["error_count"]:
                            results.notes.append(
                                f"{SCENARIO} {case}, round {round_index + 1}: {outcome['error_count']} failed "
                                f"requests, first: {outcome['errors'][:1]}"
                            )
                        _record(ctx, case, connections, outcome, baseline_by_layout[layout])
                        shares["load client"] = 100.0 * outcome["cpu_s"] / outcome["elapsed_s"]
                        results.record_cpu(SCENARIO, case, "iiq", shares)
        finally:
            server.child.stop()


def _record(ctx: BenchContext, case: str, connections: int, outcome: dict[str, Any], baseline: dict[str, Any]) -> None:
    results = ctx.results
    if not outcome["latencies_ms"]:
        raise RuntimeError(f"{SCENARIO} {case}: no request succeeded; first errors: {outcome['errors']}")
    rate = results.figure(SCENARIO, case, "creates/s", "/s", [Target("ratio_at_least", 0.5)])
    rate.iiq.append(outcome["ok"] / outcome["elapsed_s"])
    rate.baseline.append(baseline["ok"] / baseline["elapsed_s"])

    median = results.figure(SCENARIO, case, "p50 latency", "ms")
    median.iiq.append(percentile(outcome["latencies_ms"], 0.50))
    median.baseline.append(percentile(baseline["latencies_ms"], 0.50))

    p99_targets = [Target("at_most", 15.0)] if connections == 10 else []
    tail = results.figure(SCENARIO, case, "p99 latency", "ms", p99_targets)
    tail.iiq.append(percentile(outcome["latencies_ms"], 0.99))
    tail.baseline.append(percentile(baseline["latencies_ms"], 0.99))
