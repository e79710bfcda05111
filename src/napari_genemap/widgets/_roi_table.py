"""The Spots panel's table of ROIs as a Qt model: rows = ROIs; name (editable), kind, size, then the genes."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
from qtpy.QtCore import QAbstractTableModel, QModelIndex, Qt

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
