"""The spot loss: protocol-normalised MSE + 0.5 x (1 - per-gene batch Pearson) + a small raw-scale term."""

from __future__ import annotations

import torch

from ..data.protocols import Protocol


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


def spot_loss(
    predicted_raw: torch.Tensor,
    measured_raw: torch.Tensor,
    target: torch.Tensor,
    protocol: Protocol,
    raw_weight: float = 0.1,
) -> dict[str, torch.Tensor]:
    """Loss between aggregated predictions (spots, genes) on the raw scale and the measured spots.

    Why the raw-scale term: protocols that rescale each spot to a fixed total (``hist2st``: 1e4) are
    blind to the map's overall scale, so without it the density's absolute level drifts and the integral
    over a circle of another size means nothing. log1p(predicted) against log1p(measured counts) pins the
    density to counts per pixel while barely pulling on the profile the protocol loss shapes.
    """
    normalised = protocol.normalise(predicted_raw)
    mse = torch.mean((normalised - target) ** 2)
    pearson = batch_pearson(normalised, target) if len(target) > 1 else normalised.sum() * 0
    raw = torch.mean((torch.log1p(predicted_raw) - torch.log1p(measured_raw)) ** 2)
    total = mse + 0.5 * (1 - pearson) + raw_weight * raw
    return {"loss": total, "mse": mse, "pearson": pearson, "raw": raw}
