"""Run the iiq benchmark and write its results table.

    python -m tests.bench.run [--smoke] [--rounds N] [--scenarios create,dispatch,...]
                              [--output BENCHMARKS.md] [--admin-url URL] [--profile DIR]

It starts its own Postgres (an embedded server, unless --admin-url names one) and creates a
database per scenario family. It starts iiq and baseline processes on 127.0.0.1 and runs
every scenario for a bounded count and time. Then it stops what it started by PID and drops
the databases. Last it writes the table into the results section of the output file. The
table gives the median, minimum and maximum over the rounds, each iiq figure beside its
baseline from the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import importlib.util
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

from tests.bench import create, footprint, jobs, streams
from tests.bench.context import BenchContext, Sizes
from tests.bench.harness import ROOT, Postgres, Workspace
from tests.bench.loadgen import raise_fd_limit
from tests.bench.profiling import Profiler, describe_waits, summarize
from tests.bench.report import Results, render_section, render_table, write_report

SCENARIOS: dict[str, Callable[[BenchContext], None]] = {
    "create": create.run,
    "dispatch": jobs.run_dispatch,
    "drain": jobs.run_drain,
    "fanout": streams.run_fanout,
    "idle": streams.run_idle,
    "footprint": footprint.run,
}
DEFAULT_ROUNDS = 3
_PACKAGES = ("litestar", "uvicorn", "asyncpg", "procrastinate", "msgspec")
# The code under test; changes elsewhere, such as to the benchmark itself, do not change the figures.
_ENGINE_PATHS = ("iiq", "sql", "tools")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes and one round, in seconds; targets are not judged"
    )
    parser.add_argument("--rounds", type=int, help=f"rounds per scenario (default {DEFAULT_ROUNDS}, 1 with --smoke)")
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated scenarios to run, in this order: {','.join(SCENARIOS)} (default: all)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        help="Markdown file whose results section is written (default BENCHMARKS.md in the repository; "
        "with --smoke, none: the table is only printed)",
    )
    parser.add_argument(
        "--admin-url",
        help="Postgres URL of a superuser on a server to use instead of an embedded one; "
        "the benchmark creates and drops its own iiq_bench_* databases there",
    )
    parser.add_argument("--profile", type=Path, help="directory for py-spy profiles of iiq processes (needs py-spy)")
    parser.add_argument(
        "--work-dir", type=Path, help="keep process logs and specs in this directory (default: a temporary one)"
    )
    return parser


def machine_facts() -> list[str]:
    cpu_model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip()
            break
    memory_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            memory_kib = int(line.split()[1])
    return [
        f"{os.cpu_count()} CPUs (nproc), {cpu_model}",
        f"{memory_kib / 1024 / 1024:.1f} GiB memory",
        f"Linux {platform.release()}",
        f"Python {platform.python_version()}",
    ]


def _versions() -> str:
    found = []
    for package in _PACKAGES:
        try:
            found.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    return ", ".join(found) + f"; uvicorn runs the {loop} event loop with {http}"


def _git_revision() -> str:
    try:
        revision = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        engine_changes = subprocess.run(
            ["git", "status", "--porcelain", "--", *_ENGINE_PATHS],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    where = ", ".join(f"{path}/" for path in _ENGINE_PATHS)
    if engine_changes:
        return f"{revision} with uncommitted changes in {where}"
    return f"{revision} ({where} as committed)"


def header_lines(args: argparse.Namespace, postgres_facts: dict[str, str], rounds: int, elapsed_s: float) -> list[str]:
    mode = "smoke (tiny sizes; targets not judged)" if args.smoke else "full"
    command = "python -m tests.bench.run " + shlex.join(sys.argv[1:])
    postgres = (
        f"PostgreSQL {postgres_facts['version']}, {postgres_facts['where']}; shared_buffers "
        f"{postgres_facts['shared_buffers']}, max_connections {postgres_facts['max_connections']}, "
        f"synchronous_commit {postgres_facts['synchronous_commit']}, fsync {postgres_facts['fsync']}"
    )
    lines = [
        f"- Date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}; the run took {elapsed_s / 60:.1f} minutes",
        f"- Command: `{command.strip()}` ({mode}, {rounds} round{'s' if rounds != 1 else ''} per figure)",
        f"- Machine: {'; '.join(machine_facts())}",
        f"- Database: {postgres}",
        f"- Software: iiq at {_git_revision()}; {_versions()}",
        "- Each figure is the median over the rounds, with the minimum and maximum in brackets. The ratio divides "
        "the iiq median by the baseline median; a target is met when the medians meet it.",
    ]
    return lines


PLACEMENT = [
    "No process is pinned to a core: the load clients, the server under test and Postgres share both",
    "cores, scheduled by Linux. Each load client and each baseline runs in a process of its own, so no",
    "client shares an event loop with a server. The table below gives the CPU each used during the",
    "measured phase, in percent of one core (200 % is the whole machine); a client far below 100 % was",
    "not the bottleneck. The whole-machine row counts every process, including any outside the benchmark:",
    "where it is far above the sum of the other rows, something else was using the machine.",
    "",
    "- Create: `iiq serve --no-worker`; one closed-loop load client process; baseline: one asyncpg loop process.",
    "- Dispatch: `iiq serve` (API and worker); one open-loop load client process; baseline: a procrastinate",
    "  worker process and a deferring process.",
    "- Drain: `iiq worker` (the experiments were created beforehand through `iiq serve --no-worker`);",
    "  baseline: a procrastinate worker process.",
    "- Fan-out and idle streams: `iiq serve` (fan-out) or `iiq serve --no-worker` (idle), or the bare",
    "  Litestar app, each a fresh process; the streams are read by separate client processes.",
]


def _profile_notes(profiler: Profiler) -> list[str]:
    notes = []
    for path in profiler.files:
        samples, rows = summarize(path)
        if samples == 0:
            continue
        top = ", ".join(f"{function} {share:.0f} %" for function, share in rows)
        notes.append(f"Profile {path.name}: {samples} busy samples of the main thread; by inclusive share: {top}")
    for label, counts in profiler.waits.items():
        notes.append(f"Postgres backends during {label}: {describe_waits(counts)}")
    return notes


def _exit_on_signal(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    names = [name.strip() for name in args.scenarios.split(",") if name.strip()]
    unknown = [name for name in names if name not in SCENARIOS]
    if unknown:
        print(f"unknown scenario {', '.join(unknown)}: use some of {', '.join(SCENARIOS)}", file=sys.stderr)
        return 2
    rounds = args.rounds or (1 if args.smoke else DEFAULT_ROUNDS)
    if rounds < 1:
        print(f"--rounds must be at least 1, got {rounds}", file=sys.stderr)
        return 2
    output = args.output
    if output is None and not args.smoke:
        output = ROOT / "BENCHMARKS.md"
    try:
        profiler = Profiler(args.profile)
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        return 2

    # Children inherit the raised limit: thousands of streams need as many sockets.
    raise_fd_limit()
    # SIGTERM and SIGINT unwind through the `finally` blocks that stop every child and Postgres.
    # A shell starts background jobs with SIGINT ignored, so its handler is installed here too.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGINT, _exit_on_signal)
    began = time.monotonic()
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="iiq-bench-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    postgres = Postgres(args.admin_url)
    results = Results()
    ctx = BenchContext(
        postgres=postgres,
        workspace=Workspace(work_dir),
        sizes=Sizes.smoke() if args.smoke else Sizes.full(),
        rounds=rounds,
        results=results,
        profiler=profiler,
        smoke=args.smoke,
    )
    failed = []
    postgres.start()
    try:
        postgres_facts = asyncio.run(postgres.describe())
        for name in names:
            print(f"bench: {name} ...", flush=True)
            started = time.monotonic()
            try:
                SCENARIOS[name](ctx)
            except Exception as exc:  # one failed scenario must not hide the others' results
                traceback.print_exc()
                failed.append(name)
                results.notes.append(f"Scenario {name} failed: {type(exc).__name__}: {str(exc)[:500]}")
            print(f"bench: {name} took {time.monotonic() - started:.0f} s", flush=True)
    finally:
        postgres.stop()
        if args.work_dir is None and not failed:
            shutil.rmtree(work_dir, ignore_errors=True)

    noise = ctx.noise_note()
    if noise is not None:
        results.notes.append(noise)
    results.notes += _profile_notes(profiler)
    header = header_lines(args, postgres_facts, rounds, time.monotonic() - began)
    section = render_section(results, header, PLACEMENT, judged=not args.smoke)
    print(render_table(results, judged=not args.smoke))
    for note in results.notes:
        print(f"note: {note}")
    if output is not None:
        write_report(output, section)
        print(f"bench: results written to {output}")
    if failed:
        print(f"bench: failed scenarios: {', '.join(failed)}; logs in {work_dir}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
