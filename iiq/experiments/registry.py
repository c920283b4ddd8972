"""The tool registry: each tool registers exactly one `ToolHandler` when its module is imported.

Tool authors write::

    from iiq.experiments.registry import ToolHandler, register

    register(ToolHandler(tool_id="L42", validate=..., estimate_cost=..., run=...))
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

from iiq.errors import ConfigurationError, DuplicateToolError

if TYPE_CHECKING:
    from iiq.experiments.context import ExperimentContext

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "iiq.tools"

ValidateFn = Callable[[dict[str, Any]], list[str]]
EstimateCostFn = Callable[[dict[str, Any]], float]
# A coroutine function, because the runner wraps each run in `asyncio.create_task`.
RunFn = Callable[["ExperimentContext"], Coroutine[Any, Any, None]]


@dataclass(frozen=True)
class ToolHandler:
    """One tool's contract with the engine.

    `validate` and `estimate_cost` receive ``{**input_config, "target": target}``; `validate`
    returns human-readable error strings (empty means valid) and `estimate_cost` returns
    GPU-hours. `run` does the work through the `ExperimentContext` it is given.
    `timeout_seconds` overrides the engine's soft time limit for this tool; `uses_gpu` is
    False for tools that hold no GPU, whose runs are charged nothing.
    """

    tool_id: str
    validate: ValidateFn
    estimate_cost: EstimateCostFn
    run: RunFn
    timeout_seconds: float | None = None
    uses_gpu: bool = True
    name: str = ""
    description: str = ""
    example_input_config: Mapping[str, Any] = field(default_factory=dict)
    example_target: Mapping[str, Any] = field(default_factory=dict)


_handlers: dict[str, ToolHandler] = {}


def register(handler: ToolHandler) -> ToolHandler:
    """Add `handler` to the registry; a tool_id that is already registered raises."""
    if not handler.tool_id or not handler.tool_id.strip():
        raise ValueError("ToolHandler.tool_id must be a non-empty string")
    if handler.timeout_seconds is not None and handler.timeout_seconds <= 0:
        raise ValueError(
            f"ToolHandler {handler.tool_id!r}: timeout_seconds must be positive, got {handler.timeout_seconds}"
        )
    existing = _handlers.get(handler.tool_id)
    if existing is not None:
        raise DuplicateToolError(
            f"tool_id {handler.tool_id!r} is already registered by {existing.run.__module__}; "
            f"{handler.run.__module__} cannot register it again"
        )
    _handlers[handler.tool_id] = handler
    return handler


def unregister(tool_id: str) -> None:
    """Remove a tool; meant for tests that register throwaway handlers."""
    _handlers.pop(tool_id, None)


def get_handler(tool_id: str) -> ToolHandler | None:
    return _handlers.get(tool_id)


def all_handlers() -> list[ToolHandler]:
    return [_handlers[tool_id] for tool_id in sorted(_handlers)]


_discovered = False


def discover_tools(extra_modules: str = "") -> list[str]:
    """Import the shipped `tools` package, every module named in the `iiq.tools` entry-point
    group and the comma-separated `extra_modules` (the `IIQ_TOOL_MODULES` setting).

    Importing a module registers its handlers. Safe to call more than once. Returns the
    registered tool ids.
    """
    global _discovered
    if not _discovered:
        # The shipped tools first, so a module that reuses one of their ids is the one blamed.
        modules = ["tools"]
        modules += sorted({entry.value.split(":")[0] for entry in entry_points(group=ENTRY_POINT_GROUP)} - {"tools"})
        for module_name in modules:
            _import_tree(module_name)
        _discovered = True
    for module_name in filter(None, (name.strip() for name in extra_modules.split(","))):
        _import_tree(module_name)
    return sorted(_handlers)


def _import_tree(module_name: str) -> None:
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise  # the module exists but one of its own imports is missing
        raise ConfigurationError(
            f"tool module {module_name!r} not found: check IIQ_TOOL_MODULES and the `iiq.tools` entry points "
            "of installed packages"
        ) from exc
    logger.debug("tool module imported", extra={"tool_module": module_name})
    if hasattr(module, "__path__"):
        for info in pkgutil.iter_modules(module.__path__, prefix=f"{module_name}."):
            if not info.name.rsplit(".", 1)[-1].startswith("_"):
                importlib.import_module(info.name)
