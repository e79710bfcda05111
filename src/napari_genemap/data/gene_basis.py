"""Principal components of gene expression: the starting mix of a low-rank gene head (issue 13).

Counts without images are still real information about how genes co-vary (HER2ST has 35 sections with
counts, 5 with images here), so a low-rank head can start from the principal axes of many sections' spots
and learn only how the histology sets the component scores.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import GenemapInputError


def log_expression(counts: np.ndarray, target_sum: float = 1e4) -> np.ndarray:
    """ln(1 + counts scaled to ``target_sum`` per spot), (spots, genes); spots without counts are dropped.

    Natural log: a gene head's output goes through softplus, which is close to exp for the small densities
    of most genes, so the head's pre-activation lives on this scale."""
    counts = np.asarray(counts, dtype=np.float64)
    totals = counts.sum(1, keepdims=True)
    keep = totals[:, 0] > 0
    return np.log1p(counts[keep] / totals[keep] * target_sum)


def gene_components(tables: Sequence[np.ndarray], n_components: int) -> np.ndarray:
    """The ``n_components`` leading principal axes (components, genes) of the spots of all ``tables`` pooled,
    each (spots, genes) raw counts of the same genes in the same order; unit rows, sign fixed so each row's
    largest entry is positive (a deterministic result)."""
    from sklearn.decomposition import PCA

    if not tables:
        raise GenemapInputError("gene components: no counts tables to fit them on")
    widths = {np.shape(t)[1] for t in tables}
    if len(widths) != 1:
        raise GenemapInputError(f"gene components: tables hold different gene counts {sorted(widths)}")
    values = np.concatenate([log_expression(t) for t in tables])
    limit = min(values.shape) - 1
    if not 1 <= n_components <= limit:
        raise GenemapInputError(
            f"gene components: {n_components} asked; {len(values)} spots of {values.shape[1]} genes give 1 to {limit}"
        )
    axes = PCA(n_components=n_components, svd_solver="full").fit(values).components_
    flip = np.sign(axes[np.arange(len(axes)), np.abs(axes).argmax(1)])
    return (axes * flip[:, None]).astype(np.float32)
