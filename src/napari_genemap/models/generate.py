"""Draw H&E tiles from a DiffBulk stage-1 model for an expression profile: ``genemap generate`` and the
training run's preview grids.

A grid's top row holds images drawn for the profile (Heun sampling with classifier-free guidance), its
bottom row images drawn unconditioned from the *same* noise, so the two rows differ only by the condition.
With a measured spot, the spot's own tile (through the latent space) comes first in the top row.
The profile is on the checkpoint's protocol scale (what stage 1 was conditioned on); `spot_profile` makes it
from a slide's spot the way training made its pairs (the counts of the spots inside the tile, normalised).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import GenemapInputError

GAP = 4  # white pixels between tiles


def tile_grid(top: Sequence[np.ndarray], bottom: Sequence[np.ndarray], offset: int = 0) -> np.ndarray:
    """Two rows of (S, S, 3) uint8 tiles on white; the bottom row starts ``offset`` tiles to the right."""
    tiles = [*top, *bottom]
    if not tiles:
        raise ValueError("tile_grid: no tiles")
    side = tiles[0].shape[0]
    columns = max(len(top), offset + len(bottom))
    grid = np.full((2 * side + GAP, columns * side + (columns - 1) * GAP, 3), 255, np.uint8)
    for row, images, start in ((0, top, 0), (1, bottom, offset)):
        for column, image in enumerate(images, start=start):
            y, x = row * (side + GAP), column * (side + GAP)
            grid[y : y + side, x : x + side] = image
    return grid


def draw(
    model,
    decode,
    condition,
    n: int,
    *,
    steps: int,
    guidance: float | None,
    seed: int,
    device,
) -> tuple[np.ndarray, np.ndarray]:
    """(conditioned, unconditioned) tiles, each (n, S, S, 3) uint8, from the same seeded noise; ``decode``
    maps stored tiles to RGB in [0, 1] (TAEF2's decoder, or a clamp in pixel space)."""
    import torch

    config = model.edm_config
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((n, config.in_channels, config.sample_size, config.sample_size), generator=generator)
    noise = noise.to(device)
    model.eval()
    with torch.no_grad():
        drawn = model.generate(noise, condition.expand(n, -1), steps=steps, guidance=guidance or None)
        free = model.generate(noise, None, steps=steps)
        rgb = decode(torch.cat([drawn, free]))
    tiles = (rgb.permute(0, 2, 3, 1).float().cpu().numpy() * 255).round().astype(np.uint8)
    return tiles[:n], tiles[n:]


def to_rgb(stored, decode) -> np.ndarray:
    """Stored tiles (B, C, h, w) tensor -> (B, S, S, 3) uint8 through ``decode``."""
    import torch

    with torch.no_grad():
        rgb = decode(stored)
    return (rgb.permute(0, 2, 3, 1).float().cpu().numpy() * 255).round().astype(np.uint8)


def decoder_for(model, taef2_folder: str | os.PathLike | None, device):
    """What turns the model's stored tiles into RGB: TAEF2's decoder in its latent space, else a clamp."""
    if model.latent.space == "pixel":
        return lambda stored: stored.clamp(0, 1)
    from ..models.taef2 import TAEF2

    if not taef2_folder or not Path(taef2_folder).is_dir():
        raise GenemapInputError(
            f"this stage 1 draws TAEF2 latents: give the folder with TAEF2's weights (got {taef2_folder!r})"
        )
    taef2 = TAEF2.from_folder(taef2_folder).to(device)
    return taef2.decode


def read_profile(path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """A CSV with columns ``gene`` and ``value`` (protocol scale) -> (genes, values); one-line errors."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise GenemapInputError(f"{path}: no such profile file")
    try:
        table = pd.read_csv(path)
    except (ValueError, UnicodeDecodeError) as error:
        raise GenemapInputError(f"{path}: not a readable CSV ({error})") from None
    missing = [c for c in ("gene", "value") if c not in table.columns]
    if missing:
        raise GenemapInputError(f"{path}: column {missing[0]!r} is missing; expected columns 'gene' and 'value'")
    values = pd.to_numeric(table["value"], errors="coerce").to_numpy(np.float64)
    bad = np.flatnonzero(~np.isfinite(values))
    if len(bad):
        raise GenemapInputError(
            f"{path}: line {bad[0] + 2}: value {table['value'].iloc[bad[0]]!r} is not a finite number"
        )
    genes = [str(g) for g in table["gene"]]
    if len(set(genes)) != len(genes):
        raise GenemapInputError(f"{path}: gene {next(g for g in genes if genes.count(g) > 1)!r} is listed twice")
    return genes, values


def spot_profile(
    slide: str | os.PathLike, spot: str, tile_um: float, protocol_data: dict, tile_px: int, section: str | None = None
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """A measured spot's tile as stage 1 trained on it: (genes, protocol values, the tile's H&E (S, S, 3))."""
    from ..data.protocols import Protocol
    from ..data.pseudobulk import normalise_tiles, read_tiles, spot_tiles
    from ..io import read_slide

    if not protocol_data:
        raise GenemapInputError("this stage-1 checkpoint records no protocol; give the profile with --profile")
    protocol = Protocol.from_dict(protocol_data)
    sdata = read_slide(slide, section=section)
    tiles = spot_tiles(sdata, tile_um)
    chosen = np.flatnonzero(tiles.obs["spot"].astype(str).to_numpy() == spot)
    if not len(chosen):
        examples = ", ".join(tiles.obs["spot"].astype(str)[:3])
        raise GenemapInputError(f"{slide}: no spot {spot!r} (spots are named like {examples})")
    tile = tiles[chosen[:1]].copy()
    values = normalise_tiles(tile, protocol).layers["protocol"][0]
    image = read_tiles(sdata, tile, tile_um / tile_px)[0]
    return list(protocol.genes), np.asarray(values, np.float64), image
