"""DiffBulk on the leave-one-section-out folds of the five shared HER2ST sections: do the diffusion features add
to the pathology encoder's?

One fold per run (``--fold C3``), collected into ``benchmarks/results/diffbulk_<fold>.json``; ``--table``
prints every finished fold side by side. For a fold (its test section never trained on, never used to choose
anything), given its PixNet (``--pathology``, trained on the other four sections) and its stage 1
(``--stage1``, trained on the same four: `examples/train_diffbulk_stage1_fold.toml`), the script trains stage 2
three ways with the same seed, steps, windows and learning rate, from the same PixNet:

- **both**: p (the PixNet, fine-tuned) fused with f (the frozen U-Net's features): DiffBulk's stage 2, dense;
- **pathology**: p alone, trained exactly the same way (the control: what more training alone gives);
- **diffusion**: f alone through the same fusion (p = 0).

No validation section: the last step is kept for every variant (nothing is chosen on the test section).
Each model predicts the test section's whole dense map through the tile engine (the path of ``genemap
predict`` + ``genemap aggregate``), integrated over each measured spot. Protocol ``hist2st``: the 785 genes,
counts scaled to 1e4 per spot, log10(1 + x). Metrics: Pearson of each gene across the test spots, mean and
median over genes, genes whose correlation is undefined omitted and counted; and DiffBulk's global PCC, one
Pearson over all (spot, gene) values flattened.

    python benchmarks/diffbulk_her2st.py --fold C3 --stage1 RUN --pathology PIXNET --steps 200 --out /tmp/db
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
VARIANTS = ("both", "pathology", "diffusion")


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
    from napari_genemap.data.windows import load_training_slide
    from napari_genemap.infer.aggregate import predict_measured_spots
    from napari_genemap.io import read_slide
    from napari_genemap.models.checkpoint import load_checkpoint
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
        truth = load_training_slide(test_sdata, protocol, pixnet.mpp, test).targets
    result: dict = {
        "fold": test,
        "training": training,
        "stage1": str(args.stage1),
        "pathology": str(args.pathology),
        "steps": args.steps,
        "rows": {},
    }
    started = time.perf_counter()
    prediction = predict_measured_spots(pixnet, test_sdata, args.out / "cache")
    seconds = time.perf_counter() - started
    result["rows"]["PixNet (the start)"] = {**score(prediction.X, truth), "seconds_predict": seconds}
    print(test, "PixNet", result["rows"]["PixNet (the start)"], flush=True)
    for variant in args.variants:
        out = args.out / f"stage2-{test}-{variant}"
        config = DiffBulkStage2Config(
            slides=[{"path": str(DATA), "section": s} for s in training],
            out=str(out),
            stage1=str(args.stage1),
            pathology=str(args.pathology),
            features=variant,
            mpp=pixnet.mpp,
            window=args.window,
            batch=args.batch,
            steps=args.steps,
            lr=args.lr,
            eval_every=args.steps,
            seed=0,
            device=args.device,
        )
        started = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            train_diffbulk_stage2(config)
        train_seconds = time.perf_counter() - started
        model = load_checkpoint(out)
        started = time.perf_counter()
        prediction = predict_measured_spots(model, test_sdata, args.out / "cache")
        result["rows"][f"stage 2, {variant}"] = {
            **score(prediction.X, truth),
            "seconds_train": train_seconds,
            "seconds_predict": time.perf_counter() - started,
        }
        print(test, variant, result["rows"][f"stage 2, {variant}"], flush=True)
    return result


def table() -> None:
    rows = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("diffbulk_*.json"))]
    print("| fold | model | mean PCC | median PCC | global PCC | undefined | train s |")
    print("|---|---|---|---|---|---|---|")
    for fold in rows:
        for name, row in fold["rows"].items():
            train = f"{row['seconds_train']:.0f}" if "seconds_train" in row else "–"
            print(
                f"| {fold['fold']} | {name} | {row['mean']:.4f} | {row['median']:.4f} | {row['global']:.4f} | "
                f"{row['undefined']} | {train} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fold", choices=SECTIONS)
    parser.add_argument("--stage1", type=Path, help="the fold's stage-1 run folder")
    parser.add_argument("--pathology", type=Path, help="the fold's PixNet checkpoint")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=Path("/tmp/diffbulk_her2st"))
    parser.add_argument("--table", action="store_true", help="print the finished folds and stop")
    args = parser.parse_args()
    if args.table:
        table()
        return
    if not (args.fold and args.stage1 and args.pathology):
        parser.error("--fold, --stage1 and --pathology are needed (or --table)")
    args.out.mkdir(parents=True, exist_ok=True)
    result = run_fold(args)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"diffbulk_{args.fold}.json").write_text(json.dumps(result, indent=1) + "\n")
    table()


if __name__ == "__main__":
    main()
