"""Percentiles and the median, minimum and maximum of per-round figures."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass


def percentile(values: Sequence[float], fraction: float) -> float:
    """Return the `fraction` quantile (0 to 1) of `values`, interpolating linearly between ranks."""
    if not values:
        raise ValueError("cannot take a percentile of an empty sample")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be from 0 to 1, got {fraction}")
    ordered = sorted(values)
    position = (len(ordered) - 1) * fraction
    low = math.floor(position)
    high = math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(frozen=True)
class Spread:
    """The median, minimum and maximum of one figure over several rounds."""

    median: float
    minimum: float
    maximum: float


def spread(values: Sequence[float]) -> Spread:
    if not values:
        raise ValueError("cannot summarize zero rounds")
    return Spread(median=statistics.median(values), minimum=min(values), maximum=max(values))
