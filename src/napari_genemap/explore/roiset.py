"""The ROIs of the Spots panel and their expression, kept without a viewer (no Qt, no napari).

The panel hands over its shapes (`RoiState`) after every change; `RoiSet` keeps each ROI's profile by its
geometry, so adding one circle aggregates that circle only and moving or reshaping an ROI computes it
again. One aggregation request is in flight at a time: a change meanwhile asks for another when it
answers, and an answer to a forgotten request (another slide or model) is dropped. A store reopened
without a model shows the expression saved with its ROIs until a model recomputes it, and undo steps back
through snapshots of the shapes (`RoiHistory`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ..errors import GenemapInputError
from ..io.rois import SavedExpression
from .rois import circle_from_ellipse, polygon_area, renamed, roi_kind, roi_table, rois_from_shapes

if TYPE_CHECKING:
    import anndata as ad
    import geopandas as gpd

Profile = tuple[np.ndarray, np.ndarray]  # (X row, integral row) of one ROI


@dataclass(frozen=True, eq=False)
class RoiState:
    """The ROIs as the shapes layer holds them: vertices ((row, column), slide pixels), shape types, names."""

    data: tuple[np.ndarray, ...]
    types: tuple[str, ...]
    names: tuple[str, ...]

    @classmethod
    def of(cls, data: Sequence[np.ndarray], types: Sequence[str], names: Sequence[str]) -> RoiState:
        return cls(tuple(np.array(v, dtype=np.float64) for v in data), tuple(map(str, types)), tuple(map(str, names)))

    def same(self, other: RoiState) -> bool:
        return (
            self.types == other.types
            and self.names == other.names
            and all(a.shape == b.shape and np.array_equal(a, b) for a, b in zip(self.data, other.data))
        )


class RoiHistory:
    """Snapshots of the ROIs after each add, delete, move or rename (the last is the present); undo steps back."""

    def __init__(self, limit: int = 200):
        self.limit = limit
        self._states: list[RoiState] = []

    def __len__(self) -> int:
        return len(self._states)

    def record(self, state: RoiState) -> None:
        """Remember ``state`` when it differs from the last one (re-sent events add nothing)."""
        if self._states and self._states[-1].same(state):
            return
        self._states.append(state)
        del self._states[: -self.limit]

    def undo(self, present: RoiState) -> RoiState | None:
        """The state before ``present`` (which is recorded first, so an unrecorded change is undone too),
        or None when there is nothing to go back to."""
        self.record(present)
        if len(self._states) < 2:
            return None
        self._states.pop()
        return self._states[-1]


@dataclass(frozen=True, eq=False)
class Roi:
    """One shape: its name, napari shape type, ROI kind (None for lines and paths) and vertices."""

    name: str
    shape_type: str
    kind: str | None
    vertices: np.ndarray  # (row, column), slide pixels

    @property
    def key(self) -> tuple:
        """The geometry, rounded: what a profile is kept by (a renamed ROI keeps its profile)."""
        if self.kind == "circle":
            return ("circle", *np.round(circle_from_ellipse(self.vertices), 4))
        return (str(self.kind), *np.round(self.vertices, 4).ravel())

    def size_text(self, mpp: float) -> str:
        """The radius of a circle or the area of a polygon in µm, as the table shows it."""
        if self.kind == "circle":
            return f"r {circle_from_ellipse(self.vertices)[2] * mpp:.1f} µm"
        if self.kind == "polygon":
            return f"{polygon_area(self.vertices) * mpp**2:,.0f} µm²"
        return "no area"


@dataclass(frozen=True)
class Request:
    """What to send the tile service: ``rois`` named by position (None when none is valid) and a status line."""

    number: int
    rois: gpd.GeoDataFrame | None
    message: str


class RoiSet:
    """The panel's ROIs, their profiles by geometry, the request in flight, the saved table and the undo history."""

    def __init__(self) -> None:
        self.state = RoiState.of([], [], [])
        self.rois: list[Roi] = []
        self.history = RoiHistory()
        self.saved: SavedExpression | None = None  # what the ROI layer's store holds
        self._saved_rows: dict[tuple, Profile] = {}  # geometry key -> saved profile
        self._results: dict[tuple, Profile] = {}  # geometry key -> the running model's profile
        self._genes: list[str] = []
        self._uns: dict = {}
        self._request = 0
        self._in_flight: list[tuple] | None = None  # keys of the request the service is working on
        self._again = False  # shapes changed while a request was in flight

    # --- the shapes ----------------------------------------------------------------------------------------
    def update(self, state: RoiState) -> None:
        """Take the layer's shapes as they are now."""
        self.state = state
        self.rois = [
            Roi(name, shape_type, roi_kind(shape_type), np.asarray(vertices, dtype=np.float64)[:, -2:])
            for vertices, shape_type, name in zip(state.data, state.types, state.names)
        ]

    def names(self) -> list[str]:
        return list(self.state.names)

    def rename(self, row: int, name: str) -> list[str]:
        """All names with ROI ``row`` renamed (see `rois.renamed`); the layer applies them."""
        return renamed(self.names(), row, name)

    def record(self) -> None:
        """Remember the present shapes for undo."""
        self.history.record(self.state)

    def undo(self) -> RoiState | None:
        """The shapes before the last add, delete, move or rename, or None when there is nothing to undo."""
        return self.history.undo(self.state)

    def restart_history(self) -> None:
        """Undo starts again from the present shapes (a new layer)."""
        self.history = RoiHistory()
        self.record()

    # --- aggregation ---------------------------------------------------------------------------------------
    def waiting(self) -> list[Roi]:
        """The ROIs with an area and no profile from the running model, one per geometry."""
        keys, waiting = set(), []
        for roi in self.rois:
            if roi.kind is not None and roi.key not in self._results and roi.key not in keys:
                keys.add(roi.key)
                waiting.append(roi)
        return waiting

    @property
    def in_flight(self) -> bool:
        return self._in_flight is not None

    def request(self, can_compute: bool) -> Request | None:
        """The next request for the ROIs without a profile, or None when there is nothing to send now
        (nothing waits, or a request is in flight: then another follows its answer, see `take_again`).
        Without a model (``can_compute`` False) it only says why nothing is computed."""
        if self._in_flight is not None:
            self._again = True
            return None
        waiting = self.waiting()
        if not waiting:
            return None
        if not can_compute:
            if self.saved is not None and all(roi.key in self._saved_rows for roi in waiting):
                return Request(self._request, None, self.saved.note())
            return Request(
                self._request, None, "choose a slide and model (Slide & model) to compute the ROIs' expression"
            )
        valid, rois, problem = _valid(waiting)
        if rois is None:
            return Request(self._request, None, problem)
        self._request += 1
        self._in_flight = [roi.key for roi in valid]
        return Request(self._request, rois, f"computing the expression of {len(valid)} ROIs…")

    def answer(self, number: int, table: ad.AnnData | None, model: str) -> bool:
        """Take the answer to request ``number`` (``table`` None after an error), computed by ``model``;
        False, and nothing kept, when the request was forgotten since."""
        if number != self._request or self._in_flight is None:
            return False
        keys, self._in_flight = self._in_flight, None
        if table is not None:
            values = np.asarray(table.X, dtype=np.float32)
            integral = np.asarray(table.layers["integral"], dtype=np.float32)
            for position, key in enumerate(keys):
                self._results[key] = (values[position], integral[position])
            present = {roi.key for roi in self.rois}
            self._results = {key: row for key, row in self._results.items() if key in present}
            self._genes = [str(g) for g in table.var_names]
            self._uns = {**dict(table.uns.get("genemap") or {}), "model": model}
        return True

    def take_again(self) -> bool:
        """Whether the ROIs changed while the last request was in flight (then ask again); clears it."""
        again, self._again = self._again, False
        return again

    def forget(self) -> None:
        """Profiles of another slide or model are no use: drop them and any answer still on its way."""
        self._results.clear()
        self._request += 1
        self._in_flight, self._again = None, False

    def abandon(self) -> None:
        """The service died with a request in flight: stop waiting for its answer."""
        if self._in_flight is not None:
            self._request += 1
            self._in_flight = None

    # --- the saved table -----------------------------------------------------------------------------------
    def load_saved(self, saved: SavedExpression | None) -> bool:
        """Show ``saved``'s profiles for the ROIs it names (by geometry) until recomputed; True when any."""
        self.saved, self._saved_rows = saved, {}
        if saved is None:
            return False
        for roi in self.rois:
            row = saved.rows.get(roi.name)
            if row is not None and roi.kind is not None:
                self._saved_rows[roi.key] = row
        return bool(self._saved_rows)

    def drop_saved(self) -> None:
        self.saved, self._saved_rows = None, {}

    def change_slide(self, store: str | os.PathLike | None) -> None:
        """Another slide is open (read from the store at ``store``, or not from a store): the running model's
        profiles go (see `forget`), and the saved table too unless it came from that store."""
        if self.saved is not None and (store is None or Path(store).resolve() != Path(self.saved.source).resolve()):
            self.drop_saved()
        self.forget()

    # --- values --------------------------------------------------------------------------------------------
    def genes(self) -> list[str]:
        """The running model's genes once it has answered, else those of the saved table."""
        if self._genes or self.saved is None or not self._saved_rows:
            return self._genes
        return self.saved.genes

    def value_label(self) -> str:
        """What the values are, in words (the plot's axis)."""
        return self._uns.get("X", "protocol-normalised expression")

    def profile(self, roi: Roi) -> Profile | None:
        """An ROI's (X, integral): the running model's, else the store's saved one (for the same genes)."""
        row = self._results.get(roi.key)
        if row is None and self.saved is not None and self.genes() == self.saved.genes:
            row = self._saved_rows.get(roi.key)
        return row

    def table(self, mpp: float) -> pd.DataFrame:
        """What the panel lists: name, kind, size (as text), then the genes' values (NaN while pending)."""
        genes = self.genes()
        values = np.full((len(self.rois), len(genes)), np.nan)
        for row, roi in enumerate(self.rois):
            profile = self.profile(roi)
            if profile is not None:
                values[row] = profile[0]
        fixed = pd.DataFrame(
            {
                "name": [roi.name for roi in self.rois],
                "kind": [roi.kind or roi.shape_type for roi in self.rois],
                "size": [roi.size_text(mpp) for roi in self.rois],
            }
        )
        return pd.concat([fixed, pd.DataFrame(values, columns=genes, index=fixed.index)], axis=1)

    def expression(self, names: list[str] | None = None) -> ad.AnnData:
        """The ROIs with a profile (all, or ``names``) as an AnnData named by ROI."""
        import anndata as ad

        known = {roi.name: self.profile(roi) for roi in self.rois}
        profiles = {name: row for name, row in known.items() if row is not None}
        names = list(profiles) if names is None else names
        missing = [name for name in names if name not in profiles]
        if missing:
            raise GenemapInputError(f"no expression for ROI {missing[0]!r} yet")
        rows = [profiles[name] for name in names]
        width = len(self.genes())
        table = ad.AnnData(
            X=np.vstack([row[0] for row in rows]) if rows else np.zeros((0, width), np.float32),
            obs=pd.DataFrame(index=pd.Index(names, name="roi", dtype=object)),
            var=pd.DataFrame(index=pd.Index(self.genes(), name="gene")),
            layers={"integral": np.vstack([row[1] for row in rows]) if rows else np.zeros((0, width), np.float32)},
        )
        # the running model's values say which model made them, for whoever reopens the export
        table.uns["genemap"] = dict(self._uns) if self._genes else dict(self.saved.uns) if self.saved else {}
        return table

    def export(self, mpp: float) -> tuple[gpd.GeoDataFrame, ad.AnnData]:
        """(ROIs as a GeoDataFrame in slide pixels, their `rois.roi_table`), ready to write."""
        rois = [roi for roi in self.rois if roi.kind is not None]
        if not rois:
            raise GenemapInputError("there are no circles or polygons to export; draw some first")
        waiting = [roi.name for roi in rois if self.profile(roi) is None]
        if waiting:
            raise GenemapInputError(f"expression of {len(waiting)} ROIs (e.g. {waiting[0]!r}) is still being computed")
        names = [roi.name for roi in rois]
        gdf = rois_from_shapes([r.vertices for r in rois], [r.shape_type for r in rois], names)
        return gdf, roi_table(gdf, self.expression(names), mpp)


def _by_position(rois: list[Roi]) -> gpd.GeoDataFrame:
    """``rois`` as geometry named by position: the service answers in that order."""
    return rois_from_shapes([r.vertices for r in rois], [r.shape_type for r in rois], list(map(str, range(len(rois)))))


def _valid(rois: list[Roi]) -> tuple[list[Roi], gpd.GeoDataFrame | None, str]:
    """The ROIs that make valid geometry, that geometry (`_by_position`; None when none is valid) and a line
    on the first of the others ("" when all are valid)."""
    try:
        return rois, _by_position(rois), ""
    except GenemapInputError:
        pass
    good, errors = [], []
    for roi in rois:
        try:
            _by_position([roi])
            good.append(roi)
        except GenemapInputError as error:
            errors.append(str(error).replace("ROI '0'", f"ROI {roi.name!r}"))
    problem = errors[0] + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else "")
    return good, _by_position(good) if good else None, problem
