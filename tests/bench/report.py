"""Benchmark results: figures with their targets, and the Markdown page that shows them.

The script owns the part of BENCHMARKS.md between the two marker comments and replaces only
that part, so findings written by hand around it survive a new run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from tests.bench.stats import Spread, spread

START_MARKER = "<!-- bench:results:start -->"
# The process name of the CPU row for all processes on the machine, the benchmark's and any other.
WHOLE_MACHINE = "whole machine"
END_MARKER = "<!-- bench:results:end -->"


@dataclass(frozen=True)
class Target:
    """A pass or miss condition on the median of a figure.

    `kind` is ``ratio_at_least`` or ``ratio_at_most`` (iiq divided by the baseline), or
    ``at_most`` (the iiq figure itself, in the figure's unit).
    """

    kind: str
    value: float

    def describe(self, unit: str) -> str:
        if self.kind == "ratio_at_least":
            return f">= {self.value:g} x baseline"
        if self.kind == "ratio_at_most":
            return f"<= {self.value:g} x baseline"
        if self.kind == "at_most":
            return f"<= {self.value:g} {unit}"
        raise ValueError(f"unknown target kind {self.kind!r}")

    def is_met(self, iiq: float, baseline: float | None) -> bool:
        if self.kind == "at_most":
            return iiq <= self.value
        if baseline is None or baseline == 0:
            return False
        ratio = iiq / baseline
        return ratio >= self.value if self.kind == "ratio_at_least" else ratio <= self.value


@dataclass
class Figure:
    """One measured quantity of one scenario case: a value per round for iiq and its baseline."""

    scenario: str
    case: str
    metric: str
    unit: str
    iiq: list[float] = field(default_factory=list)
    baseline: list[float] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)

    def iiq_spread(self) -> Spread:
        return spread(self.iiq)

    def baseline_spread(self) -> Spread | None:
        return spread(self.baseline) if self.baseline else None

    def ratio(self) -> float | None:
        base = self.baseline_spread()
        if base is None or base.median == 0:
            return None
        return self.iiq_spread().median / base.median

    def verdict(self, judged: bool) -> str:
        if not self.targets:
            return "report"
        if not judged:
            return "not judged (smoke)"
        base = self.baseline_spread()
        results = [target.is_met(self.iiq_spread().median, base.median if base else None) for target in self.targets]
        return "met" if all(results) else "missed"


@dataclass
class CpuShare:
    """CPU time of one process (or process group) during a measured phase, in percent of one core."""

    scenario: str
    case: str
    side: str
    process: str
    percent: list[float] = field(default_factory=list)


@dataclass
class Results:
    figures: list[Figure] = field(default_factory=list)
    cpu: list[CpuShare] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def figure(self, scenario: str, case: str, metric: str, unit: str, targets: list[Target] | None = None) -> Figure:
        """Return the figure with these names, creating it on first use."""
        for existing in self.figures:
            if (existing.scenario, existing.case, existing.metric) == (scenario, case, metric):
                return existing
        created = Figure(scenario, case, metric, unit, targets=list(targets or []))
        self.figures.append(created)
        return created

    def record_cpu(self, scenario: str, case: str, side: str, shares: dict[str, float]) -> None:
        """Append one round's CPU shares, percent of one core by process name; the whole machine comes last."""
        for process, percent in sorted(shares.items(), key=lambda item: item[0] == WHOLE_MACHINE):
            self.cpu_share(scenario, case, side, process).percent.append(percent)

    def cpu_share(self, scenario: str, case: str, side: str, process: str) -> CpuShare:
        for existing in self.cpu:
            if (existing.scenario, existing.case, existing.side, existing.process) == (scenario, case, side, process):
                return existing
        created = CpuShare(scenario, case, side, process)
        self.cpu.append(created)
        return created


def _number(value: float) -> str:
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _spread_text(summary: Spread | None, unit: str) -> str:
    if summary is None:
        return "-"
    return f"{_number(summary.median)} {unit} ({_number(summary.minimum)} to {_number(summary.maximum)})"


def render_table(results: Results, judged: bool) -> str:
    lines = [
        "| Scenario | Case | Figure | iiq: median (min to max) | Baseline in the same run | Ratio | Target | Result |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for figure in results.figures:
        ratio = figure.ratio()
        target = "; ".join(target.describe(figure.unit) for target in figure.targets) or "-"
        lines.append(
            f"| {figure.scenario} | {figure.case} | {figure.metric} "
            f"| {_spread_text(figure.iiq_spread(), figure.unit)} "
            f"| {_spread_text(figure.baseline_spread(), figure.unit)} "
            f"| {'-' if ratio is None else f'{ratio:.3g}'} | {target} | {figure.verdict(judged)} |"
        )
    return "\n".join(lines)


def render_cpu(results: Results) -> str:
    lines = [
        "| Scenario | Case | Side | Process | CPU, % of one core: median (min to max) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for share in results.cpu:
        lines.append(
            f"| {share.scenario} | {share.case} | {share.side} | {share.process} "
            f"| {_spread_text(spread(share.percent), '%') if share.percent else '-'} |"
        )
    return "\n".join(lines)


def render_section(results: Results, header: list[str], placement: list[str], judged: bool) -> str:
    parts = [START_MARKER, "", *header, "", "### Results", "", render_table(results, judged), ""]
    parts += ["### Where the processes ran", "", *placement, "", render_cpu(results), ""]
    if results.notes:
        parts += ["### Notes from this run", "", *[f"- {note}" for note in results.notes], ""]
    parts.append(END_MARKER)
    return "\n".join(parts) + "\n"


def write_report(path: Path, section: str) -> None:
    """Replace the marked section of `path`, or write a new page when the file has none."""
    if path.exists():
        text = path.read_text()
        pattern = re.compile(re.escape(START_MARKER) + r".*?" + re.escape(END_MARKER) + r"\n?", re.DOTALL)
        if pattern.search(text):
            path.write_text(pattern.sub(lambda _match: section, text, count=1))
            return
        path.write_text(text.rstrip("\n") + "\n\n" + section)
        return
    path.write_text("# Benchmarks\n\n" + section)
