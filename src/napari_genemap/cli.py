"""``genemap``: the command line. Thin: parse, call the core, print.

Bad input ends with one line on stderr (``genemap: error: ...``) and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from .device import DEVICES
from .errors import GenemapDataWarning, GenemapInputError
from .infer.grid import DEFAULT_HALO, DEFAULT_TILE


def _add_read_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--section", help="section name, for a HER2ST folder (e.g. B4)")
    parser.add_argument("--mpp", type=float, help="µm per pixel, when the image does not say")


def cmd_info(args) -> int:
    from .io import read_slide
    from .io.summary import describe

    print(describe(read_slide(args.slide, section=args.section, mpp=args.mpp)))
    return 0


def cmd_convert(args) -> int:
    from .io import read_slide, write_store

    sdata = read_slide(args.slide, section=args.section, mpp=args.mpp)
    out = write_store(sdata, args.out, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


def cmd_evaluate(args) -> int:
    from .evaluate.tables import evaluate_files

    evaluation = evaluate_files(
        args.prediction,
        args.truth,
        protocol=args.protocol,
        section=args.section,
        pooling=args.pooling,
        nan_policy=args.nan_policy,
    )
    print(evaluation.describe())
    print(evaluation.summary.to_string(float_format=lambda v: f"{v:.4f}"))
    if args.per_gene:
        evaluation.per_gene.to_csv(args.per_gene)
        print(f"per-gene correlations written to {args.per_gene}")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(Path(args.out), Path(args.model) if args.model else None)
    return 0


def cmd_train(args) -> int:
    """Train in this process; SIGINT/SIGTERM stop after the current step, keeping the best checkpoint."""
    import json
    import signal

    from tqdm import tqdm

    from .train.stages import stage_named, stage_runner

    stage = stage_named(args.model)
    config_class, run = stage_runner(stage)
    config = config_class.from_file(args.config)
    if args.out:
        config.out = args.out
    if args.resume:
        config.resume = args.resume
    stop = []
    previous = {
        signum: signal.signal(signum, lambda *_: stop.append(True)) for signum in (signal.SIGINT, signal.SIGTERM)
    }

    def emit(event: dict) -> None:  # machine-readable progress for the napari training panel and pipelines
        print(json.dumps(event), flush=True)

    bar = None if args.jsonl else tqdm(total=config.steps, desc=f"training {stage.label}", unit="step")

    def progress(done: int, total: int, message: str) -> None:
        if bar is not None:
            bar.update(done - bar.n)
            bar.set_postfix_str(message)

    def on_metrics(record: dict) -> None:
        if bar is None:
            emit({"event": "step", "total": config.steps, **record})
        elif "validation" in record:
            bar.write(_validation_line(record))

    try:
        summary = run(config, progress=progress, on_metrics=on_metrics, cancel=lambda: bool(stop))
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    result = {k: summary[k] for k in ("checkpoint", "best_validation", "steps", "cancelled", "seconds")}
    if bar is None:
        emit({"event": "done", **result})
    else:
        bar.close()
        print(
            f"{'cancelled' if summary['cancelled'] else 'finished'} after {summary['steps']} steps; "
            f"checkpoint: {summary['checkpoint']}"
        )
    return 0 if summary["checkpoint"] else 1


def cmd_predict(args) -> int:
    from tqdm import tqdm

    from .checkpoints import shipped_checkpoint
    from .infer.predict import EngineSpec, predict_slide
    from .models.checkpoint import read_checkpoint_config

    checkpoint = Path(args.model) if args.model else shipped_checkpoint()
    read_checkpoint_config(checkpoint)  # a bad checkpoint fails here, before any slide is read
    out = Path(args.out)
    spec = EngineSpec(
        slide=str(Path(args.slide).resolve()),
        checkpoint=str(checkpoint.resolve()),
        cache_root=str(Path(args.cache).resolve() if args.cache else out.resolve().parent / f"{out.name}.cache"),
        section=args.section,
        mpp=args.mpp,
        tile=args.tile,
        halo=args.halo,
        device=args.device,
    )
    bars: list[tqdm] = []  # the bar appears with the first finished task, so an early error stays one line

    def progress(done: int, total: int, message: str) -> None:
        if not bars:
            bars.append(tqdm(total=total, desc="predicting", unit="task"))
        bars[0].update(done - bars[0].n)
        bars[0].set_postfix_str(message)

    genes = [g.strip() for g in args.genes.split(",")] if args.genes else None
    try:
        summary = predict_slide(
            spec, out, genes=genes, scheduler=args.scheduler, overwrite=args.overwrite, progress=progress
        )
    finally:
        for bar in bars:
            bar.close()
    print(
        f"wrote {out}: {summary['tiles']} tiles ({summary['tissue_tiles']} with tissue), "
        f"{summary['cached_before']} already cached, {summary['predicted']} predicted; cache {summary['cache']}"
    )
    return 0


def cmd_aggregate(args) -> int:
    from .explore.rois import circles, roi_table
    from .infer.aggregate import aggregate_circles, read_circles_csv, read_prediction
    from .io.rois import write_csv, write_h5ad

    source = read_prediction(args.prediction)
    centers, radii = read_circles_csv(args.circles, source.slide_mpp)
    table = aggregate_circles(source, centers, radii)
    # the Spots panel's table and files: name, kind, geometry in µm and slide pixels, then the genes
    table = roi_table(circles(centers, radii, table.obs_names), table, source.slide_mpp)
    out = write_csv(table, args.out)
    if args.h5ad:
        write_h5ad(table, args.h5ad)
    print(f"wrote {out}: {table.n_obs} circles x {table.n_vars} genes (protocol {source.protocol.name})")
    return 0


def _validation_line(record: dict) -> str:
    scores = ", ".join(f"{name} {value:.3f}" for name, value in record["validation"].items())
    return f"step {record['step']}: validation mean PCC {scores or '-'}{' (saved)' if record.get('saved') else ''}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="genemap", description="Spatial gene expression from H&E histology.")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="summarise a slide (spots, genes, µm/px)")
    info.add_argument("slide")
    _add_read_options(info)
    info.set_defaults(run=cmd_info)

    convert = sub.add_parser("convert", help="read a slide and write it as a SpatialData .zarr store")
    convert.add_argument("slide")
    convert.add_argument("out", help="output store, ending in .zarr")
    convert.add_argument("--overwrite", action="store_true")
    _add_read_options(convert)
    convert.set_defaults(run=cmd_convert)

    evaluate = sub.add_parser("evaluate", help="compare predicted with measured spot expression")
    evaluate.add_argument(
        "prediction", help="CSV or .h5ad: one row per spot (named as in the truth), one column per gene"
    )
    evaluate.add_argument("truth", help="a slide with measured spots, or a CSV / .h5ad of raw counts")
    evaluate.add_argument("--protocol", default="hist2st", help="hist2st, triplex, hest, or a protocol .json")
    evaluate.add_argument("--section", help="section name, for a HER2ST folder")
    evaluate.add_argument("--pooling", choices=["section", "pooled"], default="section")
    evaluate.add_argument("--nan-policy", choices=["omit", "zero"], default="omit")
    evaluate.add_argument("--per-gene", help="write per-gene correlations to this CSV")
    evaluate.set_defaults(run=cmd_evaluate)

    from .train.stages import STAGES  # torch-free; the stages registered so far

    train = sub.add_parser("train", help="train a model on slides with measured spots")
    train.add_argument("model", choices=[s.command for s in STAGES], help="which model to train")
    train.add_argument("--config", required=True, help="a .toml or .json training config (see examples/)")
    train.add_argument("--out", help="checkpoint folder (overrides the config's 'out')")
    train.add_argument("--jsonl", action="store_true", help="print progress as JSON lines on stdout")
    train.add_argument("--resume", metavar="CHECKPOINT", help="continue from this checkpoint's weights and step count")
    train.set_defaults(run=cmd_train)

    predict = sub.add_parser("predict", help="predict a whole slide's gene maps into a SpatialData store")
    predict.add_argument("slide")
    predict.add_argument("--out", required=True, help="output SpatialData store, ending in .zarr")
    predict.add_argument("--model", help="checkpoint folder (default: the shipped PixNet)")
    predict.add_argument("--genes", help="comma-separated genes to write (default: all the model's genes)")
    predict.add_argument("--scheduler", help="address of a running dask.distributed scheduler")
    predict.add_argument("--cache", help="tile cache folder (default: OUT.cache beside the output)")
    predict.add_argument("--tile", type=int, default=DEFAULT_TILE, help="tile side in model pixels (multiple of 32)")
    predict.add_argument("--halo", type=int, default=DEFAULT_HALO, help="context around each tile, model pixels")
    predict.add_argument("--device", default="auto", choices=DEVICES, help="auto: CUDA when present")
    predict.add_argument("--overwrite", action="store_true")
    _add_read_options(predict)
    predict.set_defaults(run=cmd_predict)

    aggregate = sub.add_parser("aggregate", help="integrate predicted gene maps over circles")
    aggregate.add_argument("prediction", help="a store written by 'genemap predict'")
    aggregate.add_argument("--circles", required=True, help="CSV with columns x, y, radius (px) or radius_um")
    aggregate.add_argument(
        "--out",
        required=True,
        help="output CSV: name, kind, x_um, y_um, radius_um, area_um2, x_px, ..., then the genes",
    )
    aggregate.add_argument("--h5ad", help="also write the AnnData (raw integrals in layers['integral'])")
    aggregate.set_defaults(run=cmd_aggregate)

    demo = sub.add_parser("demo", help="run the main job on the bundled sample")
    demo.add_argument("--out", default="demo_output", help="output folder")
    demo.add_argument("--model", help="checkpoint folder (default: the shipped PixNet)")
    demo.set_defaults(run=cmd_demo)
    return parser


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    print(f"genemap: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    from .log import configure_logging  # GENEMAP_LOG_LEVEL

    configure_logging()
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("default", GenemapDataWarning)
        warnings.showwarning = _one_line_warning
        try:
            return args.run(args)
        except GenemapInputError as error:
            print(f"genemap: error: {error}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("genemap: interrupted", file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())
