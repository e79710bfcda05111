"""Hostile caches and stores (issue 12, items 1, 6 (cache), 9 and 15): healed, or one line and exit 2.

Every case starts from one clean prediction of the bundled crop with a small random checkpoint (3 genes,
4 µm/px, 3 x 3 tiles of 128 model px), copies its cache or store, damages the copy on purpose and goes
through the real CLI: a damaged cache tile is predicted again (one warning, values equal to the clean
run's), anything else ends in exit 2 and one ``genemap: error`` line naming the path or field.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from napari_genemap.cli import main
from napari_genemap.sample import sample_root

IMAGE = sample_root() / "images" / "B4_crop.jpg"
TILING = ["--tile", "128", "--halo", "64"]
TILE = (1, 1)  # a tissue tile in the middle of the 3 x 3 grid


@pytest.fixture(scope="module")
def checkpoint(random_checkpoint) -> Path:
    return random_checkpoint


@pytest.fixture(scope="module")
def clean(tmp_path_factory, checkpoint) -> dict:
    """One undamaged run: its cache folder, its store, the maps and the aggregate at a few circles."""
    root = tmp_path_factory.mktemp("clean")
    store, cache = root / "clean.zarr", root / "cache"
    assert (
        main(["predict", str(IMAGE), "--out", str(store), "--model", str(checkpoint), "--cache", str(cache), *TILING])
        == 0
    )
    circles = root / "circles.csv"
    pd.DataFrame({"x": [300.0, 700.0, 1100.0], "y": [400.0, 800.0, 900.0], "radius": [60.0, 80.0, 100.0]}).to_csv(
        circles, index=False
    )
    assert main(["aggregate", str(store), "--circles", str(circles), "--out", str(root / "clean.csv")]) == 0
    return {
        "store": store,
        "cache": cache,
        "maps": _maps(store),
        "circles": circles,
        "table": pd.read_csv(root / "clean.csv"),
    }


def _maps(store: Path) -> np.ndarray:
    import spatialdata as sd

    return np.asarray(sd.read_zarr(store).images["gene_maps"].data, dtype=np.float32)


def _one_line(err: str, kind: str) -> str:
    """The one ``genemap: {kind}:`` line of stderr (progress bars may share it), and no traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("genemap:")]
    assert len(lines) == 1 and lines[0].startswith(f"genemap: {kind}: "), err
    return lines[0]


def _store_dir(cache: Path) -> Path:
    (store,) = cache.glob("genemap-*.zarr")
    return store


def _copy_cache(clean: dict, target: Path) -> Path:
    """The clean run's gene-map store, without the model's backend exports beside it (several MB: more than
    the small mounts below hold; a run makes them again)."""
    shutil.copytree(clean["cache"], target, symlinks=True, ignore=shutil.ignore_patterns("exports"))
    return target


def _predict(checkpoint: Path, cache: Path, out: Path) -> int:
    return main(["predict", str(IMAGE), "--out", str(out), "--model", str(checkpoint), "--cache", str(cache), *TILING])


# --- item 1: a damaged cache tile is predicted again, never served ------------------------------------


def _flip(data: bytes) -> bytes:
    """Bytes flipped inside the first inner chunk's compressed data (the shard index, at the end, intact)."""
    damaged = bytearray(data)
    for i in range(40, 60):
        damaged[i] ^= 0xFF
    return bytes(damaged)


DAMAGE = {  # one tile each, all in one cache: one run, one warning
    (0, 1): _flip,  # served as NaN and 63,008 before
    (1, 1): lambda data: data[: len(data) // 2],  # truncated: a 108-line checksum traceback before
    (1, 2): lambda data: bytes(len(data)),  # zeroed: the same
    (2, 1): lambda data: b"",  # empty: read as zeros
}


def test_damaged_cache_tiles_are_predicted_again(clean, checkpoint, tmp_path, capsys):
    cache = _copy_cache(clean, tmp_path / "cache")
    for (row, column), damage in DAMAGE.items():
        shard = _store_dir(cache) / "level0" / "c" / "0" / str(row) / str(column)
        shard.write_bytes(damage(shard.read_bytes()))
    out = tmp_path / "healed.zarr"
    capsys.readouterr()
    assert _predict(checkpoint, cache, out) == 0
    captured = capsys.readouterr()
    warning = _one_line(captured.err, "warning")
    assert str(_store_dir(cache)) in warning and "4 cached tile(s)" in warning and "level 0 tile 0-1" in warning
    assert "5 already cached, 4 predicted" in captured.out
    np.testing.assert_array_equal(_maps(out), clean["maps"])  # predicted again, bit-identical


# --- item 9: stores -----------------------------------------------------------------------------------


def _edit_prediction_attrs(clean: dict, target: Path, edit) -> Path:
    shutil.copytree(clean["store"], target)
    meta_path = target / "zarr.json"
    meta = json.loads(meta_path.read_text())
    edit(meta["attributes"]["genemap"]["prediction"])
    meta_path.write_text(json.dumps(meta))
    return target


def _aggregate(store: Path, clean: dict, out: Path) -> int:
    return main(["aggregate", str(store), "--circles", str(clean["circles"]), "--out", str(out)])


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda p: p.pop("map_pixel_size"), id="map_pixel_size missing"),
        pytest.param(lambda p: p.update(map_pixel_size=0), id="map_pixel_size 0"),
        pytest.param(lambda p: p.update(map_pixel_size="two"), id="map_pixel_size text"),
    ],
)
def test_a_bad_map_pixel_size_attribute_yields_to_the_scale_transform(edit, clean, tmp_path, capsys):
    store = _edit_prediction_attrs(clean, tmp_path / "p.zarr", edit)
    capsys.readouterr()
    assert _aggregate(store, clean, tmp_path / "t.csv") == 0, capsys.readouterr().err
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "t.csv"), clean["table"])


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda p: p.pop("protocol"), id="protocol missing"),
        pytest.param(lambda p: p.update(protocol="hist2st"), id="protocol text"),
        pytest.param(lambda p: p.update(protocol={"name": "x", "genes": 5}), id="protocol genes a number"),
    ],
)
def test_a_bad_protocol_attribute_is_one_line(edit, clean, tmp_path, capsys):
    store = _edit_prediction_attrs(clean, tmp_path / "p.zarr", edit)
    capsys.readouterr()
    assert _aggregate(store, clean, tmp_path / "t.csv") == 2
    line = _one_line(capsys.readouterr().err, "error")
    assert str(store) in line and "prediction.protocol" in line
    assert not (tmp_path / "t.csv").exists()


def test_a_damaged_output_store_chunk_is_one_line(clean, tmp_path, capsys):
    store = tmp_path / "p.zarr"
    shutil.copytree(clean["store"], store)
    chunks = sorted(path for path in (store / "images" / "gene_maps").rglob("c/*/*/*") if path.is_file())
    for chunk in chunks:  # the zstd frames' magic numbers: every chunk fails to decompress
        data = bytearray(chunk.read_bytes())
        data[:4] = b"\x00\x00\x00\x00"
        chunk.write_bytes(bytes(data))
    capsys.readouterr()
    assert _aggregate(store, clean, tmp_path / "t.csv") == 2
    line = _one_line(capsys.readouterr().err, "error")
    assert str(store) in line and "gene_maps" in line and "damaged chunk" in line


def test_a_cache_zarr_json_that_is_not_json_is_one_line(clean, checkpoint, tmp_path, capsys):
    cache = _copy_cache(clean, tmp_path / "cache")
    (_store_dir(cache) / "zarr.json").write_text("{not json")
    capsys.readouterr()
    assert _predict(checkpoint, cache, tmp_path / "x.zarr") == 2
    line = _one_line(capsys.readouterr().err, "error")
    assert str(_store_dir(cache)) in line and "damaged gene-map cache" in line
    assert not (tmp_path / "x.zarr").exists()


@pytest.mark.parametrize("where", ["cache folder", "cache store"])
def test_a_plain_file_where_the_cache_goes_is_one_line(where, clean, checkpoint, tmp_path, capsys):
    if where == "cache folder":
        cache = tmp_path / "cache"
        cache.write_text("not a folder")
        named = cache
    else:
        cache = tmp_path / "cache"
        cache.mkdir()
        named = cache / _store_dir(clean["cache"]).name
        named.write_text("not a store")
    capsys.readouterr()
    assert _predict(checkpoint, cache, tmp_path / "x.zarr") == 2
    line = _one_line(capsys.readouterr().err, "error")
    assert str(named) in line
    assert not (tmp_path / "x.zarr").exists()


# --- item 6 (the cache part): a read-only or full cache folder ----------------------------------------


@contextlib.contextmanager
def _tmpfs(path: Path, size: str) -> Path:
    path.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.decode().strip() or result.returncode})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _without_tile(cache: Path, tile: tuple[int, int]) -> None:
    store = _store_dir(cache)
    (store / "level0" / "done" / f"{tile[0]}-{tile[1]}").unlink()
    (store / "level0" / "c" / "0" / str(tile[0]) / str(tile[1])).unlink()


def test_a_read_only_cache_is_one_line(clean, checkpoint, tmp_path, capsys):
    with _tmpfs(tmp_path / "mnt", "4m") as mount:
        cache = _copy_cache(clean, mount / "cache")
        _without_tile(cache, TILE)  # the run has a tile to write
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        capsys.readouterr()
        assert _predict(checkpoint, cache, tmp_path / "x.zarr") == 2
        line = _one_line(capsys.readouterr().err, "error")
        # genemap predict checks the cache folder before any work; the cache itself refuses too (the tile service)
        assert str(cache) in line and "Read-only" in line
    assert not (tmp_path / "x.zarr").exists()


def test_a_read_only_cache_is_refused_by_the_cache_itself(clean, checkpoint, tmp_path):
    """What the tile service meets (it builds the engine without the CLI's up-front check of the folder)."""
    from napari_genemap.errors import GenemapInputError
    from napari_genemap.infer.predict import EngineSpec

    with _tmpfs(tmp_path / "mnt", "4m") as mount:
        cache = _copy_cache(clean, mount / "cache")
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        spec = EngineSpec(slide=str(IMAGE), checkpoint=str(checkpoint), cache_root=str(cache), tile=128, halo=64)
        with pytest.raises(GenemapInputError, match="Read-only") as error:
            spec.build()
        assert str(error.value).startswith(f"{_store_dir(cache)}: cannot write to the gene-map cache")


def test_a_full_cache_is_one_line_and_leaves_no_half_tile(clean, checkpoint, tmp_path, capsys):
    with _tmpfs(tmp_path / "mnt", "1m") as mount:
        cache = _copy_cache(clean, mount / "cache")
        for tile in [(r, c) for r in range(3) for c in range(3)]:
            _without_tile(cache, tile)
        filler = mount / "filler"
        with contextlib.suppress(OSError), filler.open("wb") as handle:  # fill the disk to the last byte
            while True:
                handle.write(b"\0" * 4096)
                handle.flush()
        capsys.readouterr()
        assert _predict(checkpoint, cache, tmp_path / "x.zarr") == 2
        line = _one_line(capsys.readouterr().err, "error")
        assert str(_store_dir(cache)) in line and "No space left" in line
        level0 = _store_dir(cache) / "level0"
        left = [p.relative_to(level0) for p in level0.rglob("*") if p.is_file() and p.name != "zarr.json"]
        assert not left, left  # no shard, no partial, no marker, no claim, no probe
    assert not (tmp_path / "x.zarr").exists()


# --- item 15: two predict runs on one cache share the work --------------------------------------------


def test_a_dead_processs_claim_is_taken_over(clean, tmp_path):
    from napari_genemap.infer.cache import GeneMapCache

    cache = GeneMapCache.open(_store_dir(_copy_cache(clean, tmp_path / "cache")))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    claim = cache._claim_path(0, *TILE)
    claim.write_text(json.dumps({"host": os.uname().nodename, "pid": int(dead.stdout), "time": 0.0 + 1e12}))
    assert cache.claim(0, *TILE)  # its owner is dead: ours now
    cache.release(0, *TILE)
    assert not claim.exists()


def _level0_claims(cache: Path) -> int:
    try:
        return sum(1 for path in cache.rglob("level0/claims/*") if path.is_file())
    except FileNotFoundError:  # a claim released under the walk
        return 0


def _level0_shards(cache: Path) -> int:
    try:
        return sum(1 for path in cache.rglob("level0/c/*/*/*") if path.is_file() and "partial" not in path.name)
    except FileNotFoundError:  # the store's staging folder renamed under the walk
        return 0


@pytest.mark.slow  # two whole CLI processes, one after the other overlapping: about 60 s on two cores
def test_two_predict_runs_on_one_cache_compute_each_tile_once(checkpoint, tmp_path):
    """Run A is frozen (SIGSTOP) while it holds claims, in the middle of its first task (frozen after its
    first written tile instead, A could finish a two-tile task first: tiles are written fast); run B starts on
    the same cache. B waits for the tiles A claimed instead of computing them (before: it computed them
    too). A is thawed when B waits (or, before, when B has finished); each tile is computed once in all."""
    import signal
    import threading
    import time

    cache = tmp_path / "cache"

    def command(name: str) -> list[str]:
        out = ["--out", str(tmp_path / f"{name}.zarr"), "--model", str(checkpoint), *TILING, "--cache", str(cache)]
        return [sys.executable, "-m", "napari_genemap.cli", "predict", str(IMAGE), *out]

    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, "start_new_session": True}
    env = {**os.environ, "GENEMAP_LOG_LEVEL": "INFO"}
    first = subprocess.Popen(command("a"), **pipes, env=env)
    try:
        deadline = time.monotonic() + 120
        while _level0_claims(cache) < 1 and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        os.killpg(first.pid, signal.SIGSTOP)  # driver and worker: A holds the claims of its first task
        assert first.poll() is None and _level0_shards(cache) < 9, "A finished before it could be frozen"
        second = subprocess.Popen(command("b"), **pipes, env=env)
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(second.stderr), daemon=True)
        reader.start()
        while second.poll() is None and not any("another process is computing" in line for line in lines):
            assert time.monotonic() < deadline + 120, "B neither waited for A nor finished"
            time.sleep(0.05)
        os.killpg(first.pid, signal.SIGCONT)
        outputs = [process.communicate(timeout=240)[0] for process in (first, second)]
        reader.join(timeout=10)
    finally:
        for process in (first, locals().get("second")):
            if process is not None and process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    assert first.returncode == 0 and second.returncode == 0, "".join(lines)
    predicted, tissue = [], set()
    for stdout in outputs:
        counts = re.search(r"(\d+) tiles \((\d+) with tissue\), (\d+) already cached, (\d+) predicted", stdout)
        assert counts, stdout
        tissue.add(int(counts.group(2)))
        predicted.append(int(counts.group(4)))
    (tissue_tiles,) = tissue
    assert sum(predicted) == tissue_tiles, predicted  # no tile computed twice
    # B found A's claims and waited for them; how many of the rest each run then took is a race once A is
    # thawed (with the model exported beforehand, A's next tasks often claim all of them first)
    assert any("another process is computing" in line for line in lines), "".join(lines)
    np.testing.assert_array_equal(_maps(tmp_path / "a.zarr"), _maps(tmp_path / "b.zarr"))
    assert not list(_store_dir(cache).glob("level0/claims/*"))  # every claim released
