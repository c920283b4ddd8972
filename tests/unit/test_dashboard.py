"""The Grafana dashboard queries only metrics that iiq exports, and charts every one of them."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from prometheus_client.metrics import MetricWrapperBase

import iiq.experiments.metrics as iiq_metrics

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "iiq-experiments.json"

# PromQL functions and aggregation operators used, or likely to be used, in dashboards.
PROMQL_FUNCTIONS = frozenset(
    {
        "abs", "absent", "absent_over_time", "avg", "avg_over_time", "bottomk", "ceil", "changes",
        "clamp", "clamp_max", "clamp_min", "count", "count_over_time", "count_values", "delta", "deriv",
        "exp", "floor", "group", "histogram_quantile", "idelta", "increase", "irate", "label_join",
        "label_replace", "last_over_time", "ln", "log2", "log10", "max", "max_over_time", "min",
        "min_over_time", "predict_linear", "present_over_time", "quantile", "quantile_over_time",
        "rate", "resets", "round", "scalar", "sgn", "sort", "sort_desc", "sqrt", "stddev",
        "stddev_over_time", "stdvar", "sum", "sum_over_time", "time", "timestamp", "topk", "vector",
    }
)  # fmt: skip
# Keywords that appear outside parentheses: binary operators, modifiers and special values.
PROMQL_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "inf", "nan", "atan2"})

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_BARE_GROUP_MODIFIER = re.compile(r"\b(?:group_left|group_right)\b")
# An identifier that is not part of a number (1e3), a Grafana variable ($instance) or a duration.
_IDENTIFIER = re.compile(r"(?<![\w.$])[a-zA-Z_:][a-zA-Z0-9_:]*")


def load_dashboard() -> dict[str, Any]:
    with DASHBOARD.open() as file:
        dashboard: dict[str, Any] = json.load(file)
    return dashboard


def iter_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Yield every panel, including those nested inside collapsed rows."""
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels", []))


def panel_expressions(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """Return (panel title, PromQL expression) for every target of every panel."""
    expressions = []
    for panel in iter_panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            if target.get("expr"):
                expressions.append((panel.get("title", "?"), target["expr"]))
    return expressions


def variable_expressions(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """Return (variable name, series selector) for each `label_values(selector, label)` variable query."""
    expressions = []
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        text = query.get("query", "") if isinstance(query, dict) else query or ""
        match = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", text)
        if match:
            expressions.append((variable["name"], match.group(1)))
    return expressions


def metric_names(expr: str) -> set[str]:
    """Return the metric names that a PromQL expression selects.

    Strings, label matchers, range selectors and grouping label lists are removed first, so
    what remains are functions (followed by `(`), keywords and metric names.
    """
    text = _STRING.sub(" ", expr)
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    text = _BARE_GROUP_MODIFIER.sub(" ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        token = match.group(0)
        is_call = text[match.end() :].lstrip().startswith("(")
        if is_call:
            if token not in PROMQL_FUNCTIONS:
                raise ValueError(
                    f"unknown PromQL function {token!r} in {expr!r}: fix the name, "
                    "or add it to PROMQL_FUNCTIONS if PromQL has it"
                )
            continue
        if token.lower() in PROMQL_KEYWORDS:
            continue
        names.add(token)
    return names


def exported_names() -> set[str]:
    """Return every series name that `generate_latest()` can emit in an iiq process."""
    names = set()
    for family in REGISTRY.collect():
        if family.type == "counter":
            names |= {family.name + "_total", family.name + "_created"}
        elif family.type == "histogram":
            names |= {family.name + suffix for suffix in ("_bucket", "_sum", "_count", "_created")}
        elif family.type == "summary":
            names |= {family.name, family.name + "_sum", family.name + "_count", family.name + "_created"}
        elif family.type == "info":
            names.add(family.name + "_info")
        else:
            names.add(family.name)
    return names


def declared_metrics() -> dict[str, MetricWrapperBase]:
    """Return the metric objects declared in `iiq.experiments.metrics`, by attribute name."""
    return {name: value for name, value in vars(iiq_metrics).items() if isinstance(value, MetricWrapperBase)}


def series_names(metric: MetricWrapperBase) -> set[str]:
    """Return the series names one metric object exports (a counter's `_total`, a histogram's `_bucket`, ...)."""
    (family,) = metric.describe()
    if family.type == "counter":
        return {family.name + "_total"}
    if family.type == "histogram":
        return {family.name + suffix for suffix in ("_bucket", "_sum", "_count")}
    return {family.name}


def test_dashboard_uid_and_title() -> None:
    dashboard = load_dashboard()

    assert dashboard["uid"] == "iiq-experiments"
    assert dashboard["title"] == "iiq experiments"


def test_dashboard_datasource_is_a_variable() -> None:
    dashboard = load_dashboard()
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}

    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in iter_panels(dashboard["panels"]):
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_dashboard_panel_ids_unique() -> None:
    ids = [panel["id"] for panel in iter_panels(load_dashboard()["panels"])]

    assert len(ids) == len(set(ids))


def test_dashboard_queries_only_exported_metrics() -> None:
    dashboard = load_dashboard()
    exported = exported_names()
    expressions = panel_expressions(dashboard) + variable_expressions(dashboard)

    assert expressions
    for where, expr in expressions:
        names = metric_names(expr)
        assert names, f"{where}: no metric name found in {expr!r}"
        unknown = names - exported
        assert not unknown, f"{where}: {sorted(unknown)} in {expr!r} are not exported by iiq"


def test_every_declared_metric_has_a_panel() -> None:
    queried: set[str] = set()
    for _, expr in panel_expressions(load_dashboard()):
        queried |= metric_names(expr)
    declared = declared_metrics()

    assert declared
    for attribute, metric in declared.items():
        assert series_names(metric) & queried, (
            f"iiq.experiments.metrics.{attribute} has no panel in {DASHBOARD.name}: add one"
        )


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ('sum by (tool) (rate(experiments_created_total{instance=~"$instance"}[$__rate_interval]))',
         {"experiments_created_total"}),
        ("histogram_quantile(0.99, sum by (le, tool) (rate(experiment_duration_seconds_bucket[5m])))",
         {"experiment_duration_seconds_bucket"}),
        ("sum(rate(a_sum[5m])) / sum(rate(a_count[5m])) > bool 1e3", {"a_sum", "a_count"}),
        ('sum(rate(a[5m])) by (le) or on (tool) group_left (status) b offset 5m', {"a", "b"}),
        ('label_replace(a, "dst", "$1", "src", "(.*)")', {"a"}),
    ],
)  # fmt: skip
def test_metric_names_parser(expr: str, expected: set[str]) -> None:
    assert metric_names(expr) == expected


def test_metric_names_rejects_unknown_function() -> None:
    with pytest.raises(ValueError, match="unknown PromQL function 'rat'"):
        metric_names("sum(rat(experiments_created_total[5m]))")
