"""Seconds to aggregate 1,000 drawn circles from a warm cache: through the tile service, and in-process.

The bundled sample (2048 x 2048 px at 0.685 µm/px) and the shipped model (785 genes, hist2st protocol);
circle centres uniform over the slide, radii uniform in 10-100 µm. The cache is warmed by a first
aggregation (it predicts the sample's tile); each timed run then aggregates a fresh set of circles, so
nothing but tiles is reused. "service" is what the Spots widget waits for: the GeoDataFrame goes to the
child process, which reads the cache, integrates and sends the AnnData back. "napari shapes -> ROIs" is the
widget's own conversion of the layer's ellipses.
Run: ``.venv/bin/python benchmarks/roi_aggregation.py [--circles N] [--repeats R] [--cache DIR]``.
"""

import argparse
import os
import tempfile
import time

import numpy as np


def random_circles(rng, n: int, size: tuple[int, int], mpp: float) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) centres and radii, in slide pixels."""
    height, width = size
    centers = np.column_stack([rng.uniform(0, width, n), rng.uniform(0, height, n)])
    return centers, rng.uniform(10, 100, n) / mpp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--circles", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache", help="tile cache folder (default: a temporary one)")
    args = parser.parse_args()

    import torch

    from napari_genemap.checkpoints import shipped_checkpoint
    from napari_genemap.explore import rois as R
    from napari_genemap.infer.aggregate import GeneMapSource, aggregate_circles
    from napari_genemap.infer.engine import TileEngine
    from napari_genemap.infer.predict import EngineSpec
    from napari_genemap.infer.service import TileService
    from napari_genemap.io import image_levels, slide_mpp
    from napari_genemap.models.checkpoint import load_checkpoint
    from napari_genemap.sample import SECTION, read_sample, sample_root

    with tempfile.TemporaryDirectory() as scratch:
        cache_root = args.cache or scratch
        sample = read_sample()
        mpp = slide_mpp(sample)
        size = tuple(int(s) for s in image_levels(sample)[0][0].shape[1:])
        rng = np.random.default_rng(0)

        def drawn(n: int):
            centers, radii = random_circles(rng, n, size, mpp)
            data = [R.ellipse_corners(x, y, r) for (x, y), r in zip(centers, radii)]
            return data, centers, radii

        spec = EngineSpec(
            slide=str(sample_root()), section=SECTION, checkpoint=str(shipped_checkpoint()), cache_root=cache_root
        )
        service = TileService(spec)
        try:
            started = time.perf_counter()
            service.wait("ready", timeout=300)
            ready = time.perf_counter() - started
            data, _, _ = drawn(args.circles)
            names = [f"ROI {i + 1}" for i in range(args.circles)]
            started = time.perf_counter()
            service.aggregate(R.rois_from_shapes(data, ["ellipse"] * len(data), names))
            service.wait("aggregated", timeout=600)
            cold = time.perf_counter() - started

            convert, through_service = [], []
            for _ in range(args.repeats):
                data, _, _ = drawn(args.circles)
                started = time.perf_counter()
                rois = R.rois_from_shapes(data, ["ellipse"] * len(data), names)
                convert.append(time.perf_counter() - started)
                started = time.perf_counter()
                service.aggregate(rois)
                event = service.wait("aggregated", timeout=600)
                through_service.append(time.perf_counter() - started)
                if event.payload.get("error"):
                    raise SystemExit(event.payload["error"])
                table = event.payload["table"]
                assert table.n_obs == args.circles and np.isfinite(table.X).all()
        finally:
            service.close()

        engine = TileEngine(load_checkpoint(shipped_checkpoint()), sample, cache_root)
        try:
            source = GeneMapSource.from_engine(engine, mpp)
            in_process = []
            for _ in range(args.repeats):
                _, centers, radii = drawn(args.circles)
                started = time.perf_counter()
                aggregate_circles(source, centers, radii)
                in_process.append(time.perf_counter() - started)
        finally:
            engine.close()

    n = args.circles
    print(
        f"{n} circles (radius 10-100 µm, uniform) on the {size[1]} x {size[0]} px sample, 785 genes, "
        f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads; best of {args.repeats}"
    )
    print(f"service start to ready:                  {ready:6.2f} s")
    print(f"first aggregation (predicts the tile):   {cold:6.2f} s")
    print(f"napari shapes -> ROIs (GeoDataFrame):    {min(convert):6.3f} s")
    best = min(through_service)
    print(f"warm cache, through the service:         {best:6.3f} s -> {n / best:,.0f} circles/s")
    best = min(in_process)
    print(f"warm cache, in-process aggregate_circles: {best:5.3f} s -> {n / best:,.0f} circles/s")


if __name__ == "__main__":
    main()
