"""Where the Spots panel writes its ROIs: a save dialog for a file; for a SpatialData store, a menu.

A store is a folder, which a save dialog would open instead of choosing: the menu offers the slide's own
store, a folder chooser for another existing store, and a save dialog for a new one.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from qtpy.QtGui import QAction
from qtpy.QtWidgets import QFileDialog, QMenu, QWidget

from ..errors import GenemapInputError
from ..io.store import is_zarr_store


def export_path(parent: QWidget, path: str | Path | None, filter_: str, suffix: str) -> Path | None:
    """``path``, else one chosen in a save dialog (None when cancelled); `GenemapInputError` unless it ends
    in ``suffix`` (or, for ".zarr", is an existing store)."""
    if path is None:
        path, _ = QFileDialog.getSaveFileName(parent, "Export ROIs", f"rois{suffix}", filter_)
        if not path:
            return None
    path = Path(path)
    if path.suffix != suffix and not (suffix == ".zarr" and is_zarr_store(path)):
        raise GenemapInputError(f"{path}: expected a name ending in {suffix}")
    return path


class StoreMenu(QMenu):
    """The SpatialData… button's menu: each entry hands ``export`` the store to write into."""

    def __init__(
        self,
        slide_store: Callable[[], Path | None],
        export: Callable[[str | Path | None], object],
        say: Callable[[str], None],
        parent: QWidget,
    ):
        """``slide_store``: the store the slide was read from (or None); ``say``: the panel's message line."""
        super().__init__(parent)
        self._slide_store, self._export, self._say = slide_store, export, say
        self.into_slide_store = self._entry("Into the slide's store", lambda: export(slide_store()))
        self._entry("Into another existing store…", self._into_existing_store)
        self._entry("New store…", self._into_new_store)
        self.aboutToShow.connect(self._update)

    def _entry(self, text: str, slot: Callable[[], object]) -> QAction:
        action = QAction(text, self)
        action.triggered.connect(lambda _=False: slot())
        self.addAction(action)
        return action

    def _update(self) -> None:
        store = self._slide_store()
        self.into_slide_store.setEnabled(store is not None)
        self.into_slide_store.setText(f"Into the slide's store ({store.name if store is not None else 'none'})")

    def _into_existing_store(self) -> None:
        start = self._slide_store()
        folder = QFileDialog.getExistingDirectory(
            self.parentWidget(), "Save the ROIs into an existing SpatialData store", str(start.parent) if start else ""
        )
        if not folder:
            return
        if not is_zarr_store(folder):
            self._say(f"{folder}: not a SpatialData store; choose a .zarr store folder, or New store…")
            return
        self._export(folder)

    def _into_new_store(self) -> None:
        chosen, _ = QFileDialog.getSaveFileName(
            self.parentWidget(), "Save the ROIs in a new SpatialData store", "rois.zarr"
        )
        if not chosen:
            return
        path = Path(chosen)
        self._export(path if path.suffix == ".zarr" else path.with_name(f"{path.name}.zarr"))
