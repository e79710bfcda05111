"""Test-time augmentation (issue 13's first ablation): does averaging the 8 dihedral views of every window
help a fold model on its held-out section?

For each ``--fold SECTION:CHECKPOINT`` (a PixNet that never saw SECTION; the script checks its provenance),
the held-out section is predicted through the tile engine twice, without and with ``tta`` (the path of
``genemap predict [--tta]`` and the viewer), and integrated over its measured spots. Protocol ``hist2st``:
785 genes, counts scaled to 1e4 per spot, log10(1 + x); per-gene Pearson across the section's spots, mean
and median over genes, genes whose correlation is undefined omitted (and counted). Noise: a paired bootstrap
over spots (the same resampled spots for both maps, 200 draws) gives the standard deviation of the change
in mean PCC on that section. Results go to ``benchmarks/results/tta.json``; the test section is never used to
choose anything.

    python benchmarks/tta.py --fold C3:/work/trained/pixnet-fold-C3 --fold B4:/work/trained/pixnet-fold-B4
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
DATA = ROOT.parents[1] / "shared" / "data" / "her2st"
RESULTS = ROOT / "results"


def run_fold(section: str, checkpoint: str, draws: int, seed: int) -> dict:
    from napari_genemap.data.protocols import hist2st
    from napari_genemap.data.windows import load_training_slide
    from napari_genemap.evaluate.metrics import paired_bootstrap_sd, summarise_unit
    from napari_genemap.infer.aggregate import predict_measured_spots
    from napari_genemap.io import read_slide
    from napari_genemap.models.checkpoint import load_checkpoint

    model = load_checkpoint(checkpoint)
    trained_on = sorted(s.get("section") for s in model.provenance.get("training", []))
    if section in trained_on:
        raise SystemExit(f"{checkpoint}: trained on {section}; a fold model must not have seen it")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the readers' notes on dropped spots are checked in the tests
        sdata = read_slide(DATA, section=section)
        truth = load_training_slide(sdata, hist2st(), model.mpp, section).targets.astype(np.float64)
    rows, maps = {}, {}
    for tta in (False, True):
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as cache:
            prediction = np.asarray(predict_measured_spots(model, sdata, cache, tta=tta).X, np.float64)
        summary = summarise_unit(prediction, truth)
        name = "8 views (tta)" if tta else "one view"
        rows[name] = {
            "mean": float(summary["PCC@M"]),
            "median": float(summary["PCC@S"]),
            "undefined": int(summary["n_undefined"]),
            "seconds": time.perf_counter() - started,
        }
        maps[tta] = prediction
        print(section, name, rows[name], flush=True)
    return {
        "section": section,
        "checkpoint": checkpoint,
        "trained_on": trained_on,
        "spots": len(truth),
        "rows": rows,
        "change_mean_pcc": rows["8 views (tta)"]["mean"] - rows["one view"]["mean"],
        "bootstrap_sd": paired_bootstrap_sd(maps[False], maps[True], truth, draws, seed),
        "bootstrap_draws": draws,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fold", action="append", required=True, metavar="SECTION:CHECKPOINT")
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "tta.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    for fold in args.fold:
        section, _, checkpoint = fold.partition(":")
        results[section] = run_fold(section, checkpoint, args.draws, args.seed)
        path.write_text(json.dumps(results, indent=1) + "\n")
    print("| held-out section | one view | 8 views | change | paired bootstrap sd |")
    print("|---|---|---|---|---|")
    for section, fold in sorted(results.items()):
        one, eight = fold["rows"]["one view"]["mean"], fold["rows"]["8 views (tta)"]["mean"]
        print(f"| {section} | {one:.4f} | {eight:.4f} | {fold['change_mean_pcc']:+.4f} | {fold['bootstrap_sd']:.4f} |")


if __name__ == "__main__":
    main()
