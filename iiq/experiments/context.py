"""`ExperimentContext`: everything a tool handler may touch while it runs."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol


class RunBackend(Protocol):
    """Runner-side implementation behind a context; handlers never use it directly."""

    async def emit(self, event_type: str, stage: str | None, payload: Mapping[str, Any]) -> int: ...

    async def check_cancelled(self) -> bool: ...

    async def save_results(self, summary: Mapping[str, Any]) -> None: ...


class ExperimentContext:
    """The run-time view of one experiment, passed to `ToolHandler.run`.

    Identity comes from the experiment row (`org_id`, `created_by`): a handler runs in a
    worker, with no HTTP request behind it. Collaborators that other services provide (for
    example ``kb``, ``vidur``, ``igt`` or ``benchmark``) are injected by name and read as
    attributes, so handlers use ``ctx.kb`` without importing service code.
    """

    def __init__(
        self,
        *,
        experiment_id: uuid.UUID,
        org_id: uuid.UUID,
        tool_id: str,
        target: dict[str, Any],
        input_config: dict[str, Any],
        goal: str | None,
        created_by: str | None,
        artifact_dir: Path,
        artifact_base_url: str,
        backend: RunBackend,
        collaborators: Mapping[str, Any] | None = None,
    ) -> None:
        self.experiment_id = experiment_id
        self.org_id = org_id
        self.tool_id = tool_id
        self.target = target
        self.input_config = input_config
        self.goal = goal
        self.created_by = created_by
        self._artifact_dir = artifact_dir
        self._artifact_base_url = artifact_base_url.rstrip("/")
        self._backend = backend
        self._collaborators = dict(collaborators or {})

    async def emit(self, event_type: str, stage: str | None = None, payload: Mapping[str, Any] | None = None) -> int:
        """Store one event and notify every stream of this experiment; returns its sequence number."""
        return await self._backend.emit(event_type, stage, payload or {})

    async def check_cancelled(self) -> bool:
        """Return True once a cancel was requested; the handler should then return promptly."""
        return await self._backend.check_cancelled()

    async def save_results(self, summary: Mapping[str, Any]) -> None:
        """Store `summary` and move the experiment to completed.

        Raises `InvalidTransitionError` when the experiment is no longer running, for
        example when results were already saved.
        """
        await self._backend.save_results(summary)

    def artifact_path(self, name: str) -> Path:
        """Return the file path for artifact `name` of this run, creating its directory."""
        if not name or "/" in name or "\\" in name or name.startswith("."):
            raise ValueError(f"invalid artifact name {name!r}: use a plain file name such as 'report.json'")
        self._artifact_dir.mkdir(parents=True, exist_ok=True)
        return self._artifact_dir / name

    def artifact_url(self, name: str) -> str:
        """Return the URL under which the API serves artifact `name` of this run."""
        self.artifact_path(name)
        return f"{self._artifact_base_url}/experiments/{self.experiment_id}/artifacts/{name}"

    def __getattr__(self, name: str) -> Any:
        # Only called for attributes not found normally: the injected collaborators.
        collaborators = self.__dict__.get("_collaborators", {})
        if name in collaborators:
            return collaborators[name]
        raise AttributeError(
            f"ExperimentContext has no attribute or collaborator {name!r}; "
            f"injected collaborators: {sorted(collaborators) or 'none'}"
        )
