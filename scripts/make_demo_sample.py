"""Cut the bundled demo sample from the shared HER2ST data (run once; the result is committed).

The crop is the 2048 x 2048 px window of a section that holds the most spots wholly inside it; the sample
keeps the HER2ST layout (images/, counts/, spots/) so the real HER2ST reader reads it, and only the 785
Hist2ST genes, so it stays about a megabyte.
"""

import argparse
from pathlib import Path

import pandas as pd
from PIL import Image

from napari_genemap.data.protocols import hist2st_genes

Image.MAX_IMAGE_PIXELS = None
SIZE = 2048
SPOT_RADIUS_PX = 73  # 50 µm at 0.686 µm/px, rounded up so that "wholly inside" is strict


def best_window(spots: pd.DataFrame, width: int, height: int) -> tuple[int, int]:
    best, best_count = (0, 0), -1
    for x0 in range(0, width - SIZE, 32):
        for y0 in range(0, height - SIZE, 32):
            inside = (
                (spots.pixel_x - SPOT_RADIUS_PX >= x0)
                & (spots.pixel_x + SPOT_RADIUS_PX < x0 + SIZE)
                & (spots.pixel_y - SPOT_RADIUS_PX >= y0)
                & (spots.pixel_y + SPOT_RADIUS_PX < y0 + SIZE)
            )
            if inside.sum() > best_count:
                best, best_count = (x0, y0), int(inside.sum())
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--her2st", default="../shared/data/her2st")
    parser.add_argument("--section", default="B4")
    parser.add_argument("--out", default="src/napari_genemap/sample/her2st")
    args = parser.parse_args()
    root, out, section = Path(args.her2st), Path(args.out), args.section
    name = f"{section}_crop"

    spots = pd.read_csv(root / "spots" / f"{section}_selection.tsv", sep="\t")
    counts = pd.read_csv(root / "counts" / f"{section}.tsv.gz", sep="\t", index_col=0)
    spots["key"] = [f"{round(x)}x{round(y)}" for x, y in zip(spots.x, spots.y)]
    spots = spots[spots.key.isin(counts.index)]
    image = Image.open(root / "images" / f"{section}.jpg")
    x0, y0 = best_window(spots, *image.size)
    inside = (
        (spots.pixel_x - SPOT_RADIUS_PX >= x0)
        & (spots.pixel_x + SPOT_RADIUS_PX < x0 + SIZE)
        & (spots.pixel_y - SPOT_RADIUS_PX >= y0)
        & (spots.pixel_y + SPOT_RADIUS_PX < y0 + SIZE)
    )
    crop_spots = spots[inside].copy()
    crop_spots["pixel_x"] -= x0
    crop_spots["pixel_y"] -= y0

    for sub in ("images", "counts", "spots"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    image.crop((x0, y0, x0 + SIZE, y0 + SIZE)).save(out / "images" / f"{name}.jpg", quality=90, optimize=True)
    genes = list(hist2st_genes())
    counts.loc[crop_spots.key, genes].to_csv(out / "counts" / f"{name}.tsv.gz", sep="\t")
    columns = ["x", "y", "new_x", "new_y", "pixel_x", "pixel_y", "selected"]
    crop_spots[columns].round(2).to_csv(out / "spots" / f"{name}_selection.tsv", sep="\t", index=False)
    print(f"{section}: window x={x0}, y={y0}, {SIZE} px; {len(crop_spots)} spots; written to {out}")


if __name__ == "__main__":
    main()
