"""How far apart are the shared HER2ST sections' stains? (Issue 13: can stain normalisation matter here?)

For each section, its Macenko stains (from its overview level, as the tile engine estimates them) against
the pooled stains of the other four: the angle between the haematoxylin vectors and between the eosin
vectors, the ratio of maximum concentrations, and how much normalising the section to the others' stains
moves its tissue pixels (mean absolute change, grey levels, over overview pixels darker than 200).

    python benchmarks/stain_spread.py
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "her2st"
SECTIONS = ("B4", "C2", "C3", "C4", "C5")


def main() -> None:
    from napari_genemap.data.stain import apply_od_matrix, fit_stains, normalising_matrix
    from napari_genemap.io import read_slide
    from napari_genemap.io.canonical import overview_pixels

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the readers' notes on dropped spots are checked in the tests
        pixels = {s: overview_pixels(read_slide(DATA, section=s)) for s in SECTIONS}
    print("| section | H angle (°) | E angle (°) | max concentration ratio H, E | mean change on tissue |")
    print("|---|---|---|---|---|")
    for section in SECTIONS:
        others = fit_stains(np.concatenate([pixels[o].reshape(-1, 3) for o in SECTIONS if o != section]))
        own = fit_stains(pixels[section])
        angles = np.degrees(np.arccos(np.clip((own.vectors * others.vectors).sum(0), -1, 1)))
        ratio = others.max_concentration / own.max_concentration
        image = pixels[section]
        moved = apply_od_matrix(image, normalising_matrix(own, others)).astype(int)
        tissue = image.astype(int).mean(-1) < 200
        change = np.abs(moved - image.astype(int))[tissue].mean()
        print(
            f"| {section} | {angles[0]:.1f} | {angles[1]:.1f} | {ratio[0]:.2f}, {ratio[1]:.2f} | "
            f"{change:.1f} grey levels |"
        )


if __name__ == "__main__":
    main()
