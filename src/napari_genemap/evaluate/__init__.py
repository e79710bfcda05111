"""Metrics with their protocol spelt out: per-gene Pearson, PCC@F/S/M, MSE, MAE."""

from .metrics import Evaluation, evaluate, pearson_per_gene, summarise_unit

__all__ = ["Evaluation", "evaluate", "pearson_per_gene", "summarise_unit"]
