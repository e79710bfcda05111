"""Diff-ST on a whole section: its histology features, its patches as model inputs, and the HR map stitched
from patch samples. Shared by training (validation) and `genemap superres`, so both see the same inputs.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from ..data.superres import Patches, SuperResPair, cut_patches
from .cell_features import cell_features, feature_map
from .diffst import Conditions, DiffST, super_resolve
from .diffst_checkpoint import Standardisation


def section_histology(
    sdata, pair: SuperResPair, pathology, tissue: float = 4.0, device="cpu"
) -> tuple[np.ndarray, float]:
    """Per-cell features (channels, H, W) of a canonical slide's grid from a loaded gene-map checkpoint
    (`checkpoint.GeneMapModel` of a PixNet), and the spot diameter they were averaged over (model px)."""
    from ..data.windows import slide_image_at
    from ..io import slide_mpp, spot_geometry

    scale = pathology.mpp / slide_mpp(sdata)  # slide pixels per model pixel
    _, radii = spot_geometry(sdata)
    diameter = float(2 * np.median(radii) / scale)
    model = pathology.model.to(device)
    features = feature_map(model, slide_image_at(sdata, pathology.mpp), device=device)
    return cell_features(features, model.stride, pair.centres / scale, diameter, tissue), diameter


class PatchBatch(NamedTuple):
    conditions: Conditions
    hr: torch.Tensor  # (B, genes, P, P) standardised, 0 where unmeasured
    hr_mask: torch.Tensor  # (B, P, P) bool


def patch_batch(patches: Patches, standardisation: Standardisation, device="cpu", histology: bool = True) -> PatchBatch:
    """Model inputs of cut patches: standardised maps (0 where nothing was measured) and masks."""
    lr_mask = patches.lr_spots > 0
    lr = np.where(lr_mask[:, None], standardisation.lr(patches.lr), 0)
    hr = np.where(patches.hr_mask[:, None], standardisation.hr(patches.hr, prior_of(patches, standardisation)), 0)
    features = None
    if histology and patches.histology is not None:
        features = torch.as_tensor(patches.histology, dtype=torch.float32, device=device)
    conditions = Conditions(
        torch.as_tensor(lr, dtype=torch.float32, device=device),
        torch.as_tensor(lr_mask, device=device),
        features,
    )
    return PatchBatch(
        conditions,
        torch.as_tensor(hr, dtype=torch.float32, device=device),
        torch.as_tensor(patches.hr_mask, device=device),
    )


def prior_of(patches: Patches, standardisation: Standardisation) -> np.ndarray:
    """The patches' HR prior (n, genes, S, S) in protocol values (`Standardisation.prior`)."""
    return standardisation.prior(patches.lr, patches.hr.shape[-1] // patches.lr.shape[-1])


class SectionMap(NamedTuple):
    mean: np.ndarray  # (genes, H, W) protocol values: the samples' mean on the pair's HR grid
    spread: np.ndarray  # (genes, H, W) their standard deviation, protocol scale


def super_resolve_section(
    model: DiffST,
    standardisation: Standardisation,
    pair: SuperResPair,
    *,
    samples: int = 8,
    steps: int = 20,
    seed: int = 0,
    batch: int = 8,
    device="cpu",
    progress=None,
) -> SectionMap:
    """The pair's HR map from its LR map (and histology), patch by patch on a block-aligned tiling of the
    grid (patches past the edge are padded and cropped back); ``progress(done, total)`` after each batch."""
    size = model.config.patch
    rows, cols = pair.shape
    origins = np.array([(r, c) for r in range(0, rows, size) for c in range(0, cols, size)], dtype=np.int64)
    mean = np.zeros((len(pair.genes), rows + size, cols + size), dtype=np.float32)
    spread = np.zeros_like(mean)
    scale = standardisation.hr_std[:, None, None]
    for start in range(0, len(origins), batch):
        part = origins[start : start + batch]
        patches = cut_patches(pair, part, size)
        inputs = patch_batch(patches, standardisation, device, model.config.uses_histology)
        drawn = super_resolve(model, inputs.conditions, samples=samples, steps=steps, seed=seed + start)
        means = standardisation.unscale(drawn.mean.float().cpu().numpy(), prior_of(patches, standardisation))
        spreads = drawn.spread.float().cpu().numpy() * scale
        for (row, col), m, s in zip(part, means, spreads, strict=True):
            mean[:, row : row + size, col : col + size] = m
            spread[:, row : row + size, col : col + size] = s
        if progress is not None:
            progress(min(start + batch, len(origins)), len(origins))
    return SectionMap(mean[:, :rows, :cols], spread[:, :rows, :cols])
