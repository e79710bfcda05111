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
from .infer.backends import BACKENDS
from .infer.grid import DEFAULT_HALO, DEFAULT_TILE

#: how long ``--scheduler`` may take to answer before the run is refused (seconds)
SCHEDULER_TIMEOUT = 3.0
#: a circle's radius may be at most this many times the slide's longer side (beyond, a unit is wrong)
MAX_RADIUS_SLIDES = 10


class _Parser(argparse.ArgumentParser):
    """argparse with the package's error contract: a bad argument is one line on stderr and exit 2,
    not a usage block (``--help`` still shows it)."""

    def error(self, message: str):
        command = self.prog.removeprefix("genemap").strip()
        where = f"{command}: " if command else ""
        self.exit(2, f"genemap: error: {where}{' '.join(message.split())} (see genemap {command} --help)\n")


def check_output_place(path, what: str, **options) -> Path:
    """`napari_genemap.io.atomic.check_output_place`, imported when used (``genemap --help`` stays quick)."""
    from .io.atomic import check_output_place as check

    return check(path, what, **options)


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

    check_output_place(args.out, "the store", folder=True, make_parents=True)
    sdata = read_slide(args.slide, section=args.section, mpp=args.mpp)
    try:
        out = write_store(sdata, args.out, overwrite=args.overwrite)
    except OSError as error:  # a full disk or a file system gone read-only; the temporary store is removed
        reason = error.strerror or " ".join(str(error).split())
        raise GenemapInputError(f"{args.out}: cannot write the store ({reason})") from None
    print(f"wrote {out}")
    return 0


def cmd_evaluate(args) -> int:
    from .evaluate.tables import evaluate_files
    from .io.atomic import atomic_file

    if args.per_gene:  # before the evaluation: a place that cannot take the file is refused up front
        check_output_place(args.per_gene, "the per-gene correlations")
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
        try:
            with atomic_file(args.per_gene) as temporary:
                evaluation.per_gene.to_csv(temporary)
        except OSError as error:
            raise GenemapInputError(
                f"{args.per_gene}: cannot write the per-gene correlations ({error.strerror or error})"
            ) from None
        print(f"per-gene correlations written to {args.per_gene}")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    out = check_output_place(args.out, "the demo's outputs", folder=True, make_parents=True, inside=True)
    run_demo(out, Path(args.model) if args.model else None)
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
    # saving writes a sibling of the checkpoint folder, then renames: a place that cannot take it is
    # refused now, not at the first save after minutes of training
    check_output_place(config.out, "the checkpoint", folder=True, make_parents=True)
    stop = []
    previous = {
        signum: signal.signal(signum, lambda *_: stop.append(True)) for signum in (signal.SIGINT, signal.SIGTERM)
    }

    from .train.distributed import environment_ranks

    reporting = environment_ranks().main  # under torchrun only rank 0 reports; the others compute shards

    def emit(event: dict) -> None:  # machine-readable progress for the napari training panel and pipelines
        if reporting:
            print(json.dumps(event), flush=True)

    bar = None if args.jsonl or not reporting else tqdm(total=config.steps, desc=f"training {stage.label}", unit="step")

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
    return 0 if summary["checkpoint"] or not reporting else 1  # rank 0 saved it (or says why not)


def cmd_superres(args) -> int:
    """Super-resolve a slide's measured spots with a Diff-ST checkpoint into a SpatialData store."""
    from tqdm import tqdm

    from .infer.superres import write_superres
    from .models.diffst_format import read_diffst_config

    out = Path(args.out)
    if out.suffix != ".zarr":
        raise GenemapInputError(f"--out {out}: a SpatialData store's name must end in .zarr")
    if (out.exists() or out.is_symlink()) and not args.overwrite:
        raise GenemapInputError(f"{out}: already exists (pass --overwrite)")
    if args.samples < 1 or args.steps < 1:
        raise GenemapInputError("--samples and --steps must be at least 1")
    check_output_place(out, "the super-resolved store", folder=True, make_parents=True)
    read_diffst_config(args.model)  # a bad checkpoint fails here, before the slide is read
    bar: list[tqdm] = []

    def progress(done: int, total: int) -> None:
        if not bar:
            bar.append(tqdm(total=total, desc="super-resolving patches", unit="patch"))
        bar[0].update(done - bar[0].n)

    try:
        path = write_superres(
            _resolved(args.slide, "slide"),
            args.model,
            out,
            section=args.section,
            overwrite=args.overwrite,
            samples=args.samples,
            steps=args.steps,
            seed=args.seed,
            device=args.device,
            progress=progress,
        )
    finally:
        for shown in bar:
            shown.close()
    print(f"wrote {path}")
    return 0


def cmd_generate(args) -> int:
    """Draw tiles from a DiffBulk stage-1 model for a profile (a CSV, or a measured spot's tile)."""
    if (args.profile is None) == (args.spot is None):
        raise GenemapInputError("give the expression with one of --profile PROFILE.csv or --spot SLIDE:SPOT")
    if args.n < 1 or args.steps < 1 or args.guidance < 0:
        raise GenemapInputError("--n and --steps must be at least 1 and --guidance at least 0")
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise GenemapInputError(f"--out {out}: expected a file name ending in .png")
    if out.exists() and not args.overwrite:
        raise GenemapInputError(f"{out}: exists; pass --overwrite to replace it")
    check_output_place(out, "the image grid")
    from .models.diffbulk_format import read_stage1_config

    config = read_stage1_config(args.checkpoint)  # one-line errors before torch is imported
    import torch
    from PIL import Image

    from .device import resolve_device
    from .io.atomic import atomic_file
    from .models.diffbulk import load_stage1
    from .models.generate import decoder_for, draw, read_profile, spot_profile, tile_grid

    device = resolve_device(args.device)
    stage1 = load_stage1(args.checkpoint, device)
    model = stage1.model
    used = config.get("provenance", {}).get("taef2") or {}
    decode = decoder_for(model, args.taef2 or used.get("folder"), device)
    real = []
    if args.spot is not None:
        slide, _, spot = args.spot.rpartition(":")
        if not slide or not spot:
            raise GenemapInputError(f"--spot {args.spot!r}: expected SLIDE:SPOT, e.g. her2st:10x12 with --section")
        tile = config.get("tile", {})
        genes, values, image = spot_profile(
            slide, spot, float(tile.get("tile_um", 0) or 0), config.get("protocol", {}), model.tile_px, args.section
        )
        real = [image]
        label = f"spot {spot} of {slide}"
    else:
        genes, values = read_profile(args.profile)
        label = f"profile {args.profile}"
    known = set(model.gene_encoder.genes)
    kept = [i for i, gene in enumerate(genes) if gene in known]
    if not kept:
        raise GenemapInputError(f"{label}: none of its {len(genes)} genes is in the model's vocabulary")
    panel = ([genes[i] for i in kept], values[kept])
    with torch.no_grad():
        condition = model.condition([panel])
    drawn, free = draw(
        model, decode, condition, args.n, steps=args.steps, guidance=args.guidance, seed=args.seed, device=device
    )
    grid = tile_grid([*real, *drawn], list(free), offset=len(real))
    with atomic_file(out) as temporary:
        Image.fromarray(grid).save(temporary, format="PNG")
    print(
        f"{out}: {args.n} tiles drawn for {label} ({len(kept)} of its {len(genes)} genes known; guidance "
        f"{args.guidance:g}, Heun {args.steps} steps, seed {args.seed}) above {args.n} unconditioned, same noise"
    )
    return 0


def cmd_predict(args) -> int:
    from tqdm import tqdm

    from .checkpoints import shipped_checkpoint
    from .device import resolve_device
    from .infer.predict import EngineSpec, predict_slide
    from .models.checkpoint import read_checkpoint_config

    # every argument is checked before anything is read, created or computed
    out = Path(args.out)
    if out.suffix != ".zarr":
        raise GenemapInputError(f"--out {out}: a SpatialData store's name must end in .zarr")
    if (out.exists() or out.is_symlink()) and not args.overwrite:
        raise GenemapInputError(f"{out}: already exists (pass --overwrite)")
    check_output_place(out, "the prediction store", folder=True, make_parents=True)
    cache = Path(args.cache) if args.cache else out.parent / f"{out.name}.cache"
    check_output_place(cache, "the tile cache", folder=True, make_parents=True)
    slide = _resolved(args.slide, "slide")
    from .infer.backends import resolve_backend

    # 'cuda' without CUDA, or a CPU backend on a GPU, is refused before the cache is created
    resolve_backend(args.backend, resolve_device(args.device).type)
    if args.scheduler:
        check_scheduler(args.scheduler)
    checkpoint = Path(args.model) if args.model else shipped_checkpoint()
    read_checkpoint_config(checkpoint)  # a bad checkpoint fails here, before any slide is read
    spec = EngineSpec(
        slide=str(slide),
        checkpoint=str(_resolved(checkpoint, "--model")),
        cache_root=str(_resolved(cache, "--cache")),
        section=args.section,
        mpp=args.mpp,
        tile=args.tile,
        halo=args.halo,
        device=args.device,
        backend=args.backend,
        tta=args.tta,
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
    import numpy as np

    from .explore.rois import circles, circles_outside, roi_table
    from .infer.aggregate import aggregate_circles, read_circles_csv, read_prediction
    from .io.rois import TABLE_SUFFIXES, write_table_files

    # every output is checked before any work and before any is written: all of them appear, or none
    out, h5ad = Path(args.out), Path(args.h5ad) if args.h5ad else None
    if out.suffix not in TABLE_SUFFIXES and not out.is_dir():  # a folder is refused below, as a folder
        raise GenemapInputError(
            f"--out {out}: expected a table file name ending in {', '.join(TABLE_SUFFIXES)} (its format)"
        )
    inputs = {"--circles": Path(args.circles), "the prediction store": Path(args.prediction)}
    what = TABLE_SUFFIXES.get(out.suffix, "the table")
    outputs = {"--out": (out, what)} | ({"--h5ad": (h5ad, "the AnnData file")} if h5ad else {})
    if h5ad is not None and h5ad.suffix != ".h5ad":
        raise GenemapInputError(f"--h5ad {h5ad}: an AnnData file's name must end in .h5ad")
    if h5ad is not None and _same_path(out, h5ad):
        raise GenemapInputError(f"--out and --h5ad are both {out}; expected two different files")
    if h5ad is not None and out.suffix == ".h5ad":
        raise GenemapInputError(f"--out {out} is already the AnnData file; leave out --h5ad {h5ad}")
    for option, (path, what) in outputs.items():
        for name, given in inputs.items():
            if _same_path(path, given):
                raise GenemapInputError(
                    f"{option} {path} is {name}; writing there would replace the input: choose another file"
                )
        if (path.exists() or path.is_symlink()) and not path.is_dir() and not args.overwrite:
            raise GenemapInputError(f"{option} {path}: already exists (pass --overwrite)")
        check_output_place(path, what)

    source = read_prediction(args.prediction)
    centers, radii = read_circles_csv(args.circles, source.slide_mpp)
    height, width = (side * source.pixel_size for side in source.shape)
    too_big = radii > MAX_RADIUS_SLIDES * max(width, height)
    if too_big.any():
        row = int(np.flatnonzero(too_big)[0])
        raise GenemapInputError(
            f"{args.circles}: row {row + 2}: radius {radii[row]:.6g} slide px is more than {MAX_RADIUS_SLIDES} times "
            f"the slide ({width:.0f} x {height:.0f} px); expected radius in slide pixels or radius_um in µm"
        )
    outside = circles_outside(centers, radii, width, height)
    if outside.any():
        first = int(np.flatnonzero(outside)[0])
        warnings.warn(
            f"{args.circles}: {int(outside.sum())} of {len(radii)} circles lie wholly outside the predicted "
            f"map (0-{width:.0f} x 0-{height:.0f} slide px; first: row {first + 2}); their values are 0",
            GenemapDataWarning,
            stacklevel=2,
        )
    table = aggregate_circles(source, centers, radii)
    # the Spots panel's table and files: name, kind, geometry in µm and slide pixels, then the genes
    table = roi_table(circles(centers, radii, table.obs_names), table, source.slide_mpp)
    undefined_rows, undefined_genes = _undefined(table.X)
    if len(undefined_rows):
        warnings.warn(
            f"{args.circles}: {len(undefined_rows)} of {table.n_obs} circles have undefined (NaN or infinite) values "
            f"in {undefined_genes} genes (first: row {undefined_rows[0] + 2}); check the prediction store",
            GenemapDataWarning,
            stacklevel=2,
        )
    kind = {".csv": "csv", ".parquet": "parquet", ".h5ad": "h5ad"}[out.suffix]
    written = write_table_files(table, **{"h5ad": h5ad, kind: out})
    print(
        f"wrote {' and '.join(map(str, written))}: {table.n_obs} circles x {table.n_vars} genes "
        f"(protocol {source.protocol.name})"
    )
    return 0


def _undefined(values, rows: int = 8192) -> tuple[list[int], int]:
    """The rows with a NaN or infinite value, and how many columns have one; a block of rows at a time
    (no float64 or full-size boolean copy of a large table)."""
    import numpy as np

    bad_rows: list[int] = []
    bad_columns = np.zeros(values.shape[1], bool)
    for start in range(0, values.shape[0], rows):
        bad = ~np.isfinite(np.asarray(values[start : start + rows]))
        if bad.any():
            bad_rows.extend((start + np.flatnonzero(bad.any(axis=1))).tolist())
            bad_columns |= bad.any(axis=0)
    return bad_rows, int(bad_columns.sum())


def _same_path(first: Path, second: Path) -> bool:
    """Whether two paths name one file (through links and relative parts; a missing one by its name)."""
    try:
        if first.exists() and second.exists():
            return first.samefile(second)
        return first.resolve() == second.resolve()
    except (OSError, RuntimeError):
        return False


def _resolved(path: str | Path, what: str) -> Path:
    """``path`` made absolute through its links; a link loop is one line, not a RuntimeError."""
    try:
        return Path(path).resolve()
    except (OSError, RuntimeError) as error:
        raise GenemapInputError(f"{path}: cannot follow the {what} path ({error}); expected a file or folder") from None


def check_scheduler(address: str, timeout: float = SCHEDULER_TIMEOUT) -> None:
    """Refuse, within ``timeout`` seconds, a ``tcp://`` / ``tls://`` scheduler address nothing listens at
    (distributed itself waits 30 s, then raises a traceback). Other protocols are left to distributed."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    if parts.scheme not in ("tcp", "tls"):
        return
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host = port = None
    if not host or port is None:
        raise GenemapInputError(f"--scheduler {address}: expected an address like tcp://HOST:8786")
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as error:
        reason = error.strerror or str(error) or type(error).__name__
        raise GenemapInputError(
            f"--scheduler {address}: no scheduler answers at {host}:{port} ({reason}); "
            "start one there (dask scheduler) or leave --scheduler out"
        ) from None


def _validation_line(record: dict) -> str:
    scores = ", ".join(f"{name} {value:.3f}" for name, value in record["validation"].items())
    return f"step {record['step']}: validation mean PCC {scores or '-'}{' (saved)' if record.get('saved') else ''}"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="genemap", description="Spatial gene expression from H&E histology.")
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
    predict.add_argument(
        "--tile",
        type=int,
        default=DEFAULT_TILE,
        help="tile side in model pixels (a multiple of 32, or of a DiffBulk model's feature tile)",
    )
    predict.add_argument("--halo", type=int, default=DEFAULT_HALO, help="context around each tile, model pixels")
    predict.add_argument("--device", default="auto", choices=DEVICES, help="auto: CUDA when present")
    predict.add_argument(
        "--backend",
        default="auto",
        choices=BACKENDS,
        help="what runs the model; auto: OpenVINO on a CPU (bfloat16 where native), torch on a GPU",
    )
    predict.add_argument(
        "--tta",
        action="store_true",
        help="test-time augmentation: each window's map is the mean of its 8 flips and rotations (8x the time)",
    )
    predict.add_argument("--overwrite", action="store_true")
    _add_read_options(predict)
    predict.set_defaults(run=cmd_predict)

    aggregate = sub.add_parser("aggregate", help="integrate predicted gene maps over circles")
    aggregate.add_argument("prediction", help="a store written by 'genemap predict'")
    aggregate.add_argument("--circles", required=True, help="CSV with columns x, y, radius (px) or radius_um")
    aggregate.add_argument(
        "--out",
        required=True,
        help="output table, by its ending: .csv or .parquet (name, kind, x_um, y_um, radius_um, area_um2, "
        "x_px, ..., then the genes) or .h5ad (the AnnData)",
    )
    aggregate.add_argument("--h5ad", help="also write the AnnData (raw integrals in layers['integral'])")
    aggregate.add_argument("--overwrite", action="store_true", help="replace existing output files")
    aggregate.set_defaults(run=cmd_aggregate)

    generate = sub.add_parser("generate", help="draw H&E tiles from a DiffBulk stage-1 model for an expression profile")
    generate.add_argument("checkpoint", help="a DiffBulk stage-1 run folder (or its checkpoint/)")
    generate.add_argument("--profile", help="CSV with columns gene, value (the checkpoint's protocol scale)")
    generate.add_argument("--spot", help="SLIDE:SPOT, a measured spot whose tile's counts are the profile")
    generate.add_argument("--out", required=True, help="the PNG grid: drawn for the profile above, unconditioned below")
    generate.add_argument("--n", type=int, default=8, help="tiles per row")
    generate.add_argument("--guidance", type=float, default=2.0, help="classifier-free guidance weight (0: none)")
    generate.add_argument("--steps", type=int, default=32, help="Heun sampling steps")
    generate.add_argument("--seed", type=int, default=0, help="the noise both rows start from")
    generate.add_argument("--taef2", help="TAEF2 weights folder (default: the one stage 1 was trained with)")
    generate.add_argument("--section", help="section name, for a HER2ST folder given with --spot")
    generate.add_argument("--device", default="auto", choices=DEVICES, help="auto: CUDA when present")
    generate.add_argument("--overwrite", action="store_true")
    generate.set_defaults(run=cmd_generate)

    superres = sub.add_parser(
        "superres", help="super-resolve a slide's measured spots with a Diff-ST checkpoint (mean and spread)"
    )
    superres.add_argument("slide", help="a slide with measured spots")
    superres.add_argument("--model", required=True, help="a Diff-ST run folder (or its checkpoint/)")
    superres.add_argument("--out", required=True, help="output SpatialData store, ending in .zarr")
    superres.add_argument("--samples", type=int, default=8, help="draws per patch: their mean and spread")
    superres.add_argument("--steps", type=int, default=20, help="Heun sampling steps")
    superres.add_argument("--seed", type=int, default=0, help="the same seed draws the same maps")
    superres.add_argument("--device", default="auto", choices=DEVICES, help="auto: CUDA when present")
    superres.add_argument("--section", help="section name, for a HER2ST folder (e.g. B4)")
    superres.add_argument("--overwrite", action="store_true")
    superres.set_defaults(run=cmd_superres)

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
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # a bad argument: its one line is printed; --help exits 0 as argparse does
        if stop.code in (0, None):
            raise
        return stop.code if isinstance(stop.code, int) else 2
    with warnings.catch_warnings():
        warnings.simplefilter("default", GenemapDataWarning)
        warnings.showwarning = _one_line_warning
        try:
            return args.run(args)
        except GenemapInputError as error:
            print(f"genemap: error: {error}", file=sys.stderr)
            return 2
        except OSError as error:  # the file system said no (full disk, read-only, gone): one line, not a traceback
            print(f"genemap: error: {_os_error_line(error)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("genemap: interrupted", file=sys.stderr)
            return 130


def _os_error_line(error: OSError) -> str:
    where = error.filename if error.filename is not None else "a file"
    reason = error.strerror or " ".join(str(error).split()) or type(error).__name__
    return f"{where}: {reason}"


if __name__ == "__main__":
    sys.exit(main())
