"""Leave-one-section-out on the five shared HER2ST sections: PixNet vs the crop and ridge baselines.

Protocol (`hist2st`): the 785 genes, counts over them scaled to 1e4 per spot then log10(1 + x). For each
held-out test section the other four are split into three training sections and one validation section
(the next one in the list, cyclically) used only to pick the training step to keep. Metric: Pearson of
each gene across the test section's spots, then the mean and median over genes; genes whose correlation
is undefined (constant in the truth or the prediction) are omitted and counted. The published models
trained on 31 other sections; here three train and one validates.

Every method sees the slides at the same µm/px. PixNet predicts the test section's whole dense map through
the tile engine (512 px tiles, 128 px halo; the path of ``genemap predict`` + ``genemap aggregate``) and
integrates it over each spot's disk; "PixNet, spot windows" integrates instead the map of a training-size
window centred on each spot. The baselines see a spot-centred crop.

    python benchmarks/her2st_loo.py                 # the CPU budget (about an hour on 2 cores)
    python benchmarks/her2st_loo.py --steps 2000 --crop-steps 2000 --window 384   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "her2st"
SECTIONS = ("B4", "C2", "C3", "C4", "C5")
PUBLISHED = {  # mean PCC per held-out section, trained on 31 sections (../shared/data/README.md)
    "ST-Net": (0.108, 0.026, 0.037, 0.036, 0.043),
    "HisToGene": (0.200, 0.096, 0.071, 0.090, 0.075),
    "Hist2ST": (0.310, 0.131, 0.161, 0.178, 0.163),
    "HGGEP": (0.315, 0.177, 0.233, 0.219, 0.229),
    "Reg2ST": (0.328, 0.159, 0.236, 0.237, 0.240),
}


class PeakMemory:
    """Peak resident memory of this process while the block runs (sampled every 50 ms)."""

    def __enter__(self):
        self.peak = psutil.Process().memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        process = psutil.Process()
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, process.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mpp", type=float, default=2.0)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--crop-steps", type=int, default=250)
    parser.add_argument("--crop-batch", type=int, default=32)
    parser.add_argument("--folds", nargs="*", default=list(SECTIONS))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()

    import torch

    from napari_genemap.data.protocols import hist2st
    from napari_genemap.data.windows import load_training_slide
    from napari_genemap.device import resolve_device
    from napari_genemap.evaluate.metrics import summarise_unit
    from napari_genemap.infer.aggregate import predict_measured_spots
    from napari_genemap.io import read_slide
    from napari_genemap.models.checkpoint import load_checkpoint
    from napari_genemap.models.predict import predict_spots
    from napari_genemap.train.baselines import RidgeBaseline, predict_crop_regressor, timed, train_crop_regressor
    from napari_genemap.train.pixnet import TrainConfig, train_pixnet

    device = resolve_device(args.device)
    protocol = hist2st()
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the readers' notes on dropped spots were checked in the tests
        sdatas = {s: read_slide(DATA, section=s) for s in SECTIONS}
        slides = {s: load_training_slide(sdatas[s], protocol, args.mpp, s) for s in SECTIONS}
    print(f"# loaded {len(slides)} sections at {args.mpp} µm/px in {time.perf_counter() - started:.0f} s", flush=True)
    print(
        f"# PixNet: window {args.window} px, batch {args.batch}, {args.steps} steps, validation every "
        f"{args.eval_every}; crop baseline: {args.crop} px crops, batch {args.crop_batch}, {args.crop_steps} steps; "
        f"ridge on frozen ImageNet EfficientNet-Lite0 features of {args.crop} px crops; device {device}; "
        f"torch threads {torch.get_num_threads()}",
        flush=True,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for test in args.folds:
        others = [s for s in SECTIONS if s != test]
        validation = SECTIONS[(SECTIONS.index(test) + 1) % len(SECTIONS)]
        training = [s for s in others if s != validation]
        fold_slides = {s: slides[s] for s in others}
        truth = slides[test].targets
        fold_started = time.perf_counter()
        with PeakMemory() as memory:
            config = TrainConfig(
                slides=[{"path": str(DATA), "section": s} for s in others],
                validation=[validation],
                out=str(args.out / f"pixnet_{test}"),
                mpp=args.mpp,
                window=args.window,
                batch=args.batch,
                steps=args.steps,
                eval_every=args.eval_every,
                device=str(device),
            )
            summary, pixnet_seconds = timed(train_pixnet, config, slides=fold_slides, protocol=protocol)
            loaded = load_checkpoint(config.out, device)
            dense, dense_seconds = timed(predict_measured_spots, loaded, sdatas[test], args.out / "cache")
            raw = predict_spots(loaded.model, slides[test].image, slides[test].centers, slides[test].radii, args.window)
            results = {"PixNet": dense.X, "PixNet, spot windows": protocol.normalise(raw)}
            crop_model, crop_seconds = timed(
                train_crop_regressor,
                [slides[s] for s in training],
                protocol,
                size=args.crop,
                steps=args.crop_steps,
                batch=args.crop_batch,
                device=device,
                validation=[slides[validation]],
                eval_every=args.eval_every,
            )
            results["crop"] = predict_crop_regressor(crop_model, slides[test], args.crop)
            ridge = RidgeBaseline(size=args.crop, device=device)
            _, ridge_seconds = timed(ridge.fit, [slides[s] for s in training])
            results["ridge"] = ridge.predict(slides[test])
        seconds = {"PixNet": pixnet_seconds, "PixNet, spot windows": pixnet_seconds}
        seconds |= {"crop": crop_seconds, "ridge": ridge_seconds}
        for method, prediction in results.items():
            row = summarise_unit(prediction, truth)
            rows.append(
                {
                    "test": test,
                    "validation": validation,
                    "method": method,
                    "mean": row["PCC@M"],
                    "median": row["PCC@S"],
                    "undefined": row["n_undefined"],
                    "train_s": seconds[method],
                }
            )
            print(
                f"{test} {method:20s} mean {row['PCC@M']:.3f} median {row['PCC@S']:.3f} "
                f"undefined {row['n_undefined']:3d}  train {seconds[method]:.0f} s",
                flush=True,
            )
        fold_seconds = time.perf_counter() - fold_started
        print(
            f"{test} fold: {fold_seconds:.0f} s wall, peak RSS {memory.peak / 2**30:.2f} GiB; whole-section map "
            f"{dense_seconds:.0f} s; PixNet best validation "
            f"({validation}) {summary['best_validation']:.3f} at step {_best_step(summary)}",
            flush=True,
        )
        rows[-1]["fold_seconds"] = fold_seconds
        rows[-1]["fold_peak_gib"] = memory.peak / 2**30
    report(rows, args)
    (args.out / "her2st_loo.json").write_text(
        json.dumps({"settings": vars(args) | {"out": str(args.out)}, "rows": rows})
    )
    print(f"# total {time.perf_counter() - started:.0f} s", flush=True)
    return 0


def _best_step(summary: dict) -> int | None:
    saved = [record["step"] for record in summary["history"] if record.get("saved")]
    return saved[-1] if saved else None


def report(rows: list[dict], args) -> None:
    """Markdown table: per test section, ours beside the published numbers."""
    folds = [s for s in SECTIONS if any(r["test"] == s for r in rows)]
    print("\n| method (mean PCC; median in brackets) | " + " | ".join(folds) + " | mean |")
    print("|---|" + "---|" * (len(folds) + 1))
    for method in ("PixNet", "PixNet, spot windows", "crop", "ridge"):
        cells, means = [], []
        for section in folds:
            (row,) = [r for r in rows if r["test"] == section and r["method"] == method]
            cells.append(f"{row['mean']:.3f} ({row['median']:.3f})")
            means.append(row["mean"])
        print(f"| {method}, 3 train + 1 validation sections | " + " | ".join(cells) + f" | {np.mean(means):.3f} |")
    for method, values in PUBLISHED.items():
        chosen = [values[SECTIONS.index(s)] for s in folds]
        print(
            f"| {method} (published, 31 sections) | "
            + " | ".join(f"{v:.3f}" for v in chosen)
            + f" | {np.mean(chosen):.3f} |"
        )


if __name__ == "__main__":
    sys.exit(main())
