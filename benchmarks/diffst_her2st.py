"""Diff-ST on the leave-one-section-out folds of the five shared HER2ST sections: super-resolve the held-out
section's 2 x 2 blocks of spots (LR, 400 µm) back to its spots (HR, 200 µm).

One fold per run (``--fold C3``), collected into ``benchmarks/results/diffst_<fold>.json``; ``--table``
prints every finished fold. The fold's test section is never trained on and never used to choose anything:
the fold's PixNet (``--pathology``, trained on the other four sections: `examples/train_pixnet_her2st.toml`
with the fold's section left out) gives the histology features and the PixNet rows, and Diff-ST trains on
the other four sections' pairs for ``--steps`` steps (the last step is kept).

Genes: the 50 most variable (variance of log1p counts over the four training sections' spots, HEST's rule)
among the 785 hist2st genes, so that PixNet predicts them all. Values: hist2st's normalisation over these 50
genes (counts scaled to 1e4 over the panel, log10(1 + x)), for every row alike: library size is removed, as
PixNet predicts composition, not depth (on log1p raw counts its C4 values correlate at -0.18, its summed
prediction with the spots' depth at -0.67). An LR cell holds its block's summed counts so normalised.
Rows, each scored on the held-out section's measured HR spots (`napari_genemap.evaluate.superres`):

- **nearest** / **bicubic**: the LR map's per-spot mean counts (block sum / its spots) on each spot, or
  interpolated bicubically between block centres (blocks without spots filled from the nearest block);
- **PixNet**: the fold's PixNet alone (histology only: its dense map through the tile engine, integrated
  over each spot, the path of ``genemap predict`` + ``genemap aggregate``);
- **calibrated PixNet**: PixNet's values rescaled within each block to the block's measured sum
  (`models.calibration.calibrate_to_blocks`);
- **Diff-ST** (``--variants full no-histology no-graph``): the mean of ``--samples`` draws (Heun,
  ``--sample-steps``), with the spread's calibration; with ``--more-samples K`` also the mean of K draws
  of the same model (what of the gap to the baselines is sampling noise).

    python benchmarks/diffst_her2st.py --fold C4 --pathology /work/trained/pixnet-fold-C4 --steps 600 --out /tmp/ds
    python benchmarks/diffst_her2st.py --table
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
DATA = ROOT.parents[1] / "shared" / "data" / "her2st"
RESULTS = ROOT / "results"
SECTIONS = ("B4", "C2", "C3", "C4", "C5")
VARIANTS = {
    "full": {},
    "no-histology": {"histology": False},
    "no-graph": {"gene_graph": False},
}
FACTOR = 2


def panel(training_tables: list):
    from napari_genemap.data.protocols import hest, hist2st, hist2st_genes

    shared = [g for g in hist2st_genes() if all(g in t.var_names for t in training_tables)]
    genes = hest([t[:, shared] for t in training_tables]).genes
    return replace(hist2st(), name="hist2st-panel", genes=genes)


def lr_per_spot(pair) -> np.ndarray:
    """The LR blocks' mean counts per spot (genes, h, w), NaN where a block has no spot."""
    spots = pair.lr_spots.astype(np.float64)
    return np.where(spots > 0, pair.lr_counts / np.maximum(spots, 1), np.nan)


def upsampled(pair, order: int) -> np.ndarray:
    """Per-spot LR counts on the HR grid: nearest (order 0) or bicubic between block centres (order 3)."""
    from scipy import ndimage

    values = lr_per_spot(pair)
    empty = np.isnan(values[0])
    if empty.any():  # fill empty blocks from the nearest block with spots, so interpolation has values
        index = ndimage.distance_transform_edt(empty, return_distances=False, return_indices=True)
        values = values[:, index[0], index[1]]
    if order == 0:
        return np.repeat(np.repeat(values, FACTOR, 1), FACTOR, 2)
    rows, cols = pair.shape
    # HR cell centres in block coordinates: cell i's centre lies at (i + 0.5) / FACTOR - 0.5
    y, x = np.meshgrid((np.arange(rows) + 0.5) / FACTOR - 0.5, (np.arange(cols) + 0.5) / FACTOR - 0.5, indexing="ij")
    return np.stack([ndimage.map_coordinates(v, [y, x], order=3, mode="nearest") for v in values]).clip(0)


def on_grid(values: np.ndarray, pair, grid) -> np.ndarray:
    """Spot values (spots, genes) on the pair's HR grid (genes, H, W)."""
    out = np.zeros((values.shape[1], *pair.shape), dtype=np.float64)
    out[:, grid.row, grid.col] = values.T
    return out


def run_fold(args) -> dict:
    from napari_genemap.data.spot_grid import spot_grid
    from napari_genemap.data.superres import section_pair
    from napari_genemap.evaluate.superres import spread_calibration, superres_scores
    from napari_genemap.infer.aggregate import predict_measured_spots
    from napari_genemap.io import counts_table, read_slide
    from napari_genemap.models.calibration import calibrate_to_blocks
    from napari_genemap.models.checkpoint import load_checkpoint
    from napari_genemap.models.diffst_checkpoint import load_diffst
    from napari_genemap.models.diffst_section import section_histology, super_resolve_section
    from napari_genemap.train.diffst import DiffSTTrainConfig, train_diffst

    test = args.fold
    training = [s for s in SECTIONS if s != test]
    pixnet = load_checkpoint(args.pathology)
    trained_on = sorted(s.get("section") for s in pixnet.provenance.get("training", []))
    if test in trained_on:
        raise SystemExit(f"{args.pathology}: trained on {test}; the fold's PixNet must not have seen it")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the readers' notes on dropped spots are checked in the tests
        sdatas = {s: read_slide(DATA, section=s) for s in SECTIONS}
    protocol = panel([counts_table(sdatas[s]) for s in training])
    sdata = sdatas[test]
    pair = section_pair(sdata, protocol, FACTOR, test)
    grid = spot_grid(counts_table(sdata), test)
    mask = pair.hr_mask
    truth = pair.hr
    result: dict = {
        "fold": test,
        "training": training,
        "pathology": str(args.pathology),
        "genes": list(protocol.genes),
        "protocol": "hist2st normalisation over the panel: the 50 most variable hist2st genes of the training spots",
        "hr_spots": int(mask.sum()),
        "lr_blocks": int((pair.lr_spots > 0).sum()),
        "steps": args.steps,
        "rows": {},
    }

    def add(name: str, prediction: np.ndarray, extra: dict | None = None) -> None:
        scores = superres_scores(prediction, truth, mask)
        result["rows"][name] = {**scores, **(extra or {})}
        shown = {k: round(v, 4) for k, v in scores.items() if k != "per_gene_pcc" and isinstance(v, float)}
        print(test, name, shown, flush=True)

    def normalised(raw: np.ndarray) -> np.ndarray:
        values = protocol.normalise(raw.reshape(len(raw), -1).T.astype(np.float64)).T.reshape(raw.shape)
        return np.where(mask, values, 0.0)

    add("nearest", normalised(upsampled(pair, 0)))
    add("bicubic", normalised(upsampled(pair, 3)))
    started = time.perf_counter()
    spots = predict_measured_spots(pixnet, sdata, args.out / f"cache-{test}")
    columns = [list(spots.var_names).index(g) for g in protocol.genes]
    raw = on_grid(np.asarray(spots.layers["integral"])[:, columns], pair, grid)
    add("PixNet", normalised(raw), {"seconds_predict": time.perf_counter() - started})
    add("calibrated PixNet", normalised(calibrate_to_blocks(raw, mask, pair.lr_counts, FACTOR)))

    features, _ = section_histology(sdata, pair, pixnet)
    test_pair = replace(pair, histology=features)
    for variant in args.variants:
        out = args.out / f"diffst-{test}-{variant}-{args.steps}"
        config = DiffSTTrainConfig(
            slides=[{"path": str(DATA), "section": s} for s in training],
            out=str(out),
            pathology=str(args.pathology),
            protocol="hist2st",
            genes=list(protocol.genes),
            steps=args.steps,
            batch_size=args.batch,
            eval_every=args.steps,  # no validation section: the last step is kept, scored here
            samples=1,  # the run's own check (on its training slides): cheap; the scores come from below
            sample_steps=8,
            threads=args.threads,
            seed=args.seed,
            **VARIANTS[variant],
        )
        config.check()
        started = time.perf_counter()
        if not (out / "checkpoint" / "config.json").exists():
            train_diffst(config, progress=_progress(f"{test} {variant}"))
        seconds_train = time.perf_counter() - started
        loaded = load_diffst(out)

        def scored(samples: int, name: str, extra: dict, loaded=loaded):
            """The model's mean of ``samples`` draws, scored as row ``name`` with the spread's calibration."""
            started = time.perf_counter()
            drawn = super_resolve_section(
                loaded.model,
                loaded.standardisation,
                test_pair,
                samples=samples,
                steps=args.sample_steps,
                seed=args.seed,
            )
            extra = {
                **extra,
                "seconds_sample": time.perf_counter() - started,
                "calibration": spread_calibration(drawn.mean, drawn.spread, truth, mask),
            }
            add(name, np.where(mask, drawn.mean, 0.0), extra)
            print(test, name, extra["calibration"], flush=True)
            return drawn

        parameters = sum(p.numel() for p in loaded.model.parameters())
        drawn = scored(args.samples, f"Diff-ST, {variant}", {"seconds_train": seconds_train, "parameters": parameters})
        if args.more_samples:  # the same model, its mean over more draws: how much is sampling noise
            scored(args.more_samples, f"Diff-ST, {variant}, {args.more_samples} draws", {})
        if variant == "full":
            np.savez_compressed(
                args.out / f"maps-{test}.npz",
                truth=truth,
                mask=mask,
                lr=pair.lr,
                bicubic=normalised(upsampled(pair, 3)),
                calibrated=normalised(calibrate_to_blocks(raw, mask, pair.lr_counts, FACTOR)),
                mean=drawn.mean,
                spread=drawn.spread,
                genes=np.array(protocol.genes),
            )
    return result


def _progress(label: str):
    last = [0.0]

    def show(done: int, total: int, message: str) -> None:
        if time.perf_counter() - last[0] > 60 or done == total:
            last[0] = time.perf_counter()
            print(f"{label}: {done}/{total} {message}", flush=True)

    return show


def figure(fold: str, maps: Path, genes: list[str]) -> Path:
    """LR, HR truth, bicubic, calibrated PixNet, Diff-ST mean and spread for three genes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = np.load(maps)
    names = list(data["genes"])
    columns = ["lr", "truth", "bicubic", "calibrated", "mean", "spread"]
    titles = ["LR (2x2 sums)", "HR truth", "bicubic", "calibrated PixNet", "Diff-ST mean", "Diff-ST spread"]
    fig, axes = plt.subplots(len(genes), len(columns), figsize=(2.2 * len(columns), 2.3 * len(genes)))
    mask = data["mask"]
    for row, gene in enumerate(genes):
        g = names.index(gene)
        for col, (key, title) in enumerate(zip(columns, titles, strict=True)):
            image = data[key][g].astype(float)
            if key != "lr":
                image = np.where(mask, image, np.nan)
            axes[row, col].imshow(image, cmap="magma" if key != "spread" else "viridis", interpolation="nearest")
            axes[row, col].set_xticks([])
            axes[row, col].set_yticks([])
            if row == 0:
                axes[row, col].set_title(title, fontsize=9)
        axes[row, 0].set_ylabel(gene)
    fig.suptitle(f"HER2ST {fold} (held out): log10(1 + counts per 1e4 over the panel)", fontsize=10)
    fig.tight_layout()
    path = RESULTS / f"diffst_{fold}.png"
    fig.savefig(path, dpi=110)
    return path


def calibration_figure(fold: str, maps: Path) -> Path:
    """Is the spread calibrated? Left: the fraction of measured HR values within k spreads of the mean
    against k, beside what a Gaussian of that spread gives; right: |error| against spread, every spot and
    gene (both on the protocol scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.special import erf

    data = np.load(maps)
    mask = data["mask"]
    error = np.abs(data["mean"] - data["truth"])[:, mask].ravel()
    spread = data["spread"][:, mask].ravel()
    k = np.linspace(0, 4, 81)
    inside = [(error <= kk * spread).mean() for kk in k]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 4))
    left.plot(k, inside, label="Diff-ST")
    left.plot(k, erf(k / np.sqrt(2)), "--", color="grey", label="calibrated (Gaussian)")
    left.set_xlabel("k (spreads)")
    left.set_ylabel("fraction of HR values within mean ± k spread")
    left.legend()
    right.scatter(spread, error, s=2, alpha=0.3)
    right.set_xlabel("spread (sd of 8 draws)")
    right.set_ylabel("|mean - truth|")
    fig.suptitle(f"HER2ST {fold} (held out): spread calibration, {mask.sum()} spots x {len(data['genes'])} genes")
    fig.tight_layout()
    path = RESULTS / f"diffst_{fold}_calibration.png"
    fig.savefig(path, dpi=110)
    return path


def table() -> None:
    results = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("diffst_*.json"))]
    names = sorted({name for r in results for name in r["rows"]}, key=lambda n: list(results[0]["rows"]).index(n))
    print(f"{'method':28s} " + " ".join(f"{r['fold']:>22s}" for r in results) + "   (PCC mean / SSIM / RMSE)")
    for name in names:
        cells = []
        for r in results:
            row = r["rows"].get(name)
            cells.append(f"{row['pcc_mean']:.3f}/{row['ssim']:.3f}/{row['rmse']:.3f}" if row else "-")
        print(f"{name:28s} " + " ".join(f"{c:>22s}" for c in cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fold", choices=SECTIONS)
    parser.add_argument("--pathology", type=Path, help="the fold's PixNet checkpoint")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--more-samples", type=int, default=0, help="also score each model's mean of this many draws")
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads for training (0: default)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/diffst_her2st"))
    parser.add_argument("--figure", nargs=3, metavar="GENE", help="also draw the figure for these genes")
    parser.add_argument("--table", action="store_true", help="print the finished folds and stop")
    args = parser.parse_args()
    if args.table:
        table()
        return
    if args.fold is None or args.pathology is None:
        parser.error("--fold and --pathology are needed (or --table)")
    args.out.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(exist_ok=True)
    result = run_fold(args)
    path = RESULTS / f"diffst_{args.fold}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print("wrote", path)
    maps = args.out / f"maps-{args.fold}.npz"
    if maps.exists():
        print("wrote", calibration_figure(args.fold, maps))
        if args.figure:
            print("wrote", figure(args.fold, maps, args.figure))


if __name__ == "__main__":
    main()
