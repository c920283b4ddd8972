"""Fan-out and idle streams: iiq's event streams against a bare Litestar SSE endpoint.

Fan-out: experiments of the `bench.emit` tool emit events carrying their emit time; stream
clients in separate processes record when each event arrives. The baseline app pushes a
message of the same shape on the same schedule from in-process queues.

Idle streams: the server's resident set size (VmRSS) is read before and after opening N
streams that receive nothing, in a fresh server process per round. The cost of a stream is
the difference divided by N. Streams are spread evenly over the experiments (or keys).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from tests.bench.context import BenchContext
from tests.bench.harness import (
    BenchError,
    Child,
    CpuMeter,
    Tenant,
    experiment_body,
    fetch,
    free_port,
    make_tenants,
    python_env,
    scenario_database,
    start_iiq_serve,
    start_python_module,
    wait_for_file,
    wait_for_http,
    wait_until,
)
from tests.bench.loadgen import raise_fd_limit
from tests.bench.report import Target
from tests.bench.stats import percentile

FANOUT = "Fan-out"
IDLE = "Idle streams"
# Seconds the stream clients get to connect all their streams.
_CONNECT_BUDGET_S = 180.0
# Open files a process needs besides its sockets: logs, the pool, the LISTEN connections.
_FD_HEADROOM = 200


def start_baseline_app(ctx: BenchContext, name: str) -> tuple[Child, int]:
    port = free_port()
    argv = [sys.executable, "-m", "tests.bench.baseline_sse", "--port", str(port)]
    child = Child(name, argv, python_env(), ctx.workspace.path)
    wait_for_http(f"http://127.0.0.1:{port}/health", child)
    return child, port


def _create_experiments(base_url: str, tenant: Tenant, inputs: list[dict[str, Any]], tool_id: str) -> list[str]:
    headers = {"Authorization": f"Bearer {tenant.api_key}", "Content-Type": "application/json"}
    ids = []
    with httpx.Client(base_url=base_url, headers=headers, timeout=30) as client:
        for input_config in inputs:
            response = client.post("/experiments", content=experiment_body(tool_id, input_config))
            if response.status_code != 201:
                raise BenchError(f"POST /experiments answered {response.status_code}: {response.text[:300]}")
            ids.append(response.json()["id"])
    return ids


class StreamClients:
    """Stream-reading load generators, one process per share of the streams."""

    def __init__(
        self, ctx: BenchContext, port: int, streams: list[dict[str, Any]], expect_messages: int, hold_s: float
    ):
        self.ctx = ctx
        self.parts: list[tuple[Child, Path, Path, Path]] = []
        processes = max(1, min(ctx.sizes.client_processes, len(streams)))
        for index in range(processes):
            ready = ctx.workspace.file(f"streams-ready-{index}")
            stop = ctx.workspace.file(f"streams-stop-{index}", ".txt")
            result = ctx.workspace.file(f"streams-result-{index}")
            spec = {
                "mode": "streams",
                "host": "127.0.0.1",
                "port": port,
                "streams": streams[index::processes],
                "connect_concurrency": 100,
                "expect_messages": expect_messages,
                "ready_path": str(ready),
                "stop_path": str(stop),
                "deadline_s": _CONNECT_BUDGET_S + hold_s,
            }
            spec_path = ctx.workspace.write_spec(f"streams-{index}", spec)
            child = start_python_module(
                ctx.workspace, f"loadgen-streams-{index}", "tests.bench.loadgen", [str(spec_path), str(result)]
            )
            self.parts.append((child, ready, stop, result))

    def wait_ready(self) -> int:
        """Wait until every client has connected its streams; return how many received a first message."""
        established = 0
        for child, ready, _stop, _result in self.parts:
            wait_for_file(ready, child, _CONNECT_BUDGET_S + 30)
            established += int(json.loads(ready.read_text())["established"])
        return established

    def finish(self, timeout: float) -> list[dict[str, Any]]:
        """Tell clients that hold their streams to close them, and collect every client's results."""
        for _child, _ready, stop, _result in self.parts:
            stop.write_text("stop")
        outcomes = []
        for child, _ready, _stop, result in self.parts:
            code = child.wait(timeout)
            child.stop()
            if code != 0 or not result.exists():
                raise BenchError(f"{child.name} exited with {code}; log {child.log_path}:\n{child.log_tail()}")
            outcomes.append(json.loads(result.read_text()))
        return outcomes

    def kill(self) -> None:
        for child, _ready, _stop, _result in self.parts:
            child.stop(timeout=5)


def _iiq_streams(ids: list[str], tenant: Tenant, count: int) -> list[dict[str, Any]]:
    headers = {"Authorization": f"Bearer {tenant.api_key}"}
    return [{"path": f"/experiments/{ids[index % len(ids)]}/events", "headers": headers} for index in range(count)]


def _baseline_streams(keys: list[str], count: int) -> list[dict[str, Any]]:
    return [{"path": f"/streams/{keys[index % len(keys)]}", "headers": {}} for index in range(count)]


def _fanout_cases(ctx: BenchContext) -> list[tuple[str, int]]:
    streams = ctx.sizes.fanout_streams
    cases = []
    for experiments in ctx.sizes.fanout_experiments:
        where = "one experiment" if experiments == 1 else f"{experiments} experiments"
        cases.append((f"{streams:,} streams on {where}", experiments))
    return cases


def _offsets(count: int, interval: float) -> list[float]:
    return [index * interval / count for index in range(count)]


def _measure_fanout(
    ctx: BenchContext,
    port: int,
    streams: list[dict[str, Any]],
    start: Callable[[float], None],
    profile: Callable[[], Any],
    meter: CpuMeter,
) -> tuple[list[float], dict[str, Any]]:
    """Connect the streams, start the emits, and return the latencies and a summary with CPU shares.

    The CPU shares cover the emitting phase only, from the start signal to the last client's exit.
    """
    sizes = ctx.sizes
    clients = StreamClients(ctx, port, streams, sizes.fanout_events, sizes.fanout_events * sizes.fanout_interval_s + 60)
    try:
        established = clients.wait_ready()
        if established != len(streams):
            raise BenchError(f"only {established} of {len(streams)} streams received their first message")
        with profile():
            meter.start()
            began = time.perf_counter()
            start(time.time() + 0.5)
            outcomes = clients.finish(_CONNECT_BUDGET_S + sizes.fanout_events * sizes.fanout_interval_s + 90)
            wall = time.perf_counter() - began
            shares = meter.stop()
    except BaseException:
        clients.kill()
        raise
    latencies = [value for outcome in outcomes for value in outcome["latencies_ms"]]
    shares["stream clients"] = 100.0 * sum(outcome["cpu_s"] for outcome in outcomes) / wall
    summary = {
        "received": len(latencies),
        "expected": len(streams) * sizes.fanout_events,
        "errors": [error for outcome in outcomes for error in outcome["errors"]],
        "shares": shares,
    }
    return latencies, summary


def run_fanout(ctx: BenchContext) -> None:
    sizes = ctx.sizes
    concurrency = max(sizes.worker_concurrency, max(sizes.fanout_experiments) + 10)
    with scenario_database(ctx.postgres, "fanout") as dsn:
        tenant = make_tenants(dsn, 1, "fanout")[0]
        server = start_iiq_serve(ctx.workspace, dsn, "iiq-serve-fanout", IIQ_WORKER_CONCURRENCY=str(concurrency))
        baseline, baseline_port = start_baseline_app(ctx, "baseline-sse-fanout")
        try:
            for round_index in range(ctx.rounds):
                for case, experiments in _fanout_cases(ctx):
                    iiq_ms = _fanout_iiq(
                        ctx, dsn, server.base_url, server.port, server.child, tenant, case, experiments
                    )
                    base_ms = _fanout_baseline(ctx, baseline, baseline_port, case, experiments, round_index)
                    median = ctx.results.figure(FANOUT, case, "p50 emit to client", "ms")
                    median.iiq.append(percentile(iiq_ms, 0.50))
                    median.baseline.append(percentile(base_ms, 0.50))
                    tail = ctx.results.figure(FANOUT, case, "p99 emit to client", "ms", [Target("ratio_at_most", 1.5)])
                    tail.iiq.append(percentile(iiq_ms, 0.99))
                    tail.baseline.append(percentile(base_ms, 0.99))
        finally:
            baseline.stop()
            server.child.stop()


def _fanout_iiq(
    ctx: BenchContext, dsn: str, base_url: str, port: int, server: Child, tenant: Tenant, case: str, experiments: int
) -> list[float]:
    sizes = ctx.sizes
    ctx.wait_for_quiet(f"fan-out {case}")
    start_file = ctx.workspace.file("fanout-start", ".txt")
    inputs = [
        {
            "start_file": str(start_file),
            "count": sizes.fanout_events,
            "interval_s": sizes.fanout_interval_s,
            "offset_s": offset,
        }
        for offset in _offsets(experiments, sizes.fanout_interval_s)
    ]
    ids = _create_experiments(base_url, tenant, inputs, "bench.emit")
    wait_until(lambda: _count_status(dsn, ids, "running") == len(ids), 60, "emitting experiments to start")

    def start(at: float) -> None:
        # Written whole, then renamed, so a handler never reads a half-written time.
        partial = start_file.with_suffix(".partial")
        partial.write_text(repr(at))
        os.replace(partial, start_file)

    latencies, summary = _measure_fanout(
        ctx,
        port,
        _iiq_streams(ids, tenant, sizes.fanout_streams),
        start,
        lambda: ctx.profiler.record(server.pid, f"fanout-{experiments}", dsn),
        CpuMeter({"iiq serve": server.cpu_seconds, "Postgres": ctx.postgres.cpu_seconds}),
    )
    _check_received(ctx, case, "iiq", summary)
    wait_until(lambda: _count_status(dsn, ids, "completed") == len(ids), 60, "emitting experiments to complete")
    ctx.results.record_cpu(FANOUT, case, "iiq", summary["shares"])
    return latencies


def _fanout_baseline(
    ctx: BenchContext, app: Child, port: int, case: str, experiments: int, round_index: int
) -> list[float]:
    sizes = ctx.sizes
    ctx.wait_for_quiet(f"fan-out baseline {case}")
    keys = [f"r{round_index}-e{experiments}-{index}" for index in range(experiments)]
    offsets = dict(zip(keys, _offsets(experiments, sizes.fanout_interval_s), strict=True))

    def start(at: float) -> None:
        plan = {"keys": keys, "count": sizes.fanout_events, "interval_s": sizes.fanout_interval_s, "start_at": at}
        response = httpx.post(f"http://127.0.0.1:{port}/emit", json={**plan, "offsets_s": offsets}, timeout=30)
        if response.status_code != 202:
            raise BenchError(f"baseline POST /emit answered {response.status_code}: {response.text[:300]}")

    latencies, summary = _measure_fanout(
        ctx,
        port,
        _baseline_streams(keys, sizes.fanout_streams),
        start,
        lambda: ctx.profiler.record(app.pid, f"fanout-baseline-{experiments}"),
        CpuMeter({"bare SSE app": app.cpu_seconds}),
    )
    _check_received(ctx, case, "baseline", summary)
    ctx.results.record_cpu(FANOUT, case, "baseline", summary["shares"])
    return latencies


def _check_received(ctx: BenchContext, case: str, side: str, summary: dict[str, Any]) -> None:
    if summary["received"] == 0:
        raise BenchError(f"{FANOUT} {case}: the {side} stream clients received no timed event; {summary['errors'][:2]}")
    if summary["received"] != summary["expected"] or summary["errors"]:
        ctx.results.notes.append(
            f"{FANOUT} {case}, {side}: {summary['received']} of {summary['expected']} events arrived; "
            f"errors: {summary['errors'][:2]}"
        )


def _count_status(dsn: str, ids: list[str], status: str) -> int:
    rows = fetch(
        dsn, "SELECT count(*) AS n FROM iiq.experiments WHERE id = ANY($1::uuid[]) AND status = $2", ids, status
    )
    return int(rows[0]["n"])


def run_idle(ctx: BenchContext) -> None:
    sizes = ctx.sizes
    limit = raise_fd_limit()
    needed = max(sizes.idle_streams) + _FD_HEADROOM
    if limit < needed:
        raise BenchError(
            f"{IDLE}: the open-file limit is {limit} but {needed} are needed: raise the hard limit (ulimit -Hn)"
        )
    with scenario_database(ctx.postgres, "idle") as dsn:
        tenant = make_tenants(dsn, 1, "idle")[0]
        for _round in range(ctx.rounds):
            for count in sizes.idle_streams:
                case = f"{count:,} streams on {sizes.idle_experiments} experiments"
                figure = ctx.results.figure(IDLE, case, "RSS per stream", "KiB", [Target("ratio_at_most", 1.25)])
                figure.iiq.append(_idle_iiq(ctx, dsn, tenant, count))
                figure.baseline.append(_idle_baseline(ctx, count))


def _rss_per_stream(
    ctx: BenchContext, server: Child, port: int, warmup: list[dict[str, Any]], streams: list[dict[str, Any]]
) -> float:
    hold = _CONNECT_BUDGET_S
    clients = StreamClients(ctx, port, warmup, 0, hold)
    clients.wait_ready()
    clients.finish(60)
    time.sleep(ctx.sizes.settle_s)
    idle_kib = server.rss_kib()

    clients = StreamClients(ctx, port, streams, 0, hold)
    try:
        established = clients.wait_ready()
        if established != len(streams):
            raise BenchError(f"{IDLE}: only {established} of {len(streams)} streams opened")
        time.sleep(ctx.sizes.settle_s)
        loaded_kib = server.rss_kib()
    finally:
        clients.finish(120)
    return (loaded_kib - idle_kib) / len(streams)


def _idle_iiq(ctx: BenchContext, dsn: str, tenant: Tenant, count: int) -> float:
    sizes = ctx.sizes
    server = start_iiq_serve(ctx.workspace, dsn, "iiq-serve-idle", worker=False)
    try:
        ids = _create_experiments(server.base_url, tenant, [{} for _ in range(sizes.idle_experiments)], "bench.noop")
        warmup = _iiq_streams(ids, tenant, sizes.warmup_streams)
        return _rss_per_stream(ctx, server.child, server.port, warmup, _iiq_streams(ids, tenant, count))
    finally:
        server.child.stop()


def _idle_baseline(ctx: BenchContext, count: int) -> float:
    sizes = ctx.sizes
    app, port = start_baseline_app(ctx, "baseline-sse-idle")
    try:
        keys = [f"idle-{index}" for index in range(sizes.idle_experiments)]
        warmup = _baseline_streams(keys, sizes.warmup_streams)
        return _rss_per_stream(ctx, app, port, warmup, _baseline_streams(keys, count))
    finally:
        app.stop()
