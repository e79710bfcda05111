"""DiffBulk on the leave-one-section-out folds of the five shared HER2ST sections: do the diffusion features add
to the pathology encoder's?

One fold per run (``--fold C3``), collected into ``benchmarks/results/diffbulk_<fold>.json``; ``--table``
prints every finished fold side by side. For a fold (its test section never trained on, never used to choose
anything), given its PixNet (``--pathology``, trained on the other four sections) and its stage 1
(``--stage1``, trained on the same four: `examples/train_diffbulk_stage1_dense.toml` with the fold's section
left out and ``steps = 1000``; the PixNet: `examples/train_pixnet_her2st.toml` likewise, ``steps = 100``), the
script trains stage 2 three ways with the same seed, steps, windows and learning rate, from the same PixNet:

- **both**: p (the PixNet, fine-tuned) fused with f (the frozen U-Net's features): DiffBulk's stage 2, dense;
- **pathology**: p alone, trained exactly the same way (the control: what more training alone gives);
- **diffusion**: f alone through the same fusion (p = 0);
- **pooled** and **pooled-pathology**: the published head, one vector per tile of stage 1's size centred on
  each spot (p and f averaged over the tile, fused, a linear head to the expression, MSE), and its p-alone
  control; scored on the test section's spot-centred tiles (``--pooled-batch`` tiles a step: as many pixels
  as the dense variants' windows).

No validation section: the last step is kept for every variant (nothing is chosen on the test section).
Each model predicts the test section's whole dense map through the tile engine (the path of ``genemap
predict`` + ``genemap aggregate``), integrated over each measured spot. Protocol ``hist2st``: the 785 genes,
counts scaled to 1e4 per spot, log10(1 + x). Metrics: Pearson of each gene across the test spots, mean and
median over genes, genes whose correlation is undefined omitted and counted; and DiffBulk's global PCC, one
Pearson over all (spot, gene) values flattened.

``--quality`` scores the fold's stage 1 instead, on tiles of the test section (never trained on): Fréchet
distances between feature sets of ImageNet EfficientNet-Lite0 (its deepest map, averaged: 320 numbers per
tile; n tiles a set, so only their differences mean anything) for drawn vs real tiles and real vs real; a
conditioning check (tiles drawn for test tiles' profiles, and for the same profiles shuffled, scored by the
shipped PixNet, which *was* trained on all five sections: per-gene Pearson of its predicted tile expression
with the profiles, mean over genes); and a figure of tiles drawn for the highest and lowest profile of three
genes (the same noise in each column).

    python benchmarks/diffbulk_her2st.py --fold C3 --stage1 RUN --pathology PIXNET --steps 200 --out /tmp/db
    python benchmarks/diffbulk_her2st.py --fold C3 --stage1 RUN --quality
    python benchmarks/diffbulk_her2st.py --table
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
DATA = ROOT.parents[1] / "shared" / "data" / "her2st"
RESULTS = ROOT / "results"
SECTIONS = ("B4", "C2", "C3", "C4", "C5")
VARIANTS = ("both", "pathology", "diffusion", "pooled", "pooled-pathology")


def global_pcc(prediction: np.ndarray, truth: np.ndarray) -> float:
    """DiffBulk's global PCC: one Pearson over every (spot, gene) value."""
    return float(np.corrcoef(np.ravel(prediction), np.ravel(truth))[0, 1])


def score(prediction: np.ndarray, truth: np.ndarray) -> dict:
    from napari_genemap.evaluate.metrics import summarise_unit

    row = summarise_unit(prediction, truth)
    return {
        "mean": float(row["PCC@M"]),
        "median": float(row["PCC@S"]),
        "undefined": int(row["n_undefined"]),
        "global": global_pcc(prediction, truth),
    }


def run_fold(args) -> dict:
    from napari_genemap.data.protocols import hist2st
    from napari_genemap.data.windows import load_training_slide, spot_crops
    from napari_genemap.infer.aggregate import predict_measured_spots
    from napari_genemap.io import read_slide
    from napari_genemap.models.checkpoint import load_checkpoint
    from napari_genemap.models.diffbulk_pooled import predict_tiles
    from napari_genemap.train.diffbulk_stage2 import DiffBulkStage2Config, train_diffbulk_stage2

    test = args.fold
    training = [s for s in SECTIONS if s != test]
    pixnet = load_checkpoint(args.pathology)
    trained_on = sorted(s.get("section") for s in pixnet.provenance.get("training", []))
    if test in trained_on:
        raise SystemExit(f"{args.pathology}: trained on {test}; the fold's PixNet must not have seen it")
    protocol = hist2st()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the readers' notes on dropped spots are checked in the tests
        test_sdata = read_slide(DATA, section=test)
        test_slide = load_training_slide(test_sdata, protocol, pixnet.mpp, test)
    truth = test_slide.targets
    result: dict = {
        "fold": test,
        "training": training,
        "stage1": str(args.stage1),
        "pathology": str(args.pathology),
        "steps": args.steps,
        "rows": {},
    }
    if not args.skip_start:
        started = time.perf_counter()
        prediction = predict_measured_spots(pixnet, test_sdata, args.out / "cache")
        seconds = time.perf_counter() - started
        result["rows"]["PixNet (the start)"] = {**score(prediction.X, truth), "seconds_predict": seconds}
        print(test, "PixNet", result["rows"]["PixNet (the start)"], flush=True)
    for variant in args.variants:
        pooled = variant.startswith("pooled")
        name = f"stage 2, {variant}" + (f", seed {args.seed}" if args.seed else "")
        name += f", f from {args.stage1_tag}" if args.stage1_tag and variant != "pathology" else ""
        tag = f"-{args.stage1_tag.replace(' ', '')}" if args.stage1_tag else ""
        out = args.out / f"stage2-{test}-{variant}-seed{args.seed}{tag}"
        config = DiffBulkStage2Config(
            slides=[{"path": str(DATA), "section": s} for s in training],
            out=str(out),
            stage1=str(args.stage1),
            pathology=str(args.pathology),
            features="pathology" if variant.endswith("pathology") else "both" if pooled else variant,
            head="pooled" if pooled else "dense",
            mpp=pixnet.mpp,
            window=args.window,
            batch=args.pooled_batch if pooled else args.batch,
            steps=args.steps,
            lr=args.lr,
            eval_every=args.steps,
            seed=args.seed,
            device=args.device,
        )
        started = time.perf_counter()
        if args.reuse and (out / "config.json").is_file():  # trained by an earlier run that stopped before scoring
            train_seconds = None
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                train_diffbulk_stage2(config)
            train_seconds = time.perf_counter() - started
        model = load_checkpoint(out)
        started = time.perf_counter()
        if pooled:  # one tile per test spot, no tile engine: a pooled model makes no map
            predicted = predict_tiles(model.model, spot_crops(test_slide, model.model.config.feature_tile))
        else:
            predicted = predict_measured_spots(model, test_sdata, args.out / "cache").X
        result["rows"][name] = {
            **score(predicted, truth),
            "stage1": str(args.stage1),
            "seconds_train": train_seconds,
            "seconds_predict": time.perf_counter() - started,
        }
        print(test, name, result["rows"][name], flush=True)
    return result


FIGURE_GENES = ("KRT8", "IGKC", "COL3A1")  # tumour epithelium, plasma cells, stroma


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (FID's formula)."""
    from scipy import linalg

    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b)
    return float(((mean_a - mean_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * np.real(root)))


def stage1_quality(args) -> dict:
    """Fréchet distances in ImageNet EfficientNet-Lite0 space, the conditioning check and the figure."""
    import torch
    from PIL import Image, ImageDraw

    from napari_genemap.checkpoints import shipped_checkpoint
    from napari_genemap.data.protocols import Protocol
    from napari_genemap.data.pseudobulk import normalise_tiles, read_tiles, spot_tiles
    from napari_genemap.io import read_slide
    from napari_genemap.models.checkpoint import load_checkpoint
    from napari_genemap.models.diffbulk import load_stage1
    from napari_genemap.models.encoders import Encoder, EncoderConfig
    from napari_genemap.models.generate import decoder_for, to_rgb
    from napari_genemap.models.predict import predict_map

    stage1 = load_stage1(args.stage1)
    model = stage1.model.eval()
    config = stage1.config
    trained_on = sorted(s.get("section") for s in config["provenance"]["training"])
    if args.fold in trained_on:
        raise SystemExit(f"{args.stage1}: trained on {args.fold}; the fold's stage 1 must not have seen it")
    protocol = Protocol.from_dict(config["protocol"])
    tile_um, tile_px = config["tile"]["tile_um"], model.tile_px
    decode = decoder_for(
        model, config["provenance"]["taef2"]["folder"] if config["provenance"].get("taef2") else None, "cpu"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sdata = read_slide(DATA, section=args.fold)
    tiles = spot_tiles(sdata, tile_um)
    rng = np.random.default_rng(0)
    chosen = np.sort(rng.choice(tiles.n_obs, size=min(2 * args.n_quality, tiles.n_obs), replace=False))
    tiles = tiles[chosen].copy()
    real = read_tiles(sdata, tiles, tile_um / tile_px)
    values = normalise_tiles(tiles, protocol).layers["protocol"].astype(np.float32)
    n = args.n_quality
    genes = list(protocol.genes)

    def draw(profiles: np.ndarray | None, seed: int) -> np.ndarray:
        generator = torch.Generator().manual_seed(seed)
        c = model.edm_config
        noise = torch.randn(
            (len(profiles) if profiles is not None else n, c.in_channels, c.sample_size, c.sample_size),
            generator=generator,
        )
        with torch.no_grad():
            condition = None if profiles is None else model.condition([(genes, v) for v in profiles])
            stored = model.generate(
                noise, condition, steps=args.sample_steps, guidance=args.guidance if condition is not None else None
            )
        return to_rgb(stored, decode)

    started = time.perf_counter()
    conditioned = draw(values[:n], 1)
    shuffled = draw(values[:n][rng.permutation(n)], 1)  # the same noise, another tile's profile
    unconditioned = draw(None, 1)
    seconds = time.perf_counter() - started
    encoder = Encoder(EncoderConfig()).eval()

    def features(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
            return encoder(x)[-1].mean((2, 3)).numpy().astype(np.float64)

    real_a, real_b = features(real[:n]), features(real[n : 2 * n])
    distances = {
        "real vs real (two halves of the held-out tiles)": frechet_distance(real_a, real_b),
        "conditioned vs real": frechet_distance(features(conditioned), real_b),
        "unconditioned vs real": frechet_distance(features(unconditioned), real_b),
    }
    scorer = load_checkpoint(shipped_checkpoint())  # trained on all five sections, the held-out one too

    def expression(images: np.ndarray) -> np.ndarray:
        raw = np.stack([predict_map(scorer.model, image).sum((1, 2)) for image in images])
        return np.asarray(protocol.normalise(raw), np.float64)

    def agreement(images: np.ndarray) -> float:
        from napari_genemap.evaluate.metrics import summarise_unit

        return float(summarise_unit(expression(images), values[:n])["PCC@M"])

    check = {
        "real tiles (ceiling)": agreement(real[:n]),
        "drawn for their own profiles": agreement(conditioned),
        "drawn for shuffled profiles": agreement(shuffled),
        "unconditioned": agreement(unconditioned),
    }
    figure_rows = []
    for gene in FIGURE_GENES:
        column = genes.index(gene)
        order = np.argsort(values[:, column])
        high, low = values[order[-1]], values[order[0]]
        figure_rows += [draw(np.stack([high] * 3), 7), draw(np.stack([low] * 3), 7)]
    side, margin = figure_rows[0].shape[1], 110  # a label column on the left
    figure = np.full((len(figure_rows) * (side + 4), margin + 3 * (side + 4), 3), 255, np.uint8)
    for r, row in enumerate(figure_rows):
        for c, image in enumerate(row):
            x = margin + c * (side + 4)
            figure[r * (side + 4) : r * (side + 4) + side, x : x + side] = image
    labelled = Image.fromarray(figure)
    draw_text = ImageDraw.Draw(labelled)
    for r, (gene, level) in enumerate((g, level) for g in FIGURE_GENES for level in ("highest", "lowest")):
        draw_text.text((6, r * (side + 4) + side // 2 - 12), f"{gene}\n{level}", fill=(0, 0, 0))
    figure_path = RESULTS / f"diffbulk_stage1_{args.fold}.png"
    labelled.save(figure_path)
    return {
        "n": n,
        "tile_um": tile_um,
        "tile_px": tile_px,
        "step": stage1.metrics.get("step"),
        "guidance": args.guidance,
        "sample_steps": args.sample_steps,
        "sampling_seconds": seconds,
        "frechet_efficientnet_lite0": distances,
        "conditioning_pcc_mean": check,
        "figure": str(figure_path.relative_to(ROOT.parent)),
        "figure_rows": [f"{g} {level}" for g in FIGURE_GENES for level in ("highest", "lowest")],
    }


def table() -> None:
    rows = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("diffbulk_*.json"))]
    print("| fold | model | mean PCC | median PCC | global PCC | undefined | train s |")
    print("|---|---|---|---|---|---|---|")
    for fold in rows:
        for name, row in fold["rows"].items():
            train = f"{row['seconds_train']:.0f}" if row.get("seconds_train") else "–"
            print(
                f"| {fold['fold']} | {name} | {row['mean']:.4f} | {row['median']:.4f} | {row['global']:.4f} | "
                f"{row['undefined']} | {train} |"
            )
    summarise_folds(rows)


def summarise_folds(rows: list[dict]) -> None:
    """The models every finished fold has (seed 0), side by side: mean PCC per fold and over folds, and
    what f adds to p (both - pathology; dense and pooled)."""
    names = ["PixNet (the start)", *(f"stage 2, {v}" for v in VARIANTS)]
    folds = {fold["fold"]: fold["rows"] for fold in rows}
    names = [n for n in names if all(n in r for r in folds.values())]
    if len(folds) < 2 or not names:
        return
    order = [s for s in SECTIONS if s in folds]
    print("\n| mean PCC | " + " | ".join(order) + " | mean |")
    print("|---|" + "---|" * (len(order) + 1))
    for name in names:
        values = [folds[s][name]["mean"] for s in order]
        print(f"| {name} | " + " | ".join(f"{v:.4f}" for v in values) + f" | {np.mean(values):.4f} |")
    for label, both, alone in (("dense", "both", "pathology"), ("pooled", "pooled", "pooled-pathology")):
        both, alone = f"stage 2, {both}", f"stage 2, {alone}"
        if both in names and alone in names:
            gains = [folds[s][both]["mean"] - folds[s][alone]["mean"] for s in order]
            print(
                f"| f adds to p ({label}) | " + " | ".join(f"{g:+.4f}" for g in gains) + f" | {np.mean(gains):+.4f} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fold", choices=SECTIONS)
    parser.add_argument("--stage1", type=Path, help="the fold's stage-1 run folder")
    parser.add_argument("--pathology", type=Path, help="the fold's PixNet checkpoint")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--pooled-batch", type=int, default=32, help="spot tiles a step for the pooled variants")
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0, help="stage 2's seed (windows, augmentation); rows keep it")
    parser.add_argument(
        "--stage1-tag", default="", help="names a stage-1 ablation in the rows (e.g. 'p = 1'), so rows stay apart"
    )
    parser.add_argument("--reuse", action="store_true", help="score a variant's existing checkpoint in --out")
    parser.add_argument("--skip-start", action="store_true", help="do not re-score the fold's PixNet")
    parser.add_argument("--out", type=Path, default=Path("/tmp/diffbulk_her2st"))
    parser.add_argument("--table", action="store_true", help="print the finished folds and stop")
    parser.add_argument(
        "--quality", action="store_true", help="stage 1's Fréchet distances, conditioning check, figure"
    )
    parser.add_argument("--n-quality", type=int, default=64, help="tiles per set for --quality")
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--sample-steps", type=int, default=24)
    args = parser.parse_args()
    if args.table:
        table()
        return
    if not (args.fold and args.stage1 and (args.pathology or args.quality)):
        parser.error("--fold, --stage1 and --pathology (or --quality) are needed, or --table")
    args.out.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"diffbulk_{args.fold}.json"
    result = json.loads(path.read_text()) if path.exists() else {"fold": args.fold, "rows": {}}
    if args.quality:
        result["stage1_quality"] = stage1_quality(args)
        print(json.dumps(result["stage1_quality"], indent=1))
    else:
        fold = run_fold(args)
        result = {
            **result,
            **{k: v for k, v in fold.items() if k != "rows"},
            "rows": {**result["rows"], **fold["rows"]},
        }
    path.write_text(json.dumps(result, indent=1) + "\n")
    table()


if __name__ == "__main__":
    main()
