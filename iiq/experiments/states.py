"""Experiment states and the edges between them.

``pending -> queued -> running -> {completed, failed, cancelled, timed_out}``, plus
``pending | queued -> cancelled`` for an experiment cancelled before it starts. Terminal
states are final. Every edge is one guarded UPDATE in `sql/queries/experiments.sql`.
"""

from __future__ import annotations

from enum import StrEnum


class Status(StrEnum):
    PENDING = "pending"
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"


ACTIVE = frozenset({Status.PENDING, Status.QUEUED, Status.RUNNING})
TERMINAL = frozenset({Status.COMPLETED, Status.FAILED, Status.CANCELLED, Status.TIMED_OUT})

TRANSITIONS: dict[Status, frozenset[Status]] = {
    Status.PENDING: frozenset({Status.QUEUED, Status.CANCELLED}),
    Status.QUEUED: frozenset({Status.RUNNING, Status.CANCELLED}),
    Status.RUNNING: frozenset({Status.COMPLETED, Status.FAILED, Status.CANCELLED, Status.TIMED_OUT}),
    Status.COMPLETED: frozenset(),
    Status.FAILED: frozenset(),
    Status.CANCELLED: frozenset(),
    Status.TIMED_OUT: frozenset(),
}

GOALS = ("throughput", "latency", "cost", "memory")

# The event type written with every transition, so a stream shows the whole life of a run.
STATUS_EVENT = "status"
