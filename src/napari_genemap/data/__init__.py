"""Gene selection and normalisation protocols, resampling to a model's µm/px, and training windows with
the spots inside them."""

from .protocols import Protocol, get_protocol, hest, hist2st, hist2st_genes, triplex

__all__ = ["Protocol", "get_protocol", "hest", "hist2st", "hist2st_genes", "triplex"]
