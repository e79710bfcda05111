"""How much context (halo) tiles need to match one large window, with the shipped model on real H&E.

For each halo, a 2 x 2 block of 512 px tiles in the tissue of a HER2ST section is predicted tile by tile
(each tile's window = tile + halo on every side) and as one window holding all four with the largest halo;
the table gives max |tiles - window| / max |window| over the block and the 99.9th percentile of the
element-wise relative difference. Run: ``.venv/bin/python benchmarks/seams.py [--section C3]``.
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "her2st"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--section", default="C3")
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--halos", type=int, nargs="*", default=[64, 128, 192, 256, 384])
    args = parser.parse_args()

    import torch

    from napari_genemap.checkpoints import shipped_checkpoint
    from napari_genemap.infer.engine import TileEngine
    from napari_genemap.io import read_slide
    from napari_genemap.models.checkpoint import load_checkpoint

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sdata = read_slide(DATA, section=args.section)
    loaded = load_checkpoint(shipped_checkpoint())
    tile, widest = args.tile, max(args.halos)
    probe = TileEngine(loaded, sdata, tempfile.mkdtemp(), tile=tile, halo=widest)
    # the 2 x 2 block nearest the slide's centre whose four tiles all hold tissue
    rows, columns = probe.grid.rows, probe.grid.columns
    candidates = [
        (r, c) for r in range(rows - 1) for c in range(columns - 1)
        if all(probe.has_tissue(r + dr, c + dc) for dr in (0, 1) for dc in (0, 1))
    ]  # fmt: skip
    row, column = min(candidates, key=lambda t: (t[0] - rows / 2) ** 2 + (t[1] - columns / 2) ** 2)
    y0, x0 = row * tile, column * tile
    window = probe.reader.read(y0 - widest, y0 + 2 * tile + widest, x0 - widest, x0 + 2 * tile + widest)
    with torch.inference_mode():
        whole = loaded.model(torch.from_numpy(window).permute(2, 0, 1)[None].float() / 255)[0].numpy()
    start = widest // loaded.stride
    whole = whole[:, start : start + 2 * tile // loaded.stride, start : start + 2 * tile // loaded.stride]
    probe.close()
    print(
        f"section {args.section}, tiles ({row}, {column})..({row + 1}, {column + 1}) of {tile} px at {loaded.mpp} µm/px"
    )
    print("| halo (model px) | halo (µm) | max abs diff / max value | 99.9% element-wise relative diff |")
    print("|---|---|---|---|")
    for halo in args.halos:
        engine = TileEngine(loaded, sdata, tempfile.mkdtemp(), tile=tile, halo=halo)
        values = engine.predict_tiles([(row, column), (row, column + 1), (row + 1, column), (row + 1, column + 1)])
        engine.close()
        block = np.block(
            [
                [values[(row, column)], values[(row, column + 1)]],
                [values[(row + 1, column)], values[(row + 1, column + 1)]],
            ]
        )
        difference = np.abs(block - whole)
        relative = difference / np.maximum(np.abs(whole), 1e-12)
        print(
            f"| {halo} | {halo * loaded.mpp:.0f} | {difference.max() / np.abs(whole).max():.2e} | "
            f"{np.quantile(relative, 0.999):.2e} |"
        )


if __name__ == "__main__":
    main()
