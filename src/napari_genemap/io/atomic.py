"""Writing so that nothing half-written is ever seen: write under a temporary sibling name, then rename.

A rename within one folder is atomic, so a reader (or a later run after a crash) finds the old file or
folder, or the new one, never a part; a failed write leaves only the temporary name, which is removed.
Every writer of the package goes through these two context managers.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

from ..errors import GenemapInputError


def _sibling(path: Path, tag: str, suffix: str = "") -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.{tag}{suffix}")


def check_output_place(
    path: str | os.PathLike, what: str, *, folder: bool = False, make_parents: bool = False, inside: bool = False
) -> Path:
    """Refuse, in one line and before any work, an output that cannot be written at ``path``.

    ``what`` names the output in the message ("the CSV"). A file output must not be an existing folder,
    a ``folder`` output not an existing file. Its folder must exist (unless ``make_parents``: then its
    nearest existing ancestor counts) and take a new file, which is tried (a read-only folder or file
    system, a full disk's missing inodes: permission bits alone do not tell, e.g. for root). ``inside``:
    the writer writes into ``path`` itself (a folder of outputs), so that is where it is tried."""
    path = Path(path)
    place = path.parent
    try:
        if not folder and path.is_dir():
            raise GenemapInputError(f"{path}: is a folder; expected a file name for {what}")
        if folder and (path.is_file() or (path.exists() and not path.is_dir())):
            raise GenemapInputError(f"{path}: is a file; expected a folder for {what}")
        place = path if inside and path.is_dir() else path.parent
        if not place.is_dir():
            if place.exists():
                raise GenemapInputError(f"{path}: {place} is a file, not a folder; cannot write {what} there")
            if not make_parents:
                raise GenemapInputError(f"{path}: folder {place} does not exist; create it first for {what}")
            while not place.is_dir():
                if place.exists() or place == place.parent:
                    raise GenemapInputError(f"{path}: {place} is not a folder; cannot write {what} there")
                place = place.parent
        handle, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=place)
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise GenemapInputError(f"{path}: cannot write {what} in {place} ({error.strerror or error})") from None
    return path


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; renamed onto ``path`` when the block succeeds.

    ``suffix`` (default: ``path``'s) ends the temporary name, for writers that choose a format by it."""
    path = Path(path)
    temporary = _sibling(path, "tmp", path.suffix if suffix is None else suffix)
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, replace: bool = False) -> Iterator[Path]:
    """Yield a not-yet-existing folder path beside ``path`` to create and fill; renamed onto ``path`` when
    the block succeeds. An existing ``path`` is replaced when ``replace`` (moved aside first, then
    removed), else kept: `FileExistsError` (another process finished first; its folder is as good)."""
    path = Path(path)
    staging = _sibling(path, "partial")
    try:
        yield staging
        if path.exists():
            if not replace:
                raise FileExistsError(path)
            retired = _sibling(path, "old")
            os.replace(path, retired)
            os.replace(staging, path)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, path)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def quiet_zarr() -> Iterator[None]:
    """zarr and spatialdata announce future defaults on every array they write; nothing for users."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="zarr v3 autosharding", category=UserWarning)
        warnings.filterwarnings("ignore", message="Call to deprecated class Scaler", category=DeprecationWarning)
        yield
