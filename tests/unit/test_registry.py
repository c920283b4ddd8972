"""Tool registration and discovery, including a third-party package found by its entry point."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from iiq.errors import DuplicateToolError
from iiq.experiments.registry import ToolHandler, get_handler, register, unregister

ROOT = Path(__file__).resolve().parents[2]


async def _run(ctx: object) -> None:
    return None


def test_register_duplicate_names_tool() -> None:
    register(ToolHandler(tool_id="test.dup", validate=lambda cfg: [], estimate_cost=lambda cfg: 0.0, run=_run))
    try:
        with pytest.raises(DuplicateToolError, match="'test.dup' is already registered"):
            register(ToolHandler(tool_id="test.dup", validate=lambda cfg: [], estimate_cost=lambda cfg: 0.0, run=_run))
    finally:
        unregister("test.dup")


def test_register_rejects_bad_timeout() -> None:
    with pytest.raises(ValueError, match="timeout_seconds must be positive"):
        register(
            ToolHandler(
                tool_id="test.t", validate=lambda cfg: [], estimate_cost=lambda cfg: 0.0, run=_run, timeout_seconds=0
            )
        )
    assert get_handler("test.t") is None


def _third_party_package(root: Path) -> None:
    """Write an installed-looking distribution whose `iiq.tools` entry point names its module."""
    (root / "acme_tool.py").write_text(
        textwrap.dedent("""
        from iiq.experiments.registry import ToolHandler, register

        async def _run(ctx):
            await ctx.save_results({"ok": True})

        register(ToolHandler(tool_id="ACME1", validate=lambda cfg: [], estimate_cost=lambda cfg: 0.0, run=_run))
    """)
    )
    dist = root / "acme_tool-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-tool\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[iiq.tools]\nacme = acme_tool\n")


def test_entry_point_tool_discovered(tmp_path: Path) -> None:
    _third_party_package(tmp_path)
    script = "from iiq.experiments.registry import discover_tools; print(','.join(discover_tools()))"

    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": f"{tmp_path}:{ROOT}", "PATH": "/usr/bin:/bin"},
    )

    assert result.returncode == 0, result.stderr
    assert set(result.stdout.strip().split(",")) == {"ACME1", "L0", "L2", "L5"}


def test_entry_point_duplicate_fails_at_import(tmp_path: Path) -> None:
    _third_party_package(tmp_path)
    (tmp_path / "acme_tool.py").write_text(
        "from iiq.experiments.registry import ToolHandler, register\n"
        "async def _run(ctx): pass\n"
        "register(ToolHandler(tool_id='L5', validate=lambda cfg: [], estimate_cost=lambda cfg: 0.0, run=_run))\n"
    )
    script = "from iiq.experiments.registry import discover_tools; discover_tools()"

    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": f"{tmp_path}:{ROOT}", "PATH": "/usr/bin:/bin"},
    )

    assert result.returncode != 0
    assert "tool_id 'L5' is already registered" in result.stderr
