"""Scores of a super-resolved map against the measured HR spots (protocol values, measured cells only).

- ``pcc``: Pearson of each gene across the measured HR spots; mean and median over genes, genes whose
  correlation is undefined (constant truth or prediction) left out and counted;
- ``ssim`` and ``rmse`` as Diff-ST reports them: each gene's map and its truth min-max scaled to [0, 1] over
  the measured cells (unmeasured cells 0), SSIM over the grid image (7 x 7 windows), RMSE over measured cells;
- for a method with a spread (standard deviation of its samples): the fraction of measured values inside
  mean +- 1 and +- 2 spreads (a calibrated Gaussian spread gives 0.68 and 0.95) and the Spearman
  correlation between spread and absolute error (does a larger spread mean a larger error?).
"""

from __future__ import annotations

import numpy as np

from .metrics import pearson_per_gene


def superres_scores(prediction: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> dict:
    """(genes, H, W) prediction and truth on a grid, ``mask`` (H, W) the measured cells."""
    from skimage.metrics import structural_similarity

    pcc = pearson_per_gene(prediction[:, mask].T, truth[:, mask].T)
    ssim, rmse = [], []
    for guess, real in zip(prediction, truth, strict=True):
        scaled = [_min_max(values, mask) for values in (guess, real)]
        rmse.append(float(np.sqrt(np.mean((scaled[0][mask] - scaled[1][mask]) ** 2))))
        ssim.append(float(structural_similarity(scaled[0], scaled[1], data_range=1.0, win_size=7)))
    defined = pcc[np.isfinite(pcc)]
    return {
        "pcc_mean": float(defined.mean()) if len(defined) else float("nan"),
        "pcc_median": float(np.median(defined)) if len(defined) else float("nan"),
        "pcc_undefined": int(len(pcc) - len(defined)),
        "ssim": float(np.mean(ssim)),
        "rmse": float(np.mean(rmse)),
        "per_gene_pcc": [float(v) for v in pcc],
    }


def spread_calibration(mean: np.ndarray, spread: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> dict:
    """Coverage of mean +- 1 and 2 spreads, and Spearman(spread, |error|), over measured (cell, gene) values."""
    from scipy.stats import spearmanr

    error = np.abs(mean[:, mask] - truth[:, mask]).ravel()
    width = spread[:, mask].ravel()
    return {
        "inside_1sd": float(np.mean(error <= width)),
        "inside_2sd": float(np.mean(error <= 2 * width)),
        "spearman_spread_error": float(spearmanr(width, error).statistic),
    }


def _min_max(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    inside = values[mask]
    low, span = inside.min(), np.ptp(inside)
    scaled = (values - low) / span if span > 0 else np.zeros_like(values)
    return np.where(mask, scaled, 0.0)
