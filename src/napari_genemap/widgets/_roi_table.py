"""The Spots panel's table of ROIs: rows = ROIs; name (editable), kind, size, then the genes."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
from qtpy.QtCore import QAbstractTableModel, QItemSelection, QItemSelectionModel, QModelIndex, Qt
from qtpy.QtWidgets import QAbstractItemView, QTableView

PENDING = "…"  # what a value cell shows while its ROI is being aggregated
FIXED = ("name", "kind", "size")


class RoiTableModel(QAbstractTableModel):
    """Shows `roiset.RoiSet.table`; an edited name goes to ``rename(row, name)``, which says whether it took."""

    def __init__(self, rename: Callable[[int, str], bool]):
        super().__init__()
        self._rename = rename
        self.frame = pd.DataFrame(columns=list(FIXED))

    def names(self) -> list[str]:
        return list(self.frame["name"])

    def update(self, frame: pd.DataFrame) -> None:
        same_shape = len(frame) == len(self.frame) and list(frame.columns) == list(self.frame.columns)
        self.frame = frame
        if same_shape:  # keeps the selection
            if len(frame):
                self.dataChanged.emit(self.index(0, 0), self.index(len(frame) - 1, self.columnCount() - 1))
        else:
            self.beginResetModel()
            self.endResetModel()

    def rowCount(self, parent=QModelIndex()) -> int:  # noqa: B008 - Qt's signature
        return 0 if parent.isValid() else len(self.frame)

    def columnCount(self, parent=QModelIndex()) -> int:  # noqa: B008
        return 0 if parent.isValid() else self.frame.shape[1]

    def data(self, index, role=Qt.ItemDataRole.DisplayRole):
        if not index.isValid() or role not in (Qt.ItemDataRole.DisplayRole, Qt.ItemDataRole.EditRole):
            return None
        value = self.frame.iat[index.row(), index.column()]
        if index.column() < len(FIXED):
            return value
        if np.isnan(value):
            return PENDING if self.frame["kind"].iat[index.row()] in ("circle", "polygon") else ""
        return f"{value:.3f}"

    def headerData(self, section, orientation, role=Qt.ItemDataRole.DisplayRole):
        if role != Qt.ItemDataRole.DisplayRole:
            return None
        return str(self.frame.columns[section]) if orientation == Qt.Orientation.Horizontal else str(section + 1)

    def flags(self, index):
        flags = super().flags(index)
        return flags | Qt.ItemFlag.ItemIsEditable if index.column() == 0 else flags

    def setData(self, index, value, role=Qt.ItemDataRole.EditRole) -> bool:
        if role != Qt.ItemDataRole.EditRole or index.column() != 0:
            return False
        return self._rename(index.row(), str(value))


class RoiTable(QTableView):
    """The table's view: ROIs selected by name, the selection kept when rows come or go (the model resets)."""

    def __init__(self, rois: RoiTableModel):
        super().__init__()
        self.rois = rois
        self.setModel(rois)
        self.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.setSelectionMode(QAbstractItemView.SelectionMode.ExtendedSelection)
        self.setEditTriggers(QAbstractItemView.EditTrigger.DoubleClicked | QAbstractItemView.EditTrigger.EditKeyPressed)
        self._kept: list[str] = []  # the names selected last, selected again after a reset
        self.selection().selectionChanged.connect(self._keep)
        rois.modelReset.connect(self._restore)

    def show_frame(self, frame: pd.DataFrame) -> None:
        """Show ``frame`` (`RoiTableModel.update`), the selected ROIs still selected."""
        self._kept = self.selected() or self._kept
        self.rois.update(frame)

    def select(self, names: list[str]) -> None:
        selection = QItemSelection()
        for row in [self.rois.names().index(name) for name in names]:
            selection.select(self.rois.index(row, 0), self.rois.index(row, self.rois.columnCount() - 1))
        self.selection().select(selection, QItemSelectionModel.SelectionFlag.ClearAndSelect)

    def selected(self) -> list[str]:
        rows = sorted(index.row() for index in self.selection().selectedRows())
        return [self.rois.names()[row] for row in rows]

    def selection(self) -> QItemSelectionModel:
        """The view's selection model (which `setModel` made)."""
        selection = self.selectionModel()
        if selection is None:
            raise RuntimeError("the ROI table has no model")
        return selection

    def _keep(self, *_) -> None:
        self._kept = self.selected()

    def _restore(self) -> None:
        names = [name for name in self._kept if name in self.rois.names()]
        if names:
            self.select(names)
