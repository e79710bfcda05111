"""napari-genemap: predict spatial gene expression from H&E histology and explore it in napari.

Importing the package is cheap on purpose (napari imports it during plugin discovery): the
heavy libraries (torch, spatialdata, napari) are imported by the modules that need them.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("napari-genemap")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
