"""Tool handlers driven through ExperimentContext with an in-memory RunBackend."""

import hashlib
import json
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from iiq.experiments.context import ExperimentContext
from tools import l0_hardware_profiling, l2_quantization, l5_batching

TOOLS = {"L0": l0_hardware_profiling, "L2": l2_quantization, "L5": l5_batching}
TARGET = {"model_id": "meta-llama/Llama-3.1-8B-Instruct", "hardware": "H100-SXM", "engine": "vllm", "gpu_count": 1}
BASE_URL = "http://testserver/api"


class FakeBackend:
    """RunBackend that records events and the saved summary.

    check_cancelled returns True once `cancel_after` candidate events were emitted.
    """

    def __init__(self, cancel_after: int | None = None) -> None:
        self.events: list[tuple[str, str | None, dict[str, Any]]] = []
        self.summary: dict[str, Any] | None = None
        self.cancel_after = cancel_after

    async def emit(self, event_type: str, stage: str | None, payload: Mapping[str, Any]) -> int:
        self.events.append((event_type, stage, dict(payload)))
        return len(self.events)

    async def check_cancelled(self) -> bool:
        candidates = [stage for _, stage, _ in self.events if stage and stage.startswith("candidate-")]
        return self.cancel_after is not None and len(candidates) >= self.cancel_after

    async def save_results(self, summary: Mapping[str, Any]) -> None:
        assert self.summary is None, "save_results called twice"
        self.summary = dict(summary)


def _context(tmp_path: Path, tool_id: str, backend: FakeBackend, *, input_config=None, target=None, goal=None):
    module = TOOLS[tool_id]
    return ExperimentContext(
        experiment_id=uuid.uuid4(),
        org_id=uuid.uuid4(),
        tool_id=tool_id,
        target=dict(target or TARGET),
        input_config=dict(input_config or module.EXAMPLE_INPUT_CONFIG),
        goal=goal,
        created_by="test@example.com",
        artifact_dir=tmp_path / "artifacts",
        artifact_base_url=BASE_URL,
        backend=backend,
    )


def _report(ctx: ExperimentContext) -> dict[str, Any]:
    return json.loads(ctx.artifact_path("report.json").read_text(encoding="utf-8"))


CANDIDATE_COUNTS = {"L0": 3, "L2": 4, "L5": 5}


@pytest.mark.parametrize("tool_id", sorted(TOOLS))
async def test_run_emits_progress_per_candidate(tmp_path: Path, tool_id: str) -> None:
    backend = FakeBackend()
    await TOOLS[tool_id].run(_context(tmp_path, tool_id, backend))

    stages = [stage for _, stage, _ in backend.events]
    assert stages[0] == "setup"
    assert stages[1:] == [f"candidate-{index}" for index in range(1, CANDIDATE_COUNTS[tool_id] + 1)]
    assert {event_type for event_type, _, _ in backend.events} == {"progress"}
    assert backend.events[0][2]["model_id"] == TARGET["model_id"]
    assert all("metrics" in payload for _, _, payload in backend.events[1:])


@pytest.mark.parametrize("tool_id", sorted(TOOLS))
async def test_run_saves_summary(tmp_path: Path, tool_id: str) -> None:
    backend = FakeBackend()
    ctx = _context(tmp_path, tool_id, backend)
    await TOOLS[tool_id].run(ctx)

    summary = backend.summary
    assert summary is not None
    candidate_names = [payload["candidate"] for _, _, payload in backend.events[1:]]
    assert summary["winner"] in candidate_names
    assert isinstance(summary["metric"], str)
    assert isinstance(summary["delta_pct"], float)
    assert summary["delta_pct"] == round(summary["delta_pct"], 2)
    assert summary["report_url"] == f"{BASE_URL}/experiments/{ctx.experiment_id}/artifacts/report.json"

    canonical = json.dumps(summary["recipe"], sort_keys=True, separators=(",", ":"))
    assert summary["recipe_hash"] == "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


@pytest.mark.parametrize("tool_id", sorted(TOOLS))
async def test_run_writes_report(tmp_path: Path, tool_id: str) -> None:
    backend = FakeBackend()
    ctx = _context(tmp_path, tool_id, backend)
    await TOOLS[tool_id].run(ctx)

    report_path = tmp_path / "artifacts" / "report.json"
    assert report_path.exists()
    report = _report(ctx)
    assert len(report["candidates"]) == CANDIDATE_COUNTS[tool_id]
    assert report["model"]["parameter_count"] == 8_030_261_248
    assert report["assumptions"]["usable_memory_fraction"] == 0.9
    assert "gpu" in report or "gpus" in report
    assert report["summary"]["winner"] == backend.summary["winner"]


@pytest.mark.parametrize("tool_id", sorted(TOOLS))
async def test_run_cancel_after_first_candidate(tmp_path: Path, tool_id: str) -> None:
    backend = FakeBackend(cancel_after=1)
    await TOOLS[tool_id].run(_context(tmp_path, tool_id, backend))

    assert [stage for _, stage, _ in backend.events] == ["setup", "candidate-1"]
    assert backend.summary is None
    assert not (tmp_path / "artifacts" / "report.json").exists()


async def test_run_cancel_during_setup(tmp_path: Path) -> None:
    backend = FakeBackend(cancel_after=0)
    await l5_batching.run(_context(tmp_path, "L5", backend))

    assert [stage for _, stage, _ in backend.events] == ["setup"]
    assert backend.summary is None


async def test_l5_winner_by_throughput(tmp_path: Path) -> None:
    backend = FakeBackend()
    await l5_batching.run(_context(tmp_path, "L5", backend))

    assert backend.summary["winner"] == "batch-128"
    assert backend.summary["baseline"] == "batch-1"
    assert backend.summary["metric"] == "throughput_tokens_per_s"
    assert backend.summary["recipe"]["max_batch_size"] == 128
    assert backend.summary["delta_pct"] > 0


async def test_l5_winner_by_latency(tmp_path: Path) -> None:
    backend = FakeBackend()
    await l5_batching.run(_context(tmp_path, "L5", backend, goal="latency"))

    assert backend.summary["winner"] == "batch-1"
    assert backend.summary["metric"] == "time_per_output_token_ms"
    assert backend.summary["delta_pct"] == 0.0


async def test_l5_skips_batches_that_do_not_fit(tmp_path: Path) -> None:
    backend = FakeBackend()
    target = {**TARGET, "hardware": "L4"}
    ctx = _context(tmp_path, "L5", backend, target=target)
    await l5_batching.run(ctx)

    assert backend.summary["winner"] == "batch-32"
    assert backend.summary["candidates_fitting"] == 3
    fits = {candidate["name"]: candidate["metrics"]["fits"] for candidate in _report(ctx)["candidates"]}
    assert fits == {"batch-1": True, "batch-8": True, "batch-32": True, "batch-64": False, "batch-128": False}


async def test_l5_unknown_goal_uses_default(tmp_path: Path) -> None:
    backend = FakeBackend()
    ctx = _context(tmp_path, "L5", backend, goal="quality")
    await l5_batching.run(ctx)

    assert backend.summary["metric"] == "throughput_tokens_per_s"
    assert "goal 'quality' is not known" in _report(ctx)["goal_note"]


@pytest.mark.parametrize(
    ("goal", "metric"),
    [
        ("cost", "gpu_hours_per_million_tokens"),
        ("memory", "throughput_tokens_per_s_per_gb"),
        ("throughput", "throughput_tokens_per_s"),
    ],
)
async def test_l5_metric_per_goal(tmp_path: Path, goal: str, metric: str) -> None:
    backend = FakeBackend()
    await l5_batching.run(_context(tmp_path, "L5", backend, goal=goal))

    assert backend.summary["metric"] == metric
    assert backend.summary["winner"] == "batch-128"


async def test_l2_winner_and_baseline(tmp_path: Path) -> None:
    backend = FakeBackend()
    await l2_quantization.run(_context(tmp_path, "L2", backend))

    assert backend.summary["baseline"] == "bf16"
    assert backend.summary["winner"] == "int4-awq"
    assert backend.summary["recipe"]["weight_format"] == "int4-awq"


async def test_l2_quality_limit_excludes_int4(tmp_path: Path) -> None:
    backend = FakeBackend()
    config = {**l2_quantization.EXAMPLE_INPUT_CONFIG, "max_quality_drop_pct": 1.0}
    ctx = _context(tmp_path, "L2", backend, input_config=config)
    await l2_quantization.run(ctx)

    assert backend.summary["winner"] == "fp8"
    excluded = {candidate["name"]: candidate["metrics"].get("excluded") for candidate in _report(ctx)["candidates"]}
    assert excluded["int4-awq"].startswith("estimated quality drop 2.0% exceeds")
    assert excluded["fp8"] is None


async def test_l2_memory_goal(tmp_path: Path) -> None:
    backend = FakeBackend()
    await l2_quantization.run(_context(tmp_path, "L2", backend, goal="memory"))

    assert backend.summary["metric"] == "memory_needed_gb"
    assert backend.summary["higher_is_better"] is False
    assert backend.summary["winner"] == "int4-awq"
    assert 0 < backend.summary["delta_pct"] < 100


async def test_l2_baseline_is_first_without_bf16(tmp_path: Path) -> None:
    backend = FakeBackend()
    config = {**l2_quantization.EXAMPLE_INPUT_CONFIG, "weight_formats": ["fp8", "int4-awq"]}
    await l2_quantization.run(_context(tmp_path, "L2", backend, input_config=config))

    assert backend.summary["baseline"] == "fp8"


async def test_l0_adds_target_hardware_as_baseline(tmp_path: Path) -> None:
    backend = FakeBackend()
    config = {**l0_hardware_profiling.EXAMPLE_INPUT_CONFIG, "hardware": ["L4", "A100-80GB"]}
    target = {**TARGET, "hardware": "H200"}
    await l0_hardware_profiling.run(_context(tmp_path, "L0", backend, input_config=config, target=target))

    assert [payload["candidate"] for _, _, payload in backend.events[1:]] == ["H200", "L4", "A100-80GB"]
    assert backend.summary["baseline"] == "H200"
    assert backend.summary["winner"] == "H200"
    assert backend.summary["delta_pct"] == 0.0


async def test_l0_nothing_fits(tmp_path: Path) -> None:
    backend = FakeBackend()
    target = {**TARGET, "model_id": "meta-llama/Llama-3.1-70B-Instruct"}
    config = {**l0_hardware_profiling.EXAMPLE_INPUT_CONFIG, "hardware": ["A100-80GB", "L4"]}
    ctx = _context(tmp_path, "L0", backend, input_config=config, target=target)
    await l0_hardware_profiling.run(ctx)

    summary = backend.summary
    assert summary["winner"] is None
    assert summary["delta_pct"] is None
    assert summary["recipe_hash"] is None
    assert summary["baseline_fits"] is False
    assert summary["candidates_fitting"] == 0
    assert _report(ctx)["summary"]["winner"] is None


async def test_l0_two_gpus_fit_70b(tmp_path: Path) -> None:
    backend = FakeBackend()
    target = {**TARGET, "model_id": "meta-llama/Llama-3.1-70B-Instruct", "gpu_count": 2}
    config = {**l0_hardware_profiling.EXAMPLE_INPUT_CONFIG, "hardware": ["H200", "L4"], "batch_size": 1}
    await l0_hardware_profiling.run(_context(tmp_path, "L0", backend, input_config=config, target=target))

    assert backend.summary["winner"] == "H200"
    assert backend.summary["baseline_fits"] is True
    assert backend.summary["recipe"]["gpu_count"] == 2


async def test_run_rejects_invalid_config(tmp_path: Path) -> None:
    backend = FakeBackend()
    config = {**l5_batching.EXAMPLE_INPUT_CONFIG, "batch_sizes": [0]}

    with pytest.raises(ValueError, match=r"batch_sizes\[0\] 0 is invalid"):
        await l5_batching.run(_context(tmp_path, "L5", backend, input_config=config))
    assert backend.events == []
