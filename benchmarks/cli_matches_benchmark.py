"""Check that ``genemap predict`` + ``genemap aggregate`` reproduce the benchmark's PixNet PCC.

For a held-out section of ``her2st_loo.py`` (its checkpoint and JSON in ``--results``), run the two
commands as a user would (the image found with its spots, circles = the measured spots in a CSV), then
score the table with the benchmark's protocol (hist2st; per-gene Pearson over the section's spots; mean
and median over genes, undefined genes omitted) and print it beside the benchmark's row.
Run: ``.venv/bin/python benchmarks/cli_matches_benchmark.py --section B4 [--results benchmarks/results]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "her2st"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--section", default="B4")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()

    import pandas as pd

    from napari_genemap.data.protocols import hist2st
    from napari_genemap.evaluate.metrics import summarise_unit
    from napari_genemap.io import counts_table, read_slide, spot_geometry

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sdata = read_slide(DATA, section=args.section)
    centers, radii = spot_geometry(sdata)
    work = Path(tempfile.mkdtemp(prefix="genemap-cli-"))
    pd.DataFrame({"x": centers[:, 0], "y": centers[:, 1], "radius": radii}).to_csv(work / "spots.csv", index=False)
    genemap = [sys.executable, "-m", "napari_genemap.cli"]
    image = DATA / "images" / f"{args.section}.jpg"
    checkpoint = args.results / f"pixnet_{args.section}"
    subprocess.run([*genemap, "predict", str(image), "--out", str(work / "pred.zarr"), "--model", str(checkpoint),
                    "--cache", str(work / "cache")], check=True)  # fmt: skip
    subprocess.run([*genemap, "aggregate", str(work / "pred.zarr"), "--circles", str(work / "spots.csv"),
                    "--out", str(work / "table.csv")], check=True)  # fmt: skip
    table = pd.read_csv(work / "table.csv")
    protocol = hist2st()
    row = summarise_unit(table[list(protocol.genes)].to_numpy(), protocol.transform(counts_table(sdata)))
    rows = json.loads((args.results / "her2st_loo.json").read_text())["rows"]
    (reference,) = [r for r in rows if r["test"] == args.section and r["method"] == "PixNet"]
    difference = abs(row["PCC@M"] - reference["mean"])
    print(
        f"{args.section}: CLI mean PCC {row['PCC@M']:.4f} median {row['PCC@S']:.4f}; benchmark mean "
        f"{reference['mean']:.4f} median {reference['median']:.4f}; |difference| {difference:.1e}"
    )


if __name__ == "__main__":
    main()
