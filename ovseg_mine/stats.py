"""Summary of a sample of numbers (a score column, pairs per image): count, nulls, mean, min, quantiles, max.

The one implementation behind the quantile tables of ``inspect`` (:func:`ovseg_mine.inspect.quality.quantiles`,
rounded, keyed ``p5`` .. ``p95``) and of the dataset card (:func:`ovseg_mine.publish.card.pair_stats`, a list).
Quantiles are numpy's default (linear interpolation between order statistics).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


@dataclass(frozen=True)
class Summary:
    """What :func:`summarize` found.

    Attributes:
        n: finite values.
        nulls: values left out (None or NaN).
        mean, min, max: float64 statistics of the finite values; None when ``n == 0``.
        quantiles: the values at :data:`QUANTILES` (or the levels asked for), in order; None when ``n == 0``.
    """

    n: int
    nulls: int
    mean: float | None
    min: float | None
    max: float | None
    quantiles: list[float] | None


def summarize(values: Iterable[Any] | np.ndarray, levels: tuple[float, ...] = QUANTILES) -> Summary:
    """Summarize a 1-D sample.

    Args:
        values: numbers (an iterable or an array); None and NaN count as nulls and are left out.
        levels: quantile levels in [0, 1].
    """
    arr = np.asarray(values if isinstance(values, np.ndarray) else list(values), dtype=np.float64).ravel()
    good = arr[np.isfinite(arr)]
    if not good.size:
        return Summary(0, int(arr.size), None, None, None, None)
    return Summary(
        n=int(good.size),
        nulls=int(arr.size - good.size),
        mean=float(good.mean()),
        min=float(good.min()),
        max=float(good.max()),
        quantiles=[float(q) for q in np.quantile(good, levels)],
    )
