"""The genes a gene-map panel offers: a model's genes, most variable first, found by name.

Qt-free, so the order, the search and the notes that explain a miss or a model switch are tested without a
viewer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    import anndata as ad


def gene_order(card: dict, counts: ad.AnnData | None = None) -> list[str]:
    """A checkpoint's genes (``card``: its config), most variable first: by the training variance it
    records, else by the slide's measured ``counts`` (log-normalised), else as the checkpoint lists them."""
    genes = list(card["genes"])
    variance = card.get("gene_variance")
    if variance is None and counts is not None:
        measured = log_normalised(counts).var(0)
        variance = [float(measured.get(gene, -1.0)) for gene in genes]
    if variance is None:
        return genes
    order = np.argsort(-np.nan_to_num(np.asarray(variance, float), nan=-1.0), kind="stable")
    return [genes[i] for i in order]


def search_genes(genes: Sequence[str], text: str) -> list[str]:
    """The genes matching ``text`` (any case): the exact match first, then those it starts, then the rest
    that contain it; all genes for an empty search."""
    query = text.strip().upper()
    if not query:
        return list(genes)
    exact = [g for g in genes if g.upper() == query]
    prefix = [g for g in genes if g.upper().startswith(query) and g.upper() != query]
    inner = [g for g in genes if query in g.upper() and not g.upper().startswith(query)]
    return exact + prefix + inner


def no_match_note(text: str, n_genes: int, measured: Sequence[str] = ()) -> str:
    """Why a search found nothing; names up to five ``measured`` genes (the slide's) that match, since a
    gene the slide measures but the model does not predict is the usual surprise."""
    text = text.strip()
    note = f"{text} is not among this model's {n_genes} genes"
    hits = [g for g in measured if text.upper() in g.upper()]
    if hits:
        return f"{note}; this slide measures {', '.join(hits[:5])} (not predicted by this model)"
    return note


def model_ready_note(model: str, n_genes: int, rebuilt: Sequence[str], dropped: Sequence[str]) -> str:
    """What changed when a model became ready: the maps now drawn by it and those it cannot draw."""
    note = f"model ready ({model}, {n_genes} genes): add a gene map"
    if rebuilt:
        note = f"model ready: {', '.join(rebuilt)} now from {model}"
    if dropped:
        note += f"; removed {', '.join(dropped)} (not among this model's genes)"
    return note


def log_normalised(table) -> pd.DataFrame:
    """Counts scaled to 1e4 per spot, then natural log1p: the usual scale for looking at one gene."""
    counts = table.X.toarray() if hasattr(table.X, "toarray") else np.asarray(table.X)
    totals = counts.sum(1, keepdims=True)
    values = np.log1p(counts * (1e4 / np.where(totals == 0, 1, totals)))
    return pd.DataFrame(values, columns=table.var_names.astype(str), index=table.obs_names.astype(str))
