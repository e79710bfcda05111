"""The Spots panel's bar plot: one ROI's top genes, or the largest log2 fold changes between two."""

from __future__ import annotations

import numpy as np

from ..errors import GenemapInputError
from ..explore.rois import fold_changes, top_genes
from ..explore.roiset import RoiSet

TOP_GENES = 15  # bars in the plot


def draw_roi_plot(figure, roiset: RoiSet, names: list[str]) -> None:
    """Draw on a matplotlib ``figure`` what the selected ROIs ``names`` call for (a note otherwise)."""
    figure.clear()
    axes = figure.add_subplot()
    note = None
    if not names:
        note = "select an ROI for its top genes, two to compare them"
    elif len(names) > 2:
        note = "select one ROI (top genes) or two (fold change)"
    else:
        try:
            table = roiset.expression(names)
        except GenemapInputError:
            note = "computing…"
    if note is not None:
        axes.text(0.5, 0.5, note, ha="center", va="center", transform=axes.transAxes, fontsize=9)
        axes.set_axis_off()
    elif len(names) == 1:
        series = top_genes(table, names[0], TOP_GENES)
        axes.barh(series.index[::-1], series.to_numpy()[::-1], color="tab:blue")
        axes.set_title(f"{names[0]}: top genes", fontsize=9)
        axes.set_xlabel(roiset.value_label(), fontsize=8)
    else:
        series = fold_changes(table, names[0], names[1], TOP_GENES)
        colours = np.where(series.to_numpy() > 0, "tab:red", "tab:blue")[::-1]
        axes.barh(series.index[::-1], series.to_numpy()[::-1], color=colours)
        axes.axvline(0, color="grey", linewidth=0.8)
        axes.set_title(f"log2 fold change {names[0]} / {names[1]}", fontsize=9)
        axes.set_xlabel("log2 fold change (pseudocount 1 on the protocol's scale)", fontsize=8)
    axes.tick_params(labelsize=7)
