"""Memory of whole-slide prediction on a synthetic slide larger than memory.

Builds (once) a 50,000 x 50,000 px JPEG-tiled pyramidal OME-TIFF from real HER2ST tiles (see
``open_large_slide.py``; labelled 0.5 µm/px), then, each in a fresh process, measures: opening it; and
predicting (shipped checkpoint, cold cache) a 5,000 px and a 20,000 px square region of it at full
resolution, with the peak resident memory sampled every 20 ms. Memory must not grow with the area.
Run: ``.venv/bin/python benchmarks/engine_memory.py [--size 50000]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from open_large_slide import ensure_slide  # noqa: E402  (a sibling benchmark script)

MEASURE = """
import json, sys, tempfile, threading, time
import psutil
process = psutil.Process()
peak = [process.memory_info().rss]
stop = threading.Event()
def sample():
    while not stop.wait(0.02):
        peak[0] = max(peak[0], process.memory_info().rss)
threading.Thread(target=sample, daemon=True).start()
start = time.perf_counter()
from napari_genemap.io import read_slide
imported_mb = process.memory_info().rss / 2**20
sdata = read_slide(sys.argv[1])
opened_s, opened_mb = time.perf_counter() - start, process.memory_info().rss / 2**20
result = {"open_s": opened_s, "imported_mb": imported_mb, "opened_mb": opened_mb}
side = int(sys.argv[2])
if side:
    from napari_genemap.checkpoints import shipped_checkpoint
    from napari_genemap.infer.engine import TileEngine
    from napari_genemap.models.checkpoint import load_checkpoint
    engine = TileEngine(load_checkpoint(shipped_checkpoint()), sdata, tempfile.mkdtemp())
    pixel = engine.grid.map_pixel_size(0)
    i0 = j0 = int(10000 / pixel)  # the region starts 10,000 slide px into the slide
    tiles = engine.grid_tiles(0, i0, i0 + int(side / pixel), j0, j0 + int(side / pixel))
    begun = time.perf_counter()
    engine.ensure(0, tiles)
    result |= {"tiles": len(tiles), "predict_s": time.perf_counter() - begun, "predicted": engine.stats["predicted"]}
    engine.close()
stop.set()
result["peak_mb"] = peak[0] / 2**20
print(json.dumps(result))
"""


def measure(path: Path, side: int) -> dict:
    output = subprocess.run([sys.executable, "-c", MEASURE, str(path), str(side)], capture_output=True, text=True)
    if output.returncode:
        raise SystemExit(output.stderr)
    return json.loads(output.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=50_000)
    parser.add_argument("--path", type=Path, default=Path("/tmp/genemap_50k_slide.ome.tif"))
    args = parser.parse_args()
    ensure_slide(args.path, args.size)
    opened = measure(args.path, 0)
    grown = opened["opened_mb"] - opened["imported_mb"]
    print(
        f"{args.size} x {args.size} px slide: open {opened['open_s']:.2f} s, +{grown:.0f} MB over the imports "
        f"({opened['opened_mb']:.0f} MB resident)"
    )
    for side in (5_000, 20_000):
        result = measure(args.path, side)
        print(
            f"predict a {side} px square: {result['tiles']} tiles ({result['predicted']} with tissue) in "
            f"{result['predict_s']:.0f} s, peak RSS {result['peak_mb']:.0f} MB"
        )


if __name__ == "__main__":
    main()
