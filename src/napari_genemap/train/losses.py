"""The spot loss: protocol-normalised MSE + 0.5 x (1 - per-gene batch Pearson) + a small raw-scale term.

The raw-scale term (`RawTerm`) is a config switch (``raw_loss``): log1p MSE (the default), or the negative
log-likelihood of the measured counts under a Poisson or a negative binomial with a learned per-gene
dispersion (issue 13's count-likelihood ablation).
"""

from __future__ import annotations

import torch
from torch import nn

from ..data.protocols import Protocol
from ..errors import GenemapInputError
from .config import RAW_TERMS


def batch_pearson(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over genes of the Pearson correlation across the batch's spots (genes constant in the target
    or the prediction are left out; 0 when none is defined)."""
    prediction = prediction - prediction.mean(0, keepdim=True)
    target = target - target.mean(0, keepdim=True)
    covariance = (prediction * target).sum(0)
    norms = prediction.norm(dim=0) * target.norm(dim=0)
    defined = norms > 1e-8
    if not bool(defined.any()):
        return prediction.sum() * 0
    return (covariance[defined] / norms[defined]).mean()


class RawTerm(nn.Module):
    """How far the predicted counts of each spot and gene are from the measured ones, on the raw scale.

    Why a raw-scale term at all: protocols that rescale each spot to a fixed total (``hist2st``: 1e4) are
    blind to the map's overall scale, so without it the density's absolute level drifts and the integral
    over a circle of another size means nothing.

    - ``log1p``: mean of (log1p(predicted) - log1p(measured))^2; pins the scale while barely pulling on the
      profile the protocol loss shapes.
    - ``poisson`` / ``nb``: the counts' negative log-likelihood minus its value at a perfect prediction (the
      half deviance, 0 when predicted = measured; for ``nb`` that value is a constant to the learned
      dispersion, which is so fitted by the full likelihood), divided by the batch's mean count + 1. The
      likelihoods weight a spot's error by its counts, so undivided their size grows with sequencing depth;
      divided, they are on the log1p term's scale and ``raw_weight`` keeps its meaning.

    ``nb`` holds one parameter per gene, log θ (variance μ + μ²/θ), started at θ = 10: it trains with the model
    and is not saved with it (prediction needs only the mean).
    """

    def __init__(self, kind: str = "log1p", n_genes: int = 1):
        super().__init__()
        if kind not in RAW_TERMS:
            raise GenemapInputError(f"raw_loss {kind!r}: expected one of {', '.join(RAW_TERMS)}")
        self.kind = kind
        self.log_dispersion = nn.Parameter(torch.full((n_genes,), 10.0).log()) if kind == "nb" else None

    def forward(self, predicted: torch.Tensor, measured: torch.Tensor) -> torch.Tensor:
        if self.kind == "log1p":
            return torch.mean((torch.log1p(predicted) - torch.log1p(measured)) ** 2)
        mean = predicted.clamp(min=1e-6)
        if self.log_dispersion is None:  # Poisson
            nll = mean - measured * torch.log(mean)
            best = measured - torch.xlogy(measured, measured)
        else:
            theta = self.log_dispersion.exp()
            nll = _nb_nll(measured, mean, theta)
            # θ detached here: its gradient is the full likelihood's (the deviance's would fit another θ)
            best = _nb_nll(measured, measured.clamp(min=1e-6), theta.detach())
        return torch.mean(nll - best) / (measured.mean().detach() + 1)


def _nb_nll(counts: torch.Tensor, mean: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """-log NB(counts | mean, theta), elementwise (theta broadcasts over the genes, the last axis)."""
    log_total = torch.log(theta + mean)
    return -(
        torch.lgamma(counts + theta)
        - torch.lgamma(theta)
        - torch.lgamma(counts + 1)
        + theta * (torch.log(theta) - log_total)
        + counts * (torch.log(mean) - log_total)
    )


def spot_loss(
    predicted_raw: torch.Tensor,
    measured_raw: torch.Tensor,
    target: torch.Tensor,
    protocol: Protocol,
    raw_weight: float = 0.1,
    raw_term: RawTerm | None = None,
) -> dict[str, torch.Tensor]:
    """Loss between aggregated predictions (spots, genes) on the raw scale and the measured spots;
    ``raw_term`` defaults to log1p MSE."""
    normalised = protocol.normalise(predicted_raw)
    mse = torch.mean((normalised - target) ** 2)
    pearson = batch_pearson(normalised, target) if len(target) > 1 else normalised.sum() * 0
    raw = (raw_term or RawTerm())(predicted_raw, measured_raw)
    total = mse + 0.5 * (1 - pearson) + raw_weight * raw
    return {"loss": total, "mse": mse, "pearson": pearson, "raw": raw}
