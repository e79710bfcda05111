"""Baselines run in the same harness as PixNet: a fine-tuned crop regressor and ridge on frozen features.

Both see spot-centred crops at the same µm/px as PixNet, of side ``crop`` px (default 128 px = 256 µm at
2 µm/px: the 100 µm spot and some context), and predict protocol values directly.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..data.protocols import Protocol
from ..data.windows import TrainingSlide, spot_crops
from ..evaluate.metrics import summarise_unit
from ..models.crop import CropRegressor, pooled_features
from ..models.encoders import Encoder, EncoderConfig
from ..models.predict import to_input
from .losses import batch_pearson
from .sampler import random_dihedral, stain_jitter
from .schedule import warmup_cosine


def _inputs(crops: np.ndarray) -> np.ndarray:
    """uint8 crops (n, S, S, 3) -> (n, 3, S, S) float32 in [0, 1], contiguous."""
    return np.ascontiguousarray(to_input(crops).numpy())


def train_crop_regressor(
    slides: list[TrainingSlide],
    protocol: Protocol,
    *,
    size: int = 128,
    steps: int = 300,
    batch: int = 32,
    lr: float = 5e-4,
    encoder: EncoderConfig | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    validation: Sequence[TrainingSlide] = (),
    eval_every: int = 100,
    cancel: Callable[[], bool] | None = None,
) -> CropRegressor:
    """Fine-tune encoder + linear head on spot-centred crops with MSE + 0.5 x (1 - batch Pearson).

    With ``validation`` slides, the returned weights are those with the best mean validation Pearson
    (checked every ``eval_every`` steps), as for PixNet."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    crops = _inputs(np.concatenate([spot_crops(s, size) for s in slides]))
    targets = torch.from_numpy(np.concatenate([s.targets for s in slides]))
    model = CropRegressor(protocol.n_genes, encoder).to(device)
    with torch.no_grad():
        linear = model.head[1]
        assert isinstance(linear, nn.Linear)  # CropRegressor's head: dropout, then the linear layer
        linear.bias.copy_(targets.mean(0))
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = warmup_cosine(optimiser, steps)
    best, best_state = -np.inf, None
    for step in range(1, steps + 1):
        if cancel is not None and cancel():
            break
        model.train()
        index = rng.choice(len(crops), size=min(batch, len(crops)), replace=False)
        pixels = np.stack([stain_jitter(c, rng) for c in random_dihedral(crops[index], rng)])
        prediction = model(torch.from_numpy(pixels).to(device))
        target = targets[index].to(device)
        loss = torch.mean((prediction - target) ** 2) + 0.5 * (1 - batch_pearson(prediction, target))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        if validation and (step % eval_every == 0 or step == steps):
            score = np.nanmean(
                [summarise_unit(predict_crop_regressor(model, s, size), s.targets)["PCC@M"] for s in validation]
            )
            if score > best:
                best, best_state = score, copy.deepcopy(model.state_dict())
    if best_state is not None:
        model.load_state_dict(best_state)
    return model.eval()


@torch.inference_mode()
def predict_crop_regressor(model: CropRegressor, slide: TrainingSlide, size: int = 128, batch: int = 64) -> np.ndarray:
    device = next(model.parameters()).device
    crops = _inputs(spot_crops(slide, size))
    parts = [model(torch.from_numpy(crops[i : i + batch]).to(device)).cpu() for i in range(0, len(crops), batch)]
    return torch.cat(parts).numpy().astype(np.float64)


class RidgeBaseline:
    """Ridge regression on frozen pooled encoder features (HEST-Benchmark style), alpha chosen by CV."""

    alphas = np.logspace(-1, 5, 13)

    def __init__(self, encoder: EncoderConfig | None = None, size: int = 128, device: str | torch.device = "cpu"):
        self.encoder = Encoder(encoder or EncoderConfig()).to(device)
        self.size = size
        self.device = device

    def features(self, slide: TrainingSlide, batch: int = 64) -> np.ndarray:
        crops = _inputs(spot_crops(slide, self.size))
        parts = [
            pooled_features(self.encoder, torch.from_numpy(crops[i : i + batch]).to(self.device)).cpu()
            for i in range(0, len(crops), batch)
        ]
        return torch.cat(parts).numpy().astype(np.float64)

    def fit(self, slides: list[TrainingSlide]) -> RidgeBaseline:
        from sklearn.linear_model import RidgeCV
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        features = np.concatenate([self.features(s) for s in slides])
        targets = np.concatenate([s.targets for s in slides]).astype(np.float64)
        self.model = make_pipeline(StandardScaler(), RidgeCV(alphas=self.alphas)).fit(features, targets)
        return self

    def predict(self, slide: TrainingSlide) -> np.ndarray:
        return self.model.predict(self.features(slide))


def timed(function: Callable, *args, **kwargs):
    """(result, seconds) of one call."""
    started = time.perf_counter()
    return function(*args, **kwargs), time.perf_counter() - started
