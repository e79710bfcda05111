"""A short, human-readable summary of a canonical slide."""

from __future__ import annotations

import numpy as np

from .canonical import SPOTS_KEY, TABLE_KEY, image_levels, slide_info, spot_geometry


def describe(sdata) -> str:
    info = slide_info(sdata)
    mpp = info["mpp"]
    levels, scales = image_levels(sdata)
    height, width = (round(s * scales[0]) for s in levels[0].shape[1:])
    lines = [
        f"slide      {info.get('source', '?')} ({info.get('format', '?')}"
        + (f", section {info['section']}" if info.get("section") else "")
        + ")",
        f"image      {width} x {height} px at {mpp:.4f} µm/px "
        f"({width * mpp / 1000:.2f} x {height * mpp / 1000:.2f} mm), {len(levels)} pyramid levels",
    ]
    if TABLE_KEY in sdata.tables and SPOTS_KEY in sdata.shapes:
        table = sdata.tables[TABLE_KEY]
        _, radius = spot_geometry(sdata)
        totals = np.asarray(table.X.sum(1)).ravel()
        lines += [
            f"spots      {table.n_obs} (radius {np.median(radius):.1f} px = {np.median(radius) * mpp:.1f} µm)",
            f"genes      {table.n_vars}",
            f"counts     median {np.median(totals):.0f} per spot (range {totals.min():.0f}-{totals.max():.0f})",
        ]
    else:
        lines.append("spots      none (image only)")
    return "\n".join(lines)
