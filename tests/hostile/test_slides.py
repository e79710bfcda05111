"""Hostile slides (issue 12, items 2, 5, 7, 11, 12): every one ends in one line on stderr and exit 2.

Each case is made from the bundled sample (or a copy of the shared Visium folder): a crop, a damaged copy,
a forged header. Each goes through the real CLI and must leave nothing at or beside the output path.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest

from napari_genemap.cli import main

SECTION = "B4_crop"
MPP = "0.6875"  # the sample's µm per pixel


def _refused(capsys, argv: list[str], *needles: str, out: Path | None = None) -> str:
    """Run the CLI: exit 2, exactly one line on stderr containing every needle, nothing at or beside ``out``."""
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    if out is not None:
        left = [p.name for p in out.parent.iterdir() if p.name.startswith((out.name, f".{out.name}"))]
        assert not left, left
    return lines[0]


def _sample_pixels(sample_copy: Path, size: int = 256) -> np.ndarray:
    from PIL import Image

    with Image.open(sample_copy / "images" / f"{SECTION}.jpg") as image:
        return np.asarray(image.crop((800, 800, 800 + size, 800 + size)).convert("RGB"))


# --- item 2: a 16-bit PNG ----------------------------------------------------------------------------


def test_16_bit_png_is_refused_like_a_16_bit_tiff(sample_copy, tmp_path, capsys):
    from PIL import Image

    gray = _sample_pixels(sample_copy).mean(axis=2).astype(np.uint16) * 257  # full 16-bit range
    path = tmp_path / "gray16.png"
    Image.fromarray(gray).save(path)
    with Image.open(path) as image:
        assert image.mode.startswith("I;16")
    out = tmp_path / "g.zarr"
    _refused(
        capsys, ["convert", str(path), str(out), "--mpp", MPP], "gray16.png", "16-bit", "expected 8-bit RGB", out=out
    )


# --- items 5 and 7: the alignment table -----------------------------------------------------------------


def _edit_alignment(sample_copy: Path, edit) -> Path:
    path = sample_copy / "spots" / f"{SECTION}_selection.tsv"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(edit(lines)) + "\n")
    return path


def _set_cell(column: str, value: str, line: int):
    def edit(lines: list[str]) -> list[str]:
        header = lines[0].split("\t")
        cells = lines[line - 1].split("\t")
        cells[header.index(column)] = value
        lines[line - 1] = "\t".join(cells)
        return lines

    return edit


@pytest.mark.parametrize(
    ("column", "value"),
    [("pixel_x", "NaN"), ("pixel_y", ""), ("x", "ten"), ("pixel_x", "inf")],
    ids=["nan-pixel-x", "empty-pixel-y", "text-x", "inf-pixel-x"],
)
def test_alignment_cell_that_is_not_a_number_is_refused_naming_line_and_column(
    sample_copy, tmp_path, capsys, column, value
):
    _edit_alignment(sample_copy, _set_cell(column, value, line=4))
    out = tmp_path / "o.zarr"
    argv = ["convert", str(sample_copy), str(out), "--section", SECTION, "--mpp", MPP]
    _refused(capsys, argv, f"{SECTION}_selection.tsv", f"line 4, column {column}", out=out)


def test_duplicated_alignment_row_is_refused_naming_both_lines(sample_copy, tmp_path, capsys):
    _edit_alignment(sample_copy, lambda lines: [*lines, lines[5]])  # 50 rows for 49 count rows
    out = tmp_path / "o.zarr"
    argv = ["convert", str(sample_copy), str(out), "--section", SECTION]
    _refused(capsys, argv, f"{SECTION}_selection.tsv", "line 51 repeats", "of line 6", out=out)


# --- item 5: a JPEG with a hole ----------------------------------------------------------------------


@pytest.mark.parametrize("hole", ["cut", "zeroed"])
def test_jpeg_with_a_hole_but_an_intact_end_is_refused(sample_copy, tmp_path, capsys, hole):
    data = (sample_copy / "images" / f"{SECTION}.jpg").read_bytes()
    middle = len(data) // 2
    if hole == "cut":
        data = data[:middle] + data[middle + 20_000 :]
    else:
        data = data[:middle] + bytes(20_000) + data[middle + 20_000 :]
    path = tmp_path / "holed.jpg"
    path.write_bytes(data)
    out = tmp_path / "h.zarr"
    _refused(capsys, ["convert", str(path), str(out), "--mpp", MPP], "holed.jpg", "premature end of data", out=out)


# --- item 7: paths, folders, Visium scale factors, a file changing under us ------------------------------


def test_symlink_loop_is_named_as_such(tmp_path, capsys):
    loop = tmp_path / "loop.jpg"
    loop.symlink_to(loop.name)
    out = tmp_path / "l.zarr"
    _refused(capsys, ["convert", str(loop), str(out), "--mpp", MPP], "loop.jpg", "symbolic link loop", out=out)


def test_unreadable_counts_folder_is_one_line(sample_copy):
    """As root, permissions do not apply: the CLI then runs as nobody (setpriv), on a copy nobody can reach."""
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 else []
    if as_nobody and shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: cannot make a folder unreadable")
    with tempfile.TemporaryDirectory() as scratch:
        os.chmod(scratch, 0o755)
        folder = Path(scratch) / "her2st"
        shutil.copytree(sample_copy, folder)
        (folder / "counts").chmod(0)
        src = Path(__import__("napari_genemap").__file__).parents[1]
        env = {**os.environ, "PYTHONPATH": str(src), "HOME": scratch, "MPLCONFIGDIR": scratch}
        command = [*as_nobody, sys.executable, "-m", "napari_genemap.cli", "info", str(folder), "--section", SECTION]
        try:
            result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
        finally:
            (folder / "counts").chmod(0o755)
    lines = result.stderr.splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert "counts" in lines[0] and "permission denied" in lines[0], lines[0]


@pytest.fixture
def visium_copy(shared_data, tmp_path) -> Path:
    target = tmp_path / "visium"
    shutil.copytree(shared_data / "visium_mouse_brain", target)
    for path in [target, *target.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)  # the shared copy is read-only
    return target


@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        (lambda text: text[: len(text) // 2], "not a readable JSON file"),
        (lambda text: json.dumps({**json.loads(text), "tissue_hires_scalef": 0}), "tissue_hires_scalef is 0"),
        (lambda text: json.dumps({**json.loads(text), "spot_diameter_fullres": "big"}), "spot_diameter_fullres"),
        (lambda text: "[]", "expected a JSON object"),
    ],
    ids=["not-json", "hires-scale-0", "diameter-text", "a-list"],
)
def test_visium_scalefactors_that_are_not_usable_are_one_line(visium_copy, tmp_path, capsys, damage, needle):
    path = visium_copy / "spatial" / "scalefactors_json.json"
    path.write_text(damage(path.read_text()))
    out = tmp_path / "v.zarr"
    _refused(capsys, ["convert", str(visium_copy), str(out)], "scalefactors_json.json", needle, out=out)


def test_image_changing_while_it_is_read_is_refused(sample_copy, tmp_path, capsys, monkeypatch):
    """The slide is opened (headers), then rewritten by someone else before its pixels are decoded."""
    from PIL import Image

    import napari_genemap.io as io

    path = tmp_path / "changing.jpg"
    shutil.copy(sample_copy / "images" / f"{SECTION}.jpg", path)
    read_slide = io.read_slide

    def read_then_rewrite(*args, **kwargs):
        sdata = read_slide(*args, **kwargs)
        with Image.open(path) as image:
            flipped = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        flipped.save(path, quality=70)  # a valid JPEG again, but another one
        return sdata

    monkeypatch.setattr(io, "read_slide", read_then_rewrite)
    out = tmp_path / "c.zarr"
    _refused(capsys, ["convert", str(path), str(out), "--mpp", MPP], "changing.jpg", "changed while", out=out)


# --- item 11: size bombs --------------------------------------------------------------------------------


def _jpeg_claiming(data: bytes, width: int, height: int) -> bytes:
    """The same JPEG with its frame header (SOFn) claiming another size."""
    data, at = bytearray(data), 2
    while data[at] == 0xFF:
        marker, length = data[at + 1], int.from_bytes(data[at + 2 : at + 4], "big")
        if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
            data[at + 5 : at + 9] = struct.pack(">HH", height, width)
            return bytes(data)
        at += 2 + length
    raise AssertionError("no frame header")


def _tiff_claiming(pixels: np.ndarray, side: int) -> bytes:
    """A one-strip deflate RGB TIFF holding ``pixels`` whose header claims ``side`` x ``side`` px."""
    strip = zlib.compress(pixels.tobytes(), 9)
    entries = [  # tag, type (3 SHORT, 4 LONG), count, value
        (256, 4, 1, side),
        (257, 4, 1, side),
        (258, 3, 3, None),  # bits per sample: 8, 8, 8 (stored after the IFD)
        (259, 3, 1, 8),  # deflate
        (262, 3, 1, 2),  # RGB
        (273, 4, 1, None),  # strip offset
        (277, 3, 1, 3),
        (278, 4, 1, side),  # one strip of all rows
        (279, 4, 1, len(strip)),
        (284, 3, 1, 1),
    ]
    ifd_size = 2 + 12 * len(entries) + 4
    bits_at = 8 + ifd_size
    strip_at = bits_at + 6
    ifd = struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        value = {258: bits_at, 273: strip_at}.get(tag, value)
        field = struct.pack("<HH", value, 0) if kind == 3 and count == 1 else struct.pack("<I", value)
        ifd += struct.pack("<HHI", tag, kind, count) + field
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + struct.pack("<3H", 8, 8, 8) + strip


@pytest.mark.parametrize("bomb", ["jpeg-65000", "tiff-1e6"])
def test_size_bomb_is_refused_before_decoding(sample_copy, tmp_path, capsys, bomb):
    if bomb == "jpeg-65000":
        path = tmp_path / "bomb.jpg"
        path.write_bytes(_jpeg_claiming((sample_copy / "images" / f"{SECTION}.jpg").read_bytes(), 65_000, 65_000))
        claim = "65000 x 65000 px"
    else:
        path = tmp_path / "bomb.tif"
        path.write_bytes(_tiff_claiming(_sample_pixels(sample_copy, 64), 1_000_000))
        claim = "1000000 x 1000000 px"
    out = tmp_path / "b.zarr"
    _refused(capsys, ["convert", str(path), str(out), "--mpp", MPP], path.name, claim, "damaged or forged", out=out)


def test_a_real_strip_tiff_still_opens(sample_copy, tmp_path, capsys):
    """The size checks leave an honest (deflate, one-strip) TIFF alone."""
    import tifffile

    path = tmp_path / "honest.tif"
    tifffile.imwrite(path, _sample_pixels(sample_copy), photometric="rgb", compression="zlib")
    assert main(["info", str(path), "--mpp", MPP]) == 0
    assert capsys.readouterr().err == ""


# --- item 12: a pixel size in the wrong unit ------------------------------------------------------------


@pytest.mark.parametrize("mpp", ["500", "1e4", "0.001"])
def test_implausible_mpp_is_refused_up_front_saying_the_unit(sample_copy, tmp_path, capsys, mpp):
    image = sample_copy / "images" / f"{SECTION}.jpg"
    out = tmp_path / "m.zarr"
    _refused(capsys, ["convert", str(image), str(out), "--mpp", mpp], "µm/px", "micrometres per pixel", out=out)
