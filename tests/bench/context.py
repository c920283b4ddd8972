"""The sizes of a benchmark run and what every scenario receives."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tests.bench.harness import QUIET_CORE_PERCENT, QUIET_WAIT_S, Postgres, Workspace, wait_for_quiet_machine
from tests.bench.profiling import Profiler
from tests.bench.report import Results


@dataclass(frozen=True)
class Sizes:
    """How much work each scenario does per round. `full` is the real run; `smoke` only checks that it works."""

    creates_per_round: int
    create_connections: tuple[int, ...]
    many_orgs: int
    baseline_connections: int
    dispatch_rate: float
    dispatch_seconds: float
    worker_concurrency: int
    drain_jobs: int
    drain_concurrency: tuple[int, ...]
    drain_connections: int
    fanout_streams: int
    fanout_experiments: tuple[int, ...]
    fanout_events: int
    fanout_interval_s: float
    idle_streams: tuple[int, ...]
    idle_experiments: int
    warmup_streams: int
    client_processes: int
    settle_s: float

    @classmethod
    def full(cls) -> Sizes:
        return cls(
            creates_per_round=3000,
            create_connections=(10, 100),
            many_orgs=100,
            baseline_connections=4,
            dispatch_rate=50.0,
            dispatch_seconds=10.0,
            worker_concurrency=10,
            drain_jobs=2000,
            drain_concurrency=(10, 50),
            drain_connections=20,
            fanout_streams=1000,
            fanout_experiments=(1, 100),
            fanout_events=10,
            fanout_interval_s=1.0,
            idle_streams=(1000, 10000),
            idle_experiments=100,
            warmup_streams=50,
            client_processes=2,
            settle_s=2.0,
        )

    @classmethod
    def smoke(cls) -> Sizes:
        return cls(
            creates_per_round=20,
            create_connections=(2, 5),
            many_orgs=3,
            baseline_connections=2,
            dispatch_rate=50.0,
            dispatch_seconds=0.4,
            worker_concurrency=10,
            drain_jobs=20,
            drain_concurrency=(2, 5),
            drain_connections=4,
            fanout_streams=10,
            fanout_experiments=(1, 2),
            fanout_events=2,
            fanout_interval_s=0.2,
            idle_streams=(10, 20),
            idle_experiments=2,
            warmup_streams=2,
            client_processes=1,
            settle_s=0.3,
        )


@dataclass
class BenchContext:
    postgres: Postgres
    workspace: Workspace
    sizes: Sizes
    rounds: int
    results: Results
    profiler: Profiler
    smoke: bool
    # Measured phases that started although the machine never became quiet.
    noisy_phases: list[str] = field(default_factory=list)

    @property
    def work_dir(self) -> Path:
        return self.workspace.path

    def wait_for_quiet(self, phase: str) -> None:
        """Before a measured phase, wait for other load on the machine to pass; the smoke mode does not wait."""
        if self.smoke:
            return
        if not wait_for_quiet_machine():
            self.noisy_phases.append(phase)

    def noise_note(self) -> str | None:
        if not self.noisy_phases:
            return None
        return (
            f"{len(self.noisy_phases)} measured phases started although the machine had not been below "
            f"{QUIET_CORE_PERCENT:g} % of one core for half a second within {QUIET_WAIT_S:g} s: "
            f"{', '.join(self.noisy_phases[:12])}"
        )
