"""Footprint: the resident set size (VmRSS) of idle iiq processes, each freshly started."""

from __future__ import annotations

import time

from tests.bench.context import BenchContext
from tests.bench.harness import fetch, scenario_database, start_iiq_serve, start_iiq_worker, wait_until
from tests.bench.streams import start_baseline_app

SCENARIO = "Footprint"


def run(ctx: BenchContext) -> None:
    settle = ctx.sizes.settle_s
    with scenario_database(ctx.postgres, "footprint") as dsn:
        for _round in range(ctx.rounds):
            app, _port = start_baseline_app(ctx, "baseline-sse-footprint")
            try:
                time.sleep(settle)
                bare_mib = app.rss_kib() / 1024
            finally:
                app.stop()

            for label, worker in (("iiq serve", True), ("iiq serve --no-worker", False)):
                server = start_iiq_serve(ctx.workspace, dsn, "iiq-serve-footprint", worker=worker)
                try:
                    time.sleep(settle)
                    rss_mib = server.child.rss_kib() / 1024
                finally:
                    server.child.stop()
                _record(ctx, f"{label}, idle", rss_mib, bare_mib)

            worker_process = start_iiq_worker(ctx.workspace, dsn, "iiq-worker-footprint")
            try:
                wait_until(lambda: _workers(dsn) > 0, 60, "the iiq worker to register")
                time.sleep(settle)
                rss_mib = worker_process.rss_kib() / 1024
            finally:
                worker_process.stop()
            _record(ctx, "iiq worker, idle", rss_mib, bare_mib)


def _record(ctx: BenchContext, case: str, rss_mib: float, bare_mib: float) -> None:
    # The bare Litestar app (the SSE baseline) is no target, only a reference: the cost of
    # Python, Litestar and uvicorn alone.
    figure = ctx.results.figure(SCENARIO, case, "RSS (baseline: bare Litestar app)", "MiB")
    figure.iiq.append(rss_mib)
    figure.baseline.append(bare_mib)


def _workers(dsn: str) -> int:
    rows = fetch(dsn, "SELECT count(*) AS n FROM procrastinate.procrastinate_workers")
    return int(rows[0]["n"])
