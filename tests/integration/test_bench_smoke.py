"""The benchmark's smoke mode runs every scenario end to end, so `just bench` cannot rot unnoticed.

Tiny sizes and one round; targets are not judged. It uses the suite's Postgres and writes its
table to a temporary file, never to BENCHMARKS.md.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from tests.bench.harness import ROOT

SCENARIO_ROWS = ["Create", "Dispatch", "Drain", "Fan-out", "Idle streams", "Footprint"]
# Seconds the whole smoke run may take; it normally needs about 30.
SMOKE_TIMEOUT_S = 170


async def _bench_databases(admin_url: str) -> set[str]:
    conn = await asyncpg.connect(admin_url)
    try:
        rows = await conn.fetch("SELECT datname FROM pg_database WHERE datname LIKE 'iiq\\_bench\\_%'")
    finally:
        await conn.close()
    return {row["datname"] for row in rows}


def _processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line or environment contains `text`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        for name in ("cmdline", "environ"):
            try:
                if text.encode() in (entry / name).read_bytes():
                    found.append(int(entry.name))
                    break
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                continue
    return found


@pytest.mark.slow
def test_bench_smoke_all_scenarios(admin_url: str, tmp_path: Path) -> None:
    databases_before = asyncio.run(_bench_databases(admin_url))
    output = tmp_path / "bench.md"
    work_dir = tmp_path / "bench-work"
    command = [sys.executable, "-m", "tests.bench.run", "--smoke", "--admin-url", admin_url]
    command += ["--output", str(output), "--work-dir", str(work_dir)]

    finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=SMOKE_TIMEOUT_S)

    assert finished.returncode == 0, f"stdout:\n{finished.stdout[-4000:]}\nstderr:\n{finished.stderr[-4000:]}"
    report = output.read_text()
    assert "<!-- bench:results:start -->" in report
    assert "<!-- bench:results:end -->" in report
    assert "given by --admin-url" in report
    results_table = report.split("### Results", 1)[1].split("###", 1)[0]
    for scenario in SCENARIO_ROWS:
        rows = [line for line in results_table.splitlines() if line.startswith(f"| {scenario} |")]
        assert rows, f"no row for {scenario} in:\n{report}"
        for row in rows:
            iiq_cell = row.split("|")[4]
            assert re.search(r"\d", iiq_cell), f"{scenario} row without an iiq figure: {row}"
    assert "| missed |" not in report
    assert "| met |" not in report
    assert "not judged (smoke)" in report
    assert "failed" not in report

    assert asyncio.run(_bench_databases(admin_url)) == databases_before
    assert _processes_mentioning(str(work_dir)) == []
