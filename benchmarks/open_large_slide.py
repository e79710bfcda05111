"""How long opening a slide larger than memory takes, and what it costs in memory.

Builds a tiled, JPEG-compressed pyramidal OME-TIFF of SIZE x SIZE px by repeating real H&E tiles from the
shared HER2ST data (default 100,000 px: 30 GB of RGB, more than this machine's memory), then, in a fresh
process, times ``napari_genemap.io.read_slide`` and the read of one 1024 x 1024 region at full resolution
and prints the peak resident memory. Run: ``.venv/bin/python benchmarks/open_large_slide.py [--size N]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
HER2ST = ROOT.parent / "shared" / "data" / "her2st"
TILE = 512


def source_tiles() -> list[np.ndarray]:
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None
    with Image.open(HER2ST / "images" / "C3.jpg") as image:
        pixels = np.asarray(image.convert("RGB"))
    return [pixels[y : y + TILE, x : x + TILE] for y in range(3000, 7000, TILE) for x in range(2000, 6000, TILE)]


def write_slide(path: Path, size: int) -> None:
    import tifffile

    tiles = source_tiles()
    levels = []
    while not levels or levels[-1] > 2048:
        levels.append(size // 2 ** len(levels))

    def tile_iterator(level_size: int):
        # coarser levels repeat the same real tiles: only their existence matters for opening
        tiles_per_side = -(-level_size // TILE)
        for index in range(tiles_per_side**2):
            yield tiles[index % len(tiles)]

    options = {"tile": (TILE, TILE), "photometric": "rgb", "compression": "jpeg", "dtype": np.uint8}
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tif:
        tif.write(
            tile_iterator(levels[0]),
            shape=(levels[0], levels[0], 3),
            subifds=len(levels) - 1,
            metadata={"axes": "YXS", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5},
            **options,
        )
        for level in levels[1:]:
            tif.write(tile_iterator(level), shape=(level, level, 3), subfiletype=1, **options)


def ensure_slide(path: Path, size: int) -> None:
    """Write the synthetic slide unless it is already there (it takes minutes)."""
    if not path.exists():
        started = time.perf_counter()
        write_slide(path, size)
        print(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - started:.0f} s")


MEASURE = """
import json, sys, time
import psutil
process = psutil.Process()
start = time.perf_counter()
from napari_genemap.io import read_slide, image_levels
imported, imported_mb = time.perf_counter(), process.memory_info().rss / 2**20
sdata = read_slide(sys.argv[1])
opened, opened_mb = time.perf_counter(), process.memory_info().rss / 2**20
levels, _ = image_levels(sdata)
region = levels[0][:, 40000:41024, 40000:41024].compute()
read, read_mb = time.perf_counter(), process.memory_info().rss / 2**20
print(json.dumps({"import_s": imported - start, "open_s": opened - imported, "region_s": read - opened,
                  "levels": [list(level.shape) for level in levels], "imported_mb": imported_mb,
                  "opened_mb": opened_mb, "read_mb": read_mb}))
"""
# (ru_maxrss is not used: on Linux it survives exec, so a child would report this writer's peak)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=100_000)
    parser.add_argument("--path", type=Path, default=Path("/tmp/genemap_large_slide.ome.tif"))
    args = parser.parse_args()
    ensure_slide(args.path, args.size)
    result = json.loads(
        subprocess.run(
            [sys.executable, "-c", MEASURE, str(args.path)], capture_output=True, text=True, check=True
        ).stdout
    )
    size = result["levels"][0][1]
    print(f"slide {size} x {size} px RGB ({3 * size * size / 1e9:.1f} GB decoded), {len(result['levels'])} levels")
    print(f"import napari_genemap.io: {result['import_s']:.2f} s")
    print(f"read_slide (open):        {result['open_s']:.3f} s")
    print(f"read 1024 x 1024 region:  {result['region_s']:.3f} s")
    print(
        f"resident memory:          {result['imported_mb']:.0f} MB after imports, "
        f"+{result['opened_mb'] - result['imported_mb']:.0f} MB to open, "
        f"+{result['read_mb'] - result['opened_mb']:.0f} MB after reading the region"
    )


if __name__ == "__main__":
    main()
