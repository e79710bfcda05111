"""What the plugin's dock widgets share for one viewer: the slide, the model and the tile service.

Qt-free (psygnal signals), so it is tested without a viewer. One session per viewer (`session_for`),
created on first use and closed with the viewer: no global model, no viewer-wide key bindings. The
widgets call `poll` from a Qt timer; it turns the service's messages into signals on the GUI thread.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from psygnal import Signal

from ..checkpoints import shipped_checkpoint
from ..errors import GenemapInputError

if TYPE_CHECKING:
    from qtpy.QtCore import QTimer

    from ..infer.cache import GeneMapCache
    from ..infer.service import TileService
    from ..io.read import SlideSource

_SESSIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def default_cache_root() -> Path:
    """Where viewers keep predicted tiles: $GENEMAP_CACHE_DIR, else ~/.cache/napari-genemap."""
    root = os.environ.get("GENEMAP_CACHE_DIR") or Path.home() / ".cache" / "napari-genemap"
    return Path(root)


class Session:
    """Slide + model + tile service of one viewer."""

    slide_changed = Signal(object)  # the SpatialData
    model_changed = Signal(object)  # the checkpoint path
    ready = Signal(object)  # the GeneMapCache (read-only) the service fills
    progress = Signal(dict)  # the service's whole "tiles" report (done, queued, paused, total, eta_s)
    error = Signal(str)  # one line for the user
    checkpoint_offered = Signal(str)  # a training run finished: its checkpoint folder

    def __init__(self, cache_root: str | os.PathLike | None = None):
        self.cache_root = Path(cache_root) if cache_root else default_cache_root()
        self.slide = None
        self.slide_source: SlideSource | None = None  # how the service reads the slide again
        self.checkpoint: Path = shipped_checkpoint()
        self.device = "auto"
        self.tta = False  # test-time augmentation: 8 views of every window averaged
        self.backend = ""  # what runs the model, as the service reported it ("openvino-bf16 on cpu")
        self.service: TileService | None = None
        self.cache: GeneMapCache | None = None
        self._callbacks: dict[int, Callable] = {}
        self.timer: QTimer | None = None  # the Qt timer polling this session (set by the widgets)

    # --- choices -----------------------------------------------------------------------------------------
    def set_slide(self, sdata, source: SlideSource) -> None:
        self.slide, self.slide_source = sdata, source
        self.slide_changed.emit(sdata)
        self.restart()

    def set_model(self, checkpoint: str | os.PathLike, device: str = "auto", tta: bool = False) -> None:
        from ..models.checkpoint import read_checkpoint_config

        read_checkpoint_config(checkpoint)  # a clear error now rather than in the service
        self.checkpoint, self.device, self.tta = Path(checkpoint), device, tta
        self.model_changed.emit(self.checkpoint)
        self.restart()

    @property
    def model_name(self) -> str:
        """How layers name the model that made them: the checkpoint's folder name."""
        return Path(self.checkpoint).name

    @property
    def slide_key(self) -> str | None:
        """What identifies the active slide in layer metadata (how the service reopens it)."""
        return None if self.slide_source is None else self.slide_source.key

    def counts(self):
        """The active slide's measured counts (an AnnData of its spots), or None."""
        from ..io import TABLE_KEY

        return self.slide.tables.get(TABLE_KEY) if self.slide is not None else None

    def training_overlap(self) -> str | None:
        """The section of the model's training data this slide is (or was cut from), else None.

        Checkpoints record their training slides as (path, section); slides are matched by section name
        (HER2ST-style names are unique within a data set), the bundled sample by the section it was cut from.
        """
        if self.slide is None:
            return None
        from ..io import slide_info
        from ..layers import slide_name

        info = slide_info(self.slide)
        names = {str(n).lower() for n in (slide_name(self.slide), info.get("section"), info.get("derived_from")) if n}
        training = self.model_card().get("provenance", {}).get("training", [])
        for entry in training:
            section = entry.get("section") or Path(str(entry.get("path", ""))).name.split(".")[0]
            if section and section.lower() in names:
                return section
        return None

    def model_card(self) -> dict:
        """The checkpoint's config: genes, protocol, µm/px, training data, metrics."""
        from ..models.checkpoint import read_checkpoint_config

        return read_checkpoint_config(self.checkpoint)

    # --- the service -------------------------------------------------------------------------------------
    def restart(self) -> None:
        """(Re)start the tile service for the current slide and model; "ready" follows."""
        from ..infer.predict import EngineSpec
        from ..infer.service import TileService

        self.stop()
        if self.slide_source is None:
            return
        spec = EngineSpec(
            slide=self.slide_source.path,
            section=self.slide_source.section,
            mpp=self.slide_source.mpp,
            checkpoint=str(self.checkpoint),
            cache_root=str(self.cache_root),
            device=self.device,
            tta=self.tta,
        )
        self.service = TileService(spec)

    def stop(self) -> None:
        if self.service is not None:
            self.service.close()
        self.service, self.cache = None, None
        self._callbacks.clear()

    def want(self, tiles: list[tuple[int, int, int]]) -> None:
        if self.service is not None:
            self.service.want(tiles)

    def pause(self, paused: bool) -> None:
        if self.service is not None:
            self.service.pause(paused)

    def aggregate(self, shapes, callback: Callable, only_cached: bool = False) -> None:
        """Aggregate ROIs (GeoDataFrame in slide pixels) in the service; ``callback(table, error)`` gets an
        AnnData (rows named by the GeoDataFrame's index) or a one-line error, on the GUI thread."""
        if self.service is None:
            raise GenemapInputError("open a slide first: there is no model running")
        self._callbacks[self.service.aggregate(shapes, only_cached)] = callback

    def poll(self) -> None:
        """Deliver what the service reported since the last call (called by a Qt timer)."""
        from ..infer.cache import GeneMapCache

        if self.service is None:
            return
        for event in self.service.poll():
            if event.kind == "ready":
                self.backend = f"{event.payload['backend']} on {event.payload['device']}"
                self.cache = GeneMapCache.open(event.payload["cache"])
                self.ready.emit(self.cache)
            elif event.kind == "tiles":
                self.progress.emit(event.payload)
            elif event.kind == "aggregated":
                callback = self._callbacks.pop(event.payload["request"], None)
                if callback is not None:
                    callback(event.payload.get("table"), event.payload.get("error"))
            elif event.kind == "error":
                self.error.emit(event.payload["message"])

    def close(self) -> None:
        self.stop()
        if self.timer is not None:
            self.timer.stop()


def session_for(viewer) -> Session:
    """The viewer's session, created on first use."""
    session = _SESSIONS.get(viewer)
    if session is None:
        session = _SESSIONS[viewer] = Session()
    return session
