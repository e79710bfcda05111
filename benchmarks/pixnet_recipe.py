"""Issue 13: PixNet's learning curves and recipe ablations on leave-one-section-out folds, run in parts.

One run is a fold (``--fold C3``: the test section, never trained on, never used to choose anything) and a
recipe (``--tag`` naming ``--set`` switches of the training config, e.g. ``--set raw_loss='"nb"'``). The split
is `her2st_loo.py`'s: the next section in the list (cyclically) validates, the other three train. Every
``--eval-every`` steps the latest weights are scored on spot-centred windows of the validation section and,
for the report only, of the test section; the step with the best validation score is kept as ``best/``.

Runs continue where they stopped: ``--minutes`` cancels a sitting after that long (the latest checkpoint and
the curve so far stay), and the same command resumes it later on the same learning-rate schedule (AdamW's
moments restart: a resumed run is close to, not identical with, one that never stopped). When the schedule
is done the best step predicts the test section's whole map through the tile engine (``genemap predict`` +
``genemap aggregate``'s path), integrated over its spots, which gives the run's number.

Protocol ``hist2st``: 785 genes, counts scaled to 1e4 per spot, log10(1 + x); per-gene Pearson across the
section's spots, mean and median over genes, genes whose correlation is undefined omitted (and counted).
``gene_rank`` runs fit their components on the counts of every HER2ST section but the test one (35 have
counts; the images of only five are here).

    python benchmarks/pixnet_recipe.py --fold C3 --steps 3000 --minutes 60
    python benchmarks/pixnet_recipe.py --fold C3 --steps 3000 --tag nb --set raw_loss='"nb"'
    python benchmarks/pixnet_recipe.py --fold C3 --tag ensemble --ensemble baseline seed1 seed2
    python benchmarks/pixnet_recipe.py --table
    python benchmarks/pixnet_recipe.py --curves
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import tomllib
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
DATA = ROOT.parents[1] / "shared" / "data" / "her2st"
SECTIONS = ("B4", "C2", "C3", "C4", "C5")
RESULTS = ROOT / "results"


def split(test: str) -> tuple[str, list[str]]:
    """`her2st_loo.py`'s split: the validation section and the three training ones."""
    validation = SECTIONS[(SECTIONS.index(test) + 1) % len(SECTIONS)]
    return validation, [s for s in SECTIONS if s not in (test, validation)]


def parse_switches(items: list[str]) -> dict:
    """``KEY=VALUE`` pairs, each VALUE in TOML (``3``, ``"nb"``, ``true``)."""
    switches = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            switches[key] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            raise SystemExit(f"--set {item}: expected KEY=VALUE with a TOML value") from None
    return switches


def read_curve(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def run(args) -> dict:
    import torch

    from napari_genemap.data.protocols import hist2st
    from napari_genemap.data.windows import load_training_slide
    from napari_genemap.io import read_slide
    from napari_genemap.models.checkpoint import load_checkpoint, read_checkpoint_config
    from napari_genemap.train.pixnet import TrainConfig, evaluate_slides, normalise_stains, train_pixnet

    folder = args.out / f"{args.fold}-{args.tag}"
    latest, best, curve_path = folder / "latest", folder / "best", folder / "curve.jsonl"
    folder.mkdir(parents=True, exist_ok=True)
    validation, training = split(args.fold)
    switches = parse_switches(args.set)
    if switches.get("gene_rank") and "gene_basis" not in switches:
        counts = sorted((DATA / "counts").glob("*.tsv.gz"))
        switches["gene_basis"] = [str(p) for p in counts if p.name.split(".")[0] != args.fold]
    protocol = hist2st()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the readers' notes on dropped spots are checked in the tests
        sdatas = {s: read_slide(DATA, section=s) for s in SECTIONS}
        slides = {s: load_training_slide(sdatas[s], protocol, args.mpp, s) for s in SECTIONS}
    settings = dict(
        slides=[{"path": str(DATA), "section": s} for s in training],
        out=str(latest),
        mpp=args.mpp,
        window=args.window,
        batch=args.batch,
        steps=args.steps,
        lr=args.lr,
        eval_every=args.eval_every,
        seed=args.seed,
        device=args.device,
    )
    settings |= switches
    resume = None
    if (latest / "model.safetensors").exists():
        done = read_checkpoint_config(latest).get("metrics", {}).get("step", 0)
        resume = str(latest) if done < args.steps else None
    curve = read_curve(curve_path)
    if resume is not None or not curve or curve[-1]["step"] < args.steps:
        config = TrainConfig(**settings, resume=resume)
        best_score = max((r["validation"] for r in curve), default=-np.inf)
        deadline = time.monotonic() + args.minutes * 60 if args.minutes else None

        def score(record: dict) -> None:
            nonlocal best_score
            if not record.get("saved"):
                return
            loaded = load_checkpoint(latest)
            scored = {s: slides[s] for s in (validation, args.fold)}
            if loaded.stain is not None:  # the model sees every slide re-stained, as the engine shows it them
                scored, _ = normalise_stains(scored, [], loaded.stain)
            with torch.no_grad():
                scores = evaluate_slides(loaded.model.eval(), list(scored.values()), protocol, args.window)
            row = {"step": record["step"], "validation": scores[validation], "test": scores[args.fold]}
            row["seconds"] = record["seconds"]
            with curve_path.open("a") as stream:
                stream.write(json.dumps(row) + "\n")
            print(f"{args.fold} {args.tag} step {row['step']}: validation {row['validation']:.4f}, "
                  f"test (report only) {row['test']:.4f}", flush=True)  # fmt: skip
            if row["validation"] > best_score:
                best_score = row["validation"]
                copy = Path(tempfile.mkdtemp(dir=folder))
                shutil.copytree(latest, copy, dirs_exist_ok=True)
                shutil.rmtree(best, ignore_errors=True)
                os.replace(copy, best)

        train_pixnet(
            config,
            slides={s: slides[s] for s in training},
            protocol=protocol,
            on_metrics=score,
            cancel=(lambda: time.monotonic() > deadline) if deadline else None,
        )
        curve = read_curve(curve_path)
        if curve[-1]["step"] < args.steps:
            print(f"# {args.fold} {args.tag}: stopped at step {curve[-1]['step']} of {args.steps}; run again")
            return {}
    return final(args, curve, best, sdatas[args.fold], slides[args.fold], validation, switches)


def final(args, curve, best, sdata, truth_slide, validation, switches) -> dict:
    """The best step's whole-section map, integrated over the test spots (with and without the 8 views)."""
    from napari_genemap.evaluate.metrics import summarise_unit
    from napari_genemap.infer.aggregate import predict_measured_spots
    from napari_genemap.models.checkpoint import load_checkpoint

    model = load_checkpoint(best)
    chosen = max(curve, key=lambda r: r["validation"])
    result = {
        "fold": args.fold,
        "validation_section": validation,
        "tag": args.tag,
        "switches": {k: (f"{len(v)} counts tables" if k == "gene_basis" else v) for k, v in switches.items()},
        "settings": {k: getattr(args, k) for k in ("steps", "batch", "window", "lr", "mpp", "seed", "eval_every")},
        "chosen_step": chosen["step"],
        "curve": curve,
    }
    for tta in (False, True) if args.tta else (False,):
        with tempfile.TemporaryDirectory() as cache:
            started = time.perf_counter()
            prediction = np.asarray(predict_measured_spots(model, sdata, cache, tta=tta).X, np.float64)
        row = summarise_unit(prediction, truth_slide.targets.astype(np.float64))
        key = "test_tta" if tta else "test"
        np.save(best.parent / f"{key}_prediction.npy", prediction)  # for --ensemble
        result[key] = {
            "mean": float(row["PCC@M"]),
            "median": float(row["PCC@S"]),
            "undefined": int(row["n_undefined"]),
            "seconds": time.perf_counter() - started,
        }
        print(f"{args.fold} {args.tag} {key}: {result[key]}", flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"pixnet_recipe_{args.fold}_{args.tag}.json").write_text(json.dumps(result, indent=1))
    return result


def ensemble(args) -> dict:
    """The mean of finished runs' test predictions (protocol values per spot and gene), scored the same way."""
    from napari_genemap.data.protocols import hist2st
    from napari_genemap.data.windows import load_training_slide
    from napari_genemap.evaluate.metrics import summarise_unit
    from napari_genemap.io import read_slide

    paths = [args.out / f"{args.fold}-{tag}" / "test_prediction.npy" for tag in args.ensemble]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise SystemExit(f"{missing[0]}: not there; finish that run first")
    members = [json.loads((RESULTS / f"pixnet_recipe_{args.fold}_{tag}.json").read_text()) for tag in args.ensemble]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        truth = load_training_slide(read_slide(DATA, section=args.fold), hist2st(), args.mpp, args.fold).targets
    prediction = np.mean([np.load(p) for p in paths], axis=0)
    row = summarise_unit(prediction, truth.astype(np.float64))
    (args.out / f"{args.fold}-{args.tag}").mkdir(parents=True, exist_ok=True)
    np.save(args.out / f"{args.fold}-{args.tag}" / "test_prediction.npy", prediction)
    result = {
        "fold": args.fold,
        "tag": args.tag,
        "members": args.ensemble,
        "settings": members[0]["settings"],
        "chosen_step": [m["chosen_step"] for m in members],
        "test": {"mean": float(row["PCC@M"]), "median": float(row["PCC@S"]), "undefined": int(row["n_undefined"])},
    }
    print(f"{args.fold} {args.tag} (mean of {', '.join(args.ensemble)}): {result['test']}", flush=True)
    (RESULTS / f"pixnet_recipe_{args.fold}_{args.tag}.json").write_text(json.dumps(result, indent=1))
    return result


def fold_truth(fold: str) -> np.ndarray:
    """The held-out section's protocol values (spots, genes), in the engine's spot order."""
    from napari_genemap.data.protocols import hist2st
    from napari_genemap.io import counts_table, read_slide

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = counts_table(read_slide(DATA, section=fold))
    protocol = hist2st()
    return protocol.normalise(protocol.counts(table))


def table(out: Path) -> None:
    """Every finished run: the chosen step, test mean PCC, and the change against the fold's baseline with
    its paired bootstrap standard deviation over the test spots (`evaluate.metrics.paired_bootstrap_sd`)."""
    from napari_genemap.evaluate.metrics import paired_bootstrap_sd

    rows = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("pixnet_recipe_*.json"))]
    base = {r["fold"]: r["test"]["mean"] for r in rows if r["tag"] == "baseline"}
    truths: dict[str, np.ndarray] = {}
    print("| fold | recipe | steps | chosen step | test mean PCC | median | change vs baseline (bootstrap sd) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        change = "–"
        if r["fold"] in base and r["tag"] != "baseline":
            change = f"{r['test']['mean'] - base[r['fold']]:+.4f}"
            paths = [out / f"{r['fold']}-{tag}" / "test_prediction.npy" for tag in ("baseline", r["tag"])]
            if all(p.exists() for p in paths):
                truth = truths.setdefault(r["fold"], fold_truth(r["fold"]))
                change += f" ({paired_bootstrap_sd(np.load(paths[0]), np.load(paths[1]), truth):.4f})"
        print(
            f"| {r['fold']} | {r['tag']} | {r['settings']['steps']} | {r['chosen_step']} | "
            f"{r['test']['mean']:.4f} | {r['test']['median']:.4f} | {change} |"
        )


def curves(out: Path) -> Path:
    """Validation (solid) and test (dashed, report only) mean PCC against steps of every run's curve, from
    the finished runs' results and the unfinished ones' ``curve.jsonl``; the chosen step ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {p.parent.name: read_curve(p) for p in sorted(out.glob("*/curve.jsonl"))}
    for path in sorted(RESULTS.glob("pixnet_recipe_*.json")):
        result = json.loads(path.read_text())
        if "curve" in result:
            runs[f"{result['fold']}-{result['tag']}"] = result["curve"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for colour, (name, curve) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], runs.items()):
        steps = [r["step"] for r in curve]
        held_out = split(name.split("-")[0])[0]
        label = f"{name} validation ({held_out})"
        ax.plot(steps, [r["validation"] for r in curve], "-o", ms=3, color=colour, label=label)
        ax.plot(steps, [r["test"] for r in curve], "--", color=colour, label=f"{name} test (report only)")
        chosen = max(curve, key=lambda r: r["validation"])
        ax.plot(chosen["step"], chosen["validation"], "o", ms=10, mfc="none", color=colour)
    ax.set_xlabel("training step (batch 8)")
    ax.set_ylabel("mean PCC over 785 genes (spot-centred windows)")
    ax.set_title("PixNet learning curves, leave-one-section-out (protocol hist2st)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = RESULTS / "pixnet_curves.png"
    fig.savefig(path, dpi=110)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fold", choices=SECTIONS)
    parser.add_argument("--tag", default="baseline")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--minutes", type=float, default=0, help="stop this sitting after so long (0: never)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--mpp", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tta", action="store_true", help="also score the best step with the 8 dihedral views")
    parser.add_argument("--out", type=Path, default=Path("/tmp/pixnet-recipe"))
    parser.add_argument("--ensemble", nargs="+", metavar="TAG", help="score the mean of these finished runs")
    parser.add_argument("--table", action="store_true")
    parser.add_argument("--curves", action="store_true", help="draw every run's curve to results/pixnet_curves.png")
    args = parser.parse_args()
    if args.table:
        table(args.out)
        return 0
    if args.curves:
        print(curves(args.out))
        return 0
    if args.fold is None:
        parser.error("--fold is required (or --table, --curves)")
    if args.ensemble:
        ensemble(args)
        return 0
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
