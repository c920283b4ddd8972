"""Experiments: the tool registry, the run context, states, the runner, quota and events."""
