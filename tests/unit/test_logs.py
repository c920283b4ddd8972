"""Log formatting: constant messages with ids as fields, as JSON lines or text."""

from __future__ import annotations

import json
import logging

from iiq.logs import JsonFormatter, TextFormatter


def _record(**fields: object) -> logging.LogRecord:
    record = logging.LogRecord("iiq.experiments.runner", logging.INFO, __file__, 1, "experiment started", None, None)
    for key, value in fields.items():
        setattr(record, key, value)
    return record


def test_json_line_has_fields() -> None:
    line = JsonFormatter().format(_record(experiment_id="e-1", tool_id="L5"))

    entry = json.loads(line)
    assert entry["message"] == "experiment started"
    assert entry["experiment_id"] == "e-1"
    assert entry["tool_id"] == "L5"
    assert entry["level"] == "INFO"
    assert entry["logger"] == "iiq.experiments.runner"


def test_text_line_appends_fields() -> None:
    line = TextFormatter("%(levelname)s %(name)s: %(message)s").format(_record(experiment_id="e-1"))

    assert line == "INFO iiq.experiments.runner: experiment started experiment_id=e-1"
