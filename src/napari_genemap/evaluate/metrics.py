"""Per-gene Pearson correlation and the summaries papers report, with the pooling unit and NaN policy explicit.

- PCC@F, PCC@S, PCC@M: the first quartile, median and mean over genes of the per-gene Pearson correlation
  across spots (the first quartile and median use numpy's linear interpolation).
- MSE, MAE: over all spots and genes of a unit.
- Pooling ``"section"``: every summary is computed within each section, then averaged over sections with
  equal weight. ``"pooled"``: all spots of all sections are one unit.
- NaN policy: a gene whose prediction or truth is constant over a unit's spots has no correlation; it is
  counted in ``n_undefined`` and, with ``nan_policy="omit"``, left out of PCC@F/S/M (with ``"zero"`` it
  counts as 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd

from ..errors import GenemapInputError

Pooling = Literal["section", "pooled"]
NanPolicy = Literal["omit", "zero"]
SUMMARY_COLUMNS = ["n_spots", "n_genes", "n_undefined", "PCC@F", "PCC@S", "PCC@M", "MSE", "MAE"]


def pearson_per_gene(prediction: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Pearson correlation of each column across rows; NaN where either column is constant."""
    prediction = np.asarray(prediction, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    if prediction.shape != truth.shape or prediction.ndim != 2:
        raise GenemapInputError(f"prediction {prediction.shape} and truth {truth.shape}: expected equal (spots, genes)")
    centred_p = prediction - prediction.mean(0)
    centred_t = truth - truth.mean(0)
    norm_p = np.sqrt((centred_p**2).sum(0))
    norm_t = np.sqrt((centred_t**2).sum(0))
    # "constant" up to rounding: a spread below 1e-12 of the column's scale is no spread at all
    scale_p = np.maximum(np.abs(prediction).max(0, initial=0.0), 1.0) * 1e-12 * np.sqrt(len(prediction))
    scale_t = np.maximum(np.abs(truth).max(0, initial=0.0), 1.0) * 1e-12 * np.sqrt(len(truth))
    defined = (norm_p > scale_p) & (norm_t > scale_t)
    pcc = np.full(prediction.shape[1], np.nan)
    pcc[defined] = (centred_p[:, defined] * centred_t[:, defined]).sum(0) / (norm_p[defined] * norm_t[defined])
    return np.clip(pcc, -1.0, 1.0)


def paired_bootstrap_sd(
    before: np.ndarray, after: np.ndarray, truth: np.ndarray, draws: int = 200, seed: int = 0
) -> float:
    """The standard deviation of the change in mean per-gene Pearson (after - before, genes undefined in a
    draw omitted) over resamplings of the spots with replacement, the same spots for both predictions: how
    much of a change between two models on one section the choice of spots alone could make."""
    rng = np.random.default_rng(seed)
    changes = []
    for _ in range(draws):
        spots = rng.integers(len(truth), size=len(truth))
        old, new = (np.nanmean(pearson_per_gene(p[spots], truth[spots])) for p in (before, after))
        changes.append(new - old)
    return float(np.std(changes))


def summarise_unit(prediction: np.ndarray, truth: np.ndarray, nan_policy: NanPolicy = "omit") -> dict:
    """The summary row of one pooling unit."""
    pcc = pearson_per_gene(prediction, truth)
    undefined = np.isnan(pcc)
    used = np.where(undefined, 0.0, pcc) if nan_policy == "zero" else pcc[~undefined]
    error = np.asarray(prediction, dtype=np.float64) - np.asarray(truth, dtype=np.float64)
    row: dict[str, float] = {"n_spots": len(truth), "n_genes": pcc.size, "n_undefined": int(undefined.sum())}
    if used.size:
        row.update({"PCC@F": np.quantile(used, 0.25), "PCC@S": np.median(used), "PCC@M": used.mean()})
    else:
        row.update({"PCC@F": np.nan, "PCC@S": np.nan, "PCC@M": np.nan})
    row.update({"MSE": float((error**2).mean()), "MAE": float(np.abs(error).mean())})
    return row


@dataclass
class Evaluation:
    """Per-gene correlations (genes x units) and one summary row per unit plus the reported ``mean`` row."""

    per_gene: pd.DataFrame
    summary: pd.DataFrame
    pooling: Pooling
    nan_policy: NanPolicy
    protocol: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def reported(self) -> pd.Series:
        return self.summary.loc["mean"]

    def describe(self) -> str:
        """The protocol line every reported number carries."""
        return (
            f"protocol {self.protocol or 'unnamed'}; {self.summary.loc['mean', 'n_genes']:.0f} genes; pooling "
            f"{'per section, then averaged' if self.pooling == 'section' else 'all spots pooled'}; "
            f"undefined genes {'omitted' if self.nan_policy == 'omit' else 'counted as 0'}"
        )


def evaluate(
    prediction: np.ndarray,
    truth: np.ndarray,
    genes: Sequence[str],
    sections: Sequence[str] | None = None,
    *,
    pooling: Pooling = "section",
    nan_policy: NanPolicy = "omit",
    protocol: str = "",
) -> Evaluation:
    """Compare predictions with truth (both (spots, genes), on the protocol's scale)."""
    prediction = np.asarray(prediction, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    if prediction.shape != truth.shape:
        raise GenemapInputError(f"prediction {prediction.shape} and truth {truth.shape} differ; expected equal shapes")
    if len(genes) != truth.shape[1]:
        raise GenemapInputError(f"{len(genes)} gene names for {truth.shape[1]} columns")
    if pooling not in ("section", "pooled"):
        raise GenemapInputError(f"pooling {pooling!r}; expected 'section' or 'pooled'")
    if nan_policy not in ("omit", "zero"):
        raise GenemapInputError(f"nan_policy {nan_policy!r}; expected 'omit' or 'zero'")
    if not np.all(np.isfinite(prediction)):
        raise GenemapInputError("prediction contains NaN or infinite values")
    labels = np.asarray(["all"] * len(truth) if sections is None else sections, dtype=object)
    if len(labels) != len(truth):
        raise GenemapInputError(f"{len(labels)} section labels for {len(truth)} spots")
    units = ["all"] if pooling == "pooled" else list(pd.unique(labels))
    rows, per_gene = {}, {}
    for unit in units:
        mask = np.ones(len(truth), bool) if pooling == "pooled" else labels == unit
        rows[unit] = summarise_unit(prediction[mask], truth[mask], nan_policy)
        per_gene[unit] = pearson_per_gene(prediction[mask], truth[mask])
    summary = pd.DataFrame.from_dict(rows, orient="index")[SUMMARY_COLUMNS]
    mean = summary.mean(numeric_only=True)
    mean["n_spots"] = summary["n_spots"].sum()
    mean["n_undefined"] = summary["n_undefined"].sum()
    summary.loc["mean"] = mean
    return Evaluation(
        per_gene=pd.DataFrame(per_gene, index=pd.Index(list(genes), name="gene")),
        summary=summary,
        pooling=pooling,
        nan_policy=nan_policy,
        protocol=protocol,
    )
