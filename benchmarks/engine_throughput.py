"""Whole-slide prediction speed of the tile engine, and the naive crop approach on the same slide.

On one HER2ST section (default C3, 0.686 µm/px; the shipped checkpoint works at 2 µm/px, stride 4):
1. cold cache: time to the first finished tile (default 1024 px + 384 px halo), then every tissue
   tile; megapixels of H&E
   (slide pixels) per second, and the model's share of the wall time (the rest is reading, resampling,
   caching: the overhead);
2. warm cache: time to read one gene's whole level-0 map;
3. the naive crop approach at Visium density (55 µm spots on a 100 µm hexagonal grid over the tissue):
   one forward pass of the same encoder per spot-centred crop (128 px at 2 µm/px = 256 µm, batch 32),
   in spots per second, against PixNet's whole-slide map + the disk integral at those spots.
Run: ``.venv/bin/python benchmarks/engine_throughput.py [--section C3] [--tile 1024] [--halo 384] [--batch N]
[--backend auto] [--no-crop]``. The model's backend export (if any) is made before the clock starts.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from napari_genemap.infer.grid import DEFAULT_HALO, DEFAULT_TILE

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "her2st"


def visium_grid(mask: np.ndarray, mask_scale: float, slide_mpp: float) -> np.ndarray:
    """Centres (slide px) of a 100 µm hexagonal grid, kept where the tissue mask is set."""
    pitch = 100 / slide_mpp
    height, width = mask.shape[0] * mask_scale, mask.shape[1] * mask_scale
    rows = np.arange(pitch / 2, height, pitch * np.sqrt(3) / 2)
    centers = [(x + (i % 2) * pitch / 2, y) for i, y in enumerate(rows) for x in np.arange(pitch / 2, width, pitch)]
    centers = np.array(centers)
    rows = np.minimum((centers[:, 1] / mask_scale).astype(int), mask.shape[0] - 1)
    columns = np.minimum((centers[:, 0] / mask_scale).astype(int), mask.shape[1] - 1)
    keep = mask[rows, columns]
    return centers[keep]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--section", default="C3")
    parser.add_argument("--tile", type=int, default=DEFAULT_TILE)
    parser.add_argument("--halo", type=int, default=DEFAULT_HALO)
    parser.add_argument("--batch", type=int, default=None, help="default: the engine's (1 on CPU)")
    parser.add_argument("--backend", default="auto", help="torch, onnxruntime, openvino, openvino-bf16, auto")
    parser.add_argument("--no-crop", action="store_true", help="skip part 3, the crop approach")
    args = parser.parse_args()

    import torch

    from napari_genemap.checkpoints import shipped_checkpoint
    from napari_genemap.data.resample import ModelFrameReader
    from napari_genemap.infer.aggregate import GeneMapSource, aggregate_circles
    from napari_genemap.infer.engine import TileEngine
    from napari_genemap.io import read_slide, slide_mpp
    from napari_genemap.models.checkpoint import load_checkpoint
    from napari_genemap.models.crop import CropRegressor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sdata = read_slide(DATA, section=args.section)
    loaded = load_checkpoint(shipped_checkpoint())
    cache = Path(tempfile.mkdtemp(prefix="genemap-bench-"))
    try:
        started = time.perf_counter()
        engine = TileEngine(
            loaded, sdata, cache, tile=args.tile, halo=args.halo, batch_size=args.batch, backend=args.backend
        )
        tiles = [(r, c) for r in range(engine.grid.rows) for c in range(engine.grid.columns)]
        tissue = [t for t in tiles if engine.has_tissue(*t)]
        runner = engine.owner.ready()  # the backend's export or compile, before the clock for tiles starts
        setup = time.perf_counter() - started
        first_started = time.perf_counter()
        engine.ensure(0, tissue[:1])
        first = time.perf_counter() - first_started
        busy_before = engine.owner.busy_seconds
        rest_started = time.perf_counter()
        engine.ensure(0, tiles)
        rest = time.perf_counter() - rest_started
        model_share = (engine.owner.busy_seconds - busy_before) / rest
        slide_px = np.prod(sdata.images["he"]["scale0"]["image"].shape[1:])
        tissue_px = len(tissue) * (args.tile * engine.grid.factor) ** 2
        print(
            f"section {args.section}: {slide_px / 1e6:.1f} MPx ({slide_mpp(sdata):.3f} µm/px) -> model frame "
            f"{engine.grid.height} x {engine.grid.width} px at {loaded.mpp} µm/px; tiles {args.tile} px + halo "
            f"{args.halo} px, batch {engine.batch_size}, {torch.get_num_threads()} threads; {len(tissue)} of "
            f"{len(tiles)} tiles hold tissue (engine set-up {setup:.1f} s); backend {runner}"
        )
        print(f"cold cache: first {args.tile} px tile in {first:.2f} s")
        print(
            f"all tiles: {rest:.1f} s -> {slide_px / 1e6 / (rest + first):.2f} MPx/s of the whole slide, "
            f"{tissue_px / 1e6 / (rest + first):.2f} MPx/s of tissue tiles; model {100 * model_share:.0f}% "
            f"of the wall time, overhead {100 * (1 - model_share):.0f}%"
        )
        engine.close()

        warm = TileEngine(loaded, sdata, cache, tile=args.tile, halo=args.halo, backend=args.backend)
        height, width = warm.level_shape(0)
        read_started = time.perf_counter()
        gene = warm.genes[0]
        one_gene = warm.read(0, 0, height, 0, width, genes=0)
        read_seconds = time.perf_counter() - read_started
        print(
            f"warm cache: {gene}'s level-0 map ({one_gene.shape[0]} x {one_gene.shape[1]}) read in {read_seconds:.3f} s"
        )

        centers = visium_grid(warm.mask, warm.mask_scale, slide_mpp(sdata))
        radii = np.full(len(centers), 27.5 / slide_mpp(sdata))
        aggregate_started = time.perf_counter()
        aggregate_circles(GeneMapSource.from_engine(warm, slide_mpp(sdata)), centers, radii)
        aggregate_seconds = time.perf_counter() - aggregate_started
        pixnet_total = first + rest + aggregate_seconds
        print(
            f"Visium density: {len(centers)} spots on the tissue; PixNet map + disk integral "
            f"{pixnet_total:.1f} s = {len(centers) / pixnet_total:.0f} spots/s (integral alone "
            f"{len(centers) / aggregate_seconds:,.0f} spots/s)"
        )
        warm.close()
        if args.no_crop:
            return

        crop_model = CropRegressor(len(loaded.genes)).eval()

        reader = ModelFrameReader.from_sdata(sdata, loaded.mpp)
        sample = centers[: min(len(centers), 512)] / (loaded.mpp / slide_mpp(sdata))
        crop_started = time.perf_counter()
        with torch.inference_mode():
            for start in range(0, len(sample), 32):
                batch = [
                    reader.read(int(y) - 64, int(y) + 64, int(x) - 64, int(x) + 64)
                    for x, y in sample[start : start + 32]
                ]
                crop_model(torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).float() / 255)
        crop_seconds = time.perf_counter() - crop_started
        print(
            f"naive crops (128 px, one forward pass per spot, batch 32; {len(sample)} spots timed): "
            f"{len(sample) / crop_seconds:.0f} spots/s -> {len(centers) / (len(sample) / crop_seconds):.1f} s "
            "for the section"
        )
    finally:
        shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
