"""Calibrate a histology prediction to what was measured: the baseline every super-resolution method must beat.

Given a model's raw-scale predictions on the HR grid and the measured LR blocks, each block's prediction is
rescaled per gene so that its spots sum to the block's measured counts: the histology decides how a block's
counts are shared among its spots, the measurement decides how many there are. A block the model gives
nothing to is shared evenly.
"""

from __future__ import annotations

import numpy as np

from ..errors import GenemapInputError


def calibrate_to_blocks(predicted: np.ndarray, hr_mask: np.ndarray, lr_counts: np.ndarray, factor: int) -> np.ndarray:
    """``predicted`` (genes, H, W) raw-scale values (>= 0), ``hr_mask`` (H, W) the measured spots, ``lr_counts``
    (genes, H / factor, W / factor) the blocks' measured sums -> (genes, H, W) calibrated, 0 off the spots."""
    genes, rows, cols = predicted.shape
    if rows % factor or cols % factor or lr_counts.shape != (genes, rows // factor, cols // factor):
        raise GenemapInputError(
            f"calibration: a {rows} x {cols} grid of {genes} genes and LR blocks of shape {lr_counts.shape} do "
            f"not fit blocks of {factor}"
        )
    weight = np.where(hr_mask, np.clip(predicted, 0, None), 0.0).astype(np.float64)

    def blocks(values: np.ndarray) -> np.ndarray:
        return values.reshape(*values.shape[:-2], rows // factor, factor, cols // factor, factor).sum((-3, -1))

    def spread(values: np.ndarray) -> np.ndarray:  # a block's value on each of its cells
        return np.repeat(np.repeat(values, factor, -2), factor, -1)

    totals = blocks(weight)
    spots = blocks(hr_mask.astype(np.float64))
    even = np.where(spots > 0, 1.0 / np.maximum(spots, 1), 0.0)
    share = np.where(spread(totals) > 0, weight / np.where(spread(totals) > 0, spread(totals), 1), spread(even))
    return (np.where(hr_mask, share, 0.0) * spread(lr_counts.astype(np.float64))).astype(np.float32)
