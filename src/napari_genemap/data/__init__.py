"""Gene selection and normalisation protocols (and, later, training samples)."""

from .protocols import Protocol, get_protocol, hest, hist2st, hist2st_genes, triplex

__all__ = ["Protocol", "get_protocol", "hest", "hist2st", "hist2st_genes", "triplex"]
