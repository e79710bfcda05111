"""What a user waits for when a slide opens: model ready, then the first predicted pixels of the view.

The path the viewer takes, without the viewer: the tile service starts (a child process imports torch, loads
the checkpoint, builds or reuses the backend's export), reports "ready"; then the whole-slide view's plan
(`view_plan` at the coarsest level that fits the 1,000-pixel-wide canvas) is asked for, and the first
"tiles" report with a finished tile is the first pixels on screen. Each run starts a fresh service on a
fresh gene-map cache; the backend export is made on the first run and reused by later ones (what a user has
after their first session), and the first run is reported on its own.

    .venv/bin/python benchmarks/latency.py [--slide SAMPLE_OR_PATH] [--section C3] [--backend auto] [--runs 3]
                                           [--threads N]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from napari_genemap.checkpoints import shipped_checkpoint
from napari_genemap.infer.cache import GeneMapCache
from napari_genemap.infer.predict import EngineSpec
from napari_genemap.infer.service import TileService
from napari_genemap.infer.view import view_plan
from napari_genemap.sample import sample_root


def one_run(spec: EngineSpec, canvas: int, threads: int | None) -> tuple[float, float, float]:
    """(seconds to ready, seconds from ready to the first finished tile, seconds to the whole view)."""
    started = time.perf_counter()
    service = TileService(spec, threads)
    try:
        event = service.wait("ready", timeout=600)
        ready = time.perf_counter()
        cache = GeneMapCache.open(event.payload["cache"])
        height, width = cache.grid.map_shape(0)
        level = next((L for L in range(cache.n_levels) if max(cache.grid.map_shape(L)) <= canvas), cache.n_levels - 1)
        plan = view_plan(cache, level, (0, height, 0, width), ring=0)
        service.want(plan)
        first = None
        while True:
            payload = service.wait("tiles", timeout=600).payload
            if payload["done"] and first is None:
                first = time.perf_counter()
            if not payload["queued"]:
                break
        return ready - started, (first or time.perf_counter()) - ready, time.perf_counter() - ready
    finally:
        service.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slide", default=str(sample_root() / "images" / "B4_crop.jpg"))
    parser.add_argument("--section")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--canvas", type=int, default=1000, help="canvas width in screen pixels")
    parser.add_argument("--threads", type=int, help="the service's model threads (default: the viewer's)")
    args = parser.parse_args()
    exports = Path(tempfile.mkdtemp(prefix="genemap-latency-"))
    rows = []
    for run in range(args.runs):
        cache_root = exports / f"run{run}"  # a fresh gene-map cache; the export beside it is copied below
        if run:
            (cache_root).mkdir()
            (cache_root / "exports").symlink_to(exports / "run0" / "exports", target_is_directory=True)
        spec = EngineSpec(
            slide=args.slide,
            section=args.section,
            checkpoint=str(shipped_checkpoint()),
            cache_root=str(cache_root),
            backend=args.backend,
        )
        rows.append(one_run(spec, args.canvas, args.threads))
        label = "first run (export made)" if run == 0 else f"run {run} (export reused)"
        print(f"{label}: ready {rows[-1][0]:.2f} s, first pixels +{rows[-1][1]:.2f} s, whole view +{rows[-1][2]:.2f} s")
    if len(rows) > 1:
        later = np.array(rows[1:])
        print(
            f"median of runs 1-{len(rows) - 1}: ready {np.median(later[:, 0]):.2f} s, first pixels "
            f"+{np.median(later[:, 1]):.2f} s, whole view +{np.median(later[:, 2]):.2f} s ({args.backend} backend)"
        )


if __name__ == "__main__":
    main()
