"""The Pearson of one gene between its predicted map and the measured spots in view.

What the Gene maps panel reports while the user pans: which measured spots lie in the view (as circles the
tile service integrates the map over), then, once those integrals come back, the correlation over the
spots already predicted ("k of n"), on the model's protocol scale, with a note on whether the slide was
part of the model's training data (fit, not generalisation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .metrics import pearson_per_gene

if TYPE_CHECKING:
    import anndata as ad
    import geopandas as gpd

    from ..data.protocols import Protocol

#: Fewer spots than this give no Pearson worth showing.
MIN_SPOTS = 3


def spots_in_view(centres: np.ndarray, diameters: np.ndarray, names, low, high) -> gpd.GeoDataFrame:
    """The spots whose centres (y, x rows, slide pixels) lie in the view ``low``..``high`` (y, x, inclusive),
    as circles (geometry x, y and a ``radius``) indexed by spot name: the shapes the service aggregates."""
    import geopandas as gpd
    import shapely

    centres = np.asarray(centres, float).reshape(-1, 2)
    inside = np.all((centres >= np.asarray(low, float)) & (centres <= np.asarray(high, float)), axis=1)
    return gpd.GeoDataFrame(
        {"radius": np.asarray(diameters, float)[inside] / 2},
        geometry=shapely.points(centres[inside][:, ::-1]),
        index=[str(name) for name in np.asarray(names)[inside]],
    )


@dataclass(frozen=True)
class InViewPearson:
    """Pearson ``r`` of ``gene`` over the ``k`` predicted of the ``n`` measured spots in view; ``r`` is None
    while fewer than `MIN_SPOTS` are predicted or where either side is constant."""

    gene: str
    r: float | None
    k: int
    n: int
    protocol: str = ""

    def describe(self, training_section: str | None) -> str:
        """One line for the panel; ``training_section``: the training section this slide is, if any."""
        if self.n < MIN_SPOTS:
            return f"{self.gene}: {self.n} measured spots in view; Pearson needs at least {MIN_SPOTS}"
        if self.k < MIN_SPOTS:
            return f"{self.gene}: waiting for the spots' tiles ({self.k} of {self.n} spots in view predicted)"
        if self.r is None:
            return f"{self.gene}: constant over the {self.k} spots; Pearson undefined"
        rest = "" if self.k == self.n else " (the rest are not predicted yet)"
        seen = (
            f"This slide ({training_section}) was in the model's training data: this shows fit, not generalisation."
            if training_section
            else "This slide is not among the model's recorded training slides."
        )
        return (
            f"{self.gene}: Pearson {self.r:.3f} over {self.k} of {self.n} measured spots in view{rest} "
            f"(protocol {self.protocol}, spot integrals of the map). {seen}"
        )


def in_view_pearson(
    gene: str, predicted: ad.AnnData | None, counts: ad.AnnData, protocol: Protocol, n: int
) -> InViewPearson:
    """Correlate the map's spot integrals ``predicted`` (rows named by spot; None when none came back) with
    the measured ``counts`` of the same spots, normalised by ``protocol``; ``n``: spots in view."""
    k = 0 if predicted is None else predicted.n_obs
    if predicted is None or n < MIN_SPOTS or k < MIN_SPOTS:
        return InViewPearson(gene, None, k, n, protocol.name)
    measured = protocol.transform(counts[list(predicted.obs_names)])[:, protocol.genes.index(gene)]
    prediction = np.asarray(predicted[:, gene].X, dtype=np.float64).reshape(-1, 1)
    r = float(pearson_per_gene(prediction, measured.reshape(-1, 1))[0])
    return InViewPearson(gene, None if np.isnan(r) else r, k, n, protocol.name)
