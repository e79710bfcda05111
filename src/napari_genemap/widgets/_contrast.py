"""Gene maps' contrast follows what is in view (`explore.contrast`) until the user sets limits by hand."""

from __future__ import annotations

from ..explore.contrast import view_contrast


class MapContrast:
    """Sets gene layers' contrast from the values in view, and tells its own changes from the user's (whose
    limits then stay)."""

    def __init__(self) -> None:
        self._setting = False  # the limits being set are ours, not the user's

    def watch(self, layer) -> None:
        """Remember in ``layer``'s metadata when the user sets its contrast limits."""
        layer.events.contrast_limits.connect(lambda _event, layer=layer: self._touched(layer))

    def follow_view(self, layer, level: int, box: tuple[int, int, int, int]) -> None:
        """Set a visible ``layer``'s contrast from its values at ``level`` in ``box`` (i0, i1, j0, j1), the view."""
        if not layer.visible:
            return
        info = layer.metadata["genemap"]
        i0, i1, j0, j1 = box
        values = layer.data[level].read(max(i0, 0), i1, max(j0, 0), j1)
        contrast = view_contrast(
            values,
            layer.contrast_limits,
            layer.contrast_limits_range,
            following=info.get("contrast_auto", False),
            user_set=info.get("contrast_user", False),
        )
        if contrast is None:
            return
        self._setting = True
        try:
            if contrast.range is not None:
                layer.contrast_limits_range = contrast.range
            layer.contrast_limits = contrast.limits
        finally:
            self._setting = False
        info["contrast_auto"] = True

    def _touched(self, layer) -> None:
        if not self._setting:
            layer.metadata["genemap"]["contrast_user"] = True
