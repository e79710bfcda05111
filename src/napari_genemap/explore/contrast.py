"""A gene map's contrast follows what is in view: 0 to the 99.5th percentile of the visible values.

Re-set only when that percentile moves by more than 10% (panning within a region does not flicker), never
once the user has set limits by hand; the slider's range widens to the largest visible value.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PERCENTILE = 99.5
TOLERANCE = 0.1  # relative change of the upper limit below which the limits stay


@dataclass(frozen=True)
class Contrast:
    """New contrast limits, and the slider range to widen to first (None: the current one holds them)."""

    limits: tuple[float, float]
    range: tuple[float, float] | None


def view_contrast(
    values: np.ndarray, limits: tuple[float, float], slider: tuple[float, float], *, following: bool, user_set: bool
) -> Contrast | None:
    """The contrast for the ``values`` in view (NaN: not predicted or glass), or None to keep ``limits``.

    ``following``: the limits were set by this rule before (so small changes are ignored); ``user_set``:
    the user chose them (so they stay); ``slider``: the current contrast-limit range.
    """
    values = np.asarray(values, float)
    values = values[np.isfinite(values)]
    if user_set or not values.size or values.max() <= 0:
        return None
    high = float(np.percentile(values, PERCENTILE)) or float(values.max())
    current = float(limits[1])
    if following and abs(high - current) <= TOLERANCE * current:
        return None
    top = max(float(values.max()), high)
    return Contrast((0.0, high), (0.0, top) if top > slider[1] else None)
