"""``genemap``: the command line. Thin: parse, call the core, print.

Bad input ends with one line on stderr (``genemap: error: ...``) and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from .errors import GenemapDataWarning, GenemapInputError


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

    run_demo(Path(args.out))
    return 0


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

    demo = sub.add_parser("demo", help="run the main job on the bundled sample")
    demo.add_argument("--out", default="demo_output", help="output folder")
    demo.set_defaults(run=cmd_demo)
    return parser


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    print(f"genemap: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
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
