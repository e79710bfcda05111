"""The Gene maps panel's Pearson line: how the active gene's map agrees with its measured spots in view.

The tile service integrates the map over the measured spots in view (cached tiles only; see
`evaluate.in_view`). One request is out at a time: while tiles arrive every answer is a little stale, so
it is shown and, when the view or gene changed meanwhile, asked again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from qtpy.QtCore import QTimer

from ..evaluate.in_view import MIN_SPOTS, InViewPearson, in_view_pearson, spots_in_view
from ..layers import view_corners
from ._qt import wrapped_label
from .session import Session


class PearsonLine:
    """The line (``label``) and the Pearson it shows (``r``; None when there is none)."""

    def __init__(self, session: Session, active_layer: Callable[[], Any], measured: Callable[[str], list]):
        """``active_layer``: the gene layer the panel speaks of (or None); ``measured``: a gene's layers of
        measured spots on the active slide."""
        self.session = session
        self.label = wrapped_label()
        self.r: float | None = None
        self._active_layer = active_layer
        self._measured = measured
        self._request: str | None = None  # the gene whose Pearson is being aggregated
        self._stale = False  # the view or gene changed while a request was out

    def restart(self) -> None:
        """A new tile service: no answer is on its way."""
        self._request, self._stale = None, False

    def forget(self) -> None:
        """Another slide or model: the line says nothing until asked again."""
        self._request, self.r = None, None
        self.label.setText("")

    def update(self) -> None:
        """Ask the service for the spot integrals of the active gene's measured spots in view (cached tiles
        only); one request at a time, asked again when the view changed meanwhile."""
        layer = self._active_layer()
        if layer is None or self.session.cache is None:
            return
        gene = layer.metadata["genemap"]["gene"]
        measured = self._measured(gene)
        if not measured:
            self._say(None, f"{gene}: not measured on this slide, so no Pearson")
            return
        if self._request is not None:
            self._stale = True
            return
        spots = measured[0]
        shapes = spots_in_view(spots.data, spots.size, spots.features["spot"], *_view_in(layer, spots))
        if len(shapes) < MIN_SPOTS:
            self._say(None, InViewPearson(gene, None, 0, len(shapes)).describe(None))
            return
        if not self.label.text().startswith(f"{gene}:"):  # never show another gene's number meanwhile
            self._say(None, f"{gene}: computing the Pearson over the {len(shapes)} measured spots in view…")
        self._request = gene
        self.session.aggregate(
            shapes, lambda table, error: self._show(gene, len(shapes), table, error), only_cached=True
        )

    def _show(self, gene: str, in_view: int, table, error: str | None) -> None:
        from ..data.protocols import Protocol

        self._request = None
        active = self._active_layer()
        if active is None or active.metadata["genemap"]["gene"] != gene:
            self._stale = False
            self.update()
            return
        if self._stale:  # show this answer (while tiles keep arriving, every answer is a little stale),
            self._stale = False  # then ask again
            QTimer.singleShot(0, self.update)
        protocol = Protocol.from_dict(self.session.model_card()["protocol"])
        result = in_view_pearson(gene, None if error else table, self.session.counts(), protocol, in_view)
        self._say(result.r, result.describe(self.session.training_overlap()))

    def _say(self, r: float | None, text: str) -> None:
        self.r = r
        self.label.setText(text)


def _view_in(gene_layer, other) -> tuple[np.ndarray, np.ndarray]:
    """The gene layer's view (its corner pixels at the shown level) in ``other``'s data coordinates."""
    local = (view_corners(gene_layer) - np.asarray(other.translate)[-2:]) / np.asarray(other.scale)[-2:]
    return local[0], local[1]
