"""The co-expression gene graph of Diff-ST: genes that rise and fall together in the training counts share
what each map says about the other.

Edges come from the Pearson correlation of the genes' protocol values over the training spots: a pair
correlated at ``threshold`` or more is linked with its correlation as weight (negative correlations are not
edges; the released code used ratios of total counts, which link every pair with weights >= 1 and are not
co-expression). Every gene keeps a self-loop and the matrix is normalised symmetrically
(D^-1/2 A D^-1/2, as graph convolutions are), so one mixing step keeps a map's scale.
`GeneGraph` mixes the gene channels of a map by it, with a learned per-gene weight that starts at zero, so
training starts from the unmixed map.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..errors import GenemapInputError


def coexpression_graph(values: np.ndarray, threshold: float = 0.3) -> np.ndarray:
    """(spots, genes) protocol values -> the normalised adjacency (genes, genes), float32."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or values.shape[0] < 3:
        raise GenemapInputError(f"gene graph: values of shape {values.shape}; expected (spots >= 3, genes)")
    if not 0.0 < threshold <= 1.0:
        raise GenemapInputError(f"gene graph: threshold {threshold}; expected a correlation in (0, 1]")
    centred = values - values.mean(0)
    scale = np.sqrt((centred**2).sum(0))
    scale[scale == 0] = np.inf  # a constant gene correlates with nothing
    correlation = (centred / scale).T @ (centred / scale)
    adjacency = np.where(correlation >= threshold, correlation, 0.0)
    np.fill_diagonal(adjacency, 1.0)
    degree = adjacency.sum(1)
    return (adjacency / np.sqrt(np.outer(degree, degree))).astype(np.float32)


class GeneGraph(nn.Module):
    """x (B, genes, H, W) -> x + w * (A x), A the fixed adjacency, w a learned weight per gene (starts at 0)."""

    adjacency: torch.Tensor

    def __init__(self, adjacency: np.ndarray | torch.Tensor):
        super().__init__()
        adjacency = torch.as_tensor(np.asarray(adjacency, dtype=np.float32))
        if adjacency.ndim != 2 or adjacency.shape[0] != adjacency.shape[1]:
            raise GenemapInputError(f"gene graph: adjacency of shape {tuple(adjacency.shape)}; expected square")
        self.register_buffer("adjacency", adjacency)
        self.weight = nn.Parameter(torch.zeros(len(adjacency)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mixed = torch.einsum("gh,bhyx->bgyx", self.adjacency.to(x.dtype), x)
        return x + self.weight.reshape(1, -1, 1, 1).to(x.dtype) * mixed
