"""``make demo``: the main job on the bundled sample.

1. Read the sample (a 2048 px crop of HER2ST B4, 49 measured spots), write it as a SpatialData store and
   check that ``spatialdata.read_zarr`` gives back the same slide.
2. Predict its dense gene map with the shipped PixNet checkpoint, integrate the map over the measured
   spots' disks and over circles of 25, 50 and 200 µm radius at the same centres, print each one's
   Pearson correlation with the measured spots, and write a CSV and an overview PNG.

The shipped model was trained on all five shared HER2ST sections, B4 included, so the correlations
here show that the pipeline works end to end, not how well it generalises (the leave-one-section-out
benchmark says that).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

DEMO_RADII_UM = (25.0, 50.0, 200.0)


def same_slide(first, second) -> list[str]:
    """What differs between two canonical slides (empty when they are the same)."""
    from .io import counts_table, image_levels, slide_info, spot_geometry

    differences = []
    levels_a, scales_a = image_levels(first)
    levels_b, scales_b = image_levels(second)
    if len(levels_a) != len(levels_b) or not np.allclose(scales_a, scales_b):
        differences.append("image pyramid levels")
    elif not np.array_equal(np.asarray(levels_a[0]), np.asarray(levels_b[0])):
        differences.append("image pixels")
    centers_a, radius_a = spot_geometry(first)
    centers_b, radius_b = spot_geometry(second)
    if not (np.array_equal(centers_a, centers_b) and np.array_equal(radius_a, radius_b)):
        differences.append("spot geometry")
    table_a, table_b = counts_table(first), counts_table(second)
    if not (
        list(table_a.obs_names) == list(table_b.obs_names)
        and list(table_a.var_names) == list(table_b.var_names)
        and (table_a.X != table_b.X).nnz == 0
    ):
        differences.append("counts")
    if slide_info(first) != slide_info(second):
        differences.append("pixel size / provenance")
    return differences


def predict_sample_spots(sdata, checkpoint) -> dict:
    """The dense map of a whole (small) slide and its integrals over the measured spots and demo radii.

    Returns the map, the model, the spots' centres (slide px) and, per radius label, raw-scale integrals
    (spots, genes)."""
    import torch

    from .data.windows import slide_image_at
    from .io import slide_mpp, spot_geometry
    from .models.aggregation import aggregate_disks
    from .models.checkpoint import load_checkpoint
    from .models.predict import predict_map

    loaded = load_checkpoint(checkpoint)
    image = slide_image_at(sdata, loaded.mpp)
    density = predict_map(loaded.model, image)
    centers, radii = spot_geometry(sdata)
    factor = loaded.mpp / slide_mpp(sdata)  # slide px per model px
    dense = torch.from_numpy(density)
    radius_sets = {"measured": radii / factor} | {
        f"{r:g}um": np.full(len(radii), r / loaded.mpp) for r in DEMO_RADII_UM
    }
    integrals = {
        label: aggregate_disks(
            dense, torch.from_numpy(centers / factor), torch.from_numpy(values), loaded.stride
        ).numpy()
        for label, values in radius_sets.items()
    }
    radii_um = {label: values * loaded.mpp for label, values in radius_sets.items()}
    return {
        "model": loaded,
        "image": image,
        "density": density,
        "centers": centers,
        "integrals": integrals,
        "radii_um": radii_um,
    }


def run_demo(out: Path, checkpoint: Path | None = None) -> None:
    import pandas as pd
    import spatialdata as sd

    from .checkpoints import shipped_checkpoint
    from .evaluate.metrics import summarise_unit
    from .io import counts_table, write_store
    from .io.summary import describe
    from .sample import read_sample

    out.mkdir(parents=True, exist_ok=True)
    sdata = read_sample()
    print(describe(sdata))
    store = write_store(sdata, out / "sample.zarr", overwrite=True)
    differences = same_slide(sdata, sd.read_zarr(store))
    if differences:
        raise RuntimeError(f"{store}: read back differently ({', '.join(differences)})")
    print(f"wrote {store}; spatialdata.read_zarr reads it back unchanged\n")

    result = predict_sample_spots(sdata, checkpoint or shipped_checkpoint())
    loaded = result["model"]
    protocol = loaded.protocol
    measured = protocol.transform(counts_table(sdata))
    print(
        f"PixNet checkpoint {loaded.path.name}: {len(loaded.genes)} genes, {loaded.mpp:g} µm/px, stride "
        f"{loaded.stride}; map {result['density'].shape[1]} x {result['density'].shape[2]} px"
    )
    print(
        f"Pearson with the {len(measured)} measured spots (protocol {protocol.name}: counts over the "
        f"{protocol.n_genes} genes scaled to {protocol.target_sum:g}, {protocol.log}(1 + x); per gene across "
        f"the spots, then mean and median over genes; undefined genes omitted and counted; {_seen_b4(loaded)}):"
    )
    rows, tables = [], []
    for label, raw in result["integrals"].items():
        profile = protocol.normalise(raw)
        summary = summarise_unit(profile, measured)
        radius = result["radii_um"][label]
        rows.append(
            {
                "circle": label,
                "radius_um": f"{radius.min():.1f}"
                if np.ptp(radius) < 0.05
                else f"{radius.min():.1f}-{radius.max():.1f}",
                "mean_pcc": round(summary["PCC@M"], 3),
                "median_pcc": round(summary["PCC@S"], 3),
                "undefined": summary["n_undefined"],
                "mean_total_counts": round(float(raw.sum(1).mean()), 1),
            }
        )
        table = pd.DataFrame(profile, columns=list(loaded.genes))
        table.insert(0, "radius_um", radius)
        table.insert(0, "circle", label)
        table.insert(0, "y", result["centers"][:, 1])
        table.insert(0, "x", result["centers"][:, 0])
        table.insert(0, "spot", counts_table(sdata).obs_names)
        tables.append(table)
    print(pd.DataFrame(rows).to_string(index=False))
    print(
        f"(measured spots: mean total counts over the genes {protocol.counts(counts_table(sdata)).sum(1).mean():.1f})"
    )
    csv = out / "spot_predictions.csv"
    pd.concat(tables).to_csv(csv, index=False, float_format="%.4g")
    png = write_overview(out / "overview.png", sdata, result, measured)
    print(f"\nwrote {csv} (one row per spot and circle; x, y in slide px; protocol values) and {png}")


def write_overview(path: Path, sdata, result: dict, measured: np.ndarray) -> Path:
    """H&E, the dense maps of three genes, and one gene measured vs predicted at the spots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .evaluate.metrics import pearson_per_gene
    from .io import slide_mpp

    loaded = result["model"]
    genes = list(loaded.genes)
    predicted = loaded.protocol.normalise(result["integrals"]["measured"])
    pcc = np.nan_to_num(pearson_per_gene(predicted, measured), nan=-1)
    best = np.argsort(pcc)[::-1][:3]
    image, density = result["image"], result["density"]
    extent = (0, image.shape[1] * loaded.mpp, image.shape[0] * loaded.mpp, 0)  # µm
    map_extent = (0, density.shape[2] * loaded.stride * loaded.mpp, density.shape[1] * loaded.stride * loaded.mpp, 0)
    centres_um = result["centers"] * slide_mpp(sdata)
    figure, axes = plt.subplots(2, 3, figsize=(13, 8.5), layout="constrained")
    axes[0, 0].imshow(image, extent=extent)
    axes[0, 0].set_title("H&E (HER2ST B4 crop)")
    for axis, gene in zip([axes[0, 1], axes[0, 2], axes[1, 0]], best, strict=True):
        shown = axis.imshow(density[gene], extent=map_extent, cmap="magma")
        axis.set_xlim(extent[0], extent[1])
        axis.set_ylim(extent[2], extent[3])
        axis.set_title(f"{genes[gene]}: predicted density (PCC {pcc[gene]:.2f})")
        figure.colorbar(shown, ax=axis, shrink=0.7, label="counts / map pixel")
    gene = best[0]
    for axis, values, title in (
        (axes[1, 1], measured[:, gene], f"{genes[gene]} measured"),
        (axes[1, 2], predicted[:, gene], f"{genes[gene]} predicted at the spots"),
    ):
        axis.imshow(image, extent=extent, alpha=0.5)
        spots = axis.scatter(*centres_um.T, c=values, s=180, cmap="viridis", edgecolors="k", linewidths=0.3)
        axis.set_title(f"{title} (own colour scale)")
        figure.colorbar(spots, ax=axis, shrink=0.7, label="log10(1 + counts per 1e4)")
    for axis in axes.flat:
        axis.set_xlabel("µm")
    figure.suptitle(
        "napari-genemap demo: PixNet dense maps integrated over the measured spots (genes best on this crop)"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    from .io.atomic import atomic_file

    with atomic_file(path, ".png") as temporary:
        figure.savefig(temporary, dpi=90)
    plt.close(figure)
    return path


def _seen_b4(loaded) -> str:
    """Whether the checkpoint trained on section B4, which the sample is cut from."""
    sections = {str(s.get("section") or s.get("name")) for s in loaded.provenance.get("training", [])}
    return (
        "the model trained on B4, so this shows the pipeline, not generalisation"
        if "B4" in sections
        else ("B4 was not among the model's training sections")
    )
