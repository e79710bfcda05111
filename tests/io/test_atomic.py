"""The one atomic writer: a failed write leaves the old file or folder and no temporary name behind."""

from __future__ import annotations

import pytest

from napari_genemap.io.atomic import atomic_dir, atomic_file


def test_a_file_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "table.csv"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_file(target) as temporary:
        temporary.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["table.csv"]
    with atomic_file(target) as temporary:
        assert temporary.parent == tmp_path and temporary.suffix == ".csv" and not temporary.exists()
        temporary.write_text("new")
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["table.csv"]


def test_a_folder_is_replaced_only_when_asked(tmp_path):
    target = tmp_path / "store.zarr"
    with atomic_dir(target) as staging:
        staging.mkdir()
        (staging / "a").write_text("1")
    assert (target / "a").read_text() == "1"
    with pytest.raises(FileExistsError), atomic_dir(target) as staging:
        staging.mkdir()
        (staging / "a").write_text("2")
    assert (target / "a").read_text() == "1"
    with pytest.raises(RuntimeError), atomic_dir(target, replace=True) as staging:
        staging.mkdir()
        raise RuntimeError("killed mid-write")
    assert (target / "a").read_text() == "1"
    with atomic_dir(target, replace=True) as staging:
        staging.mkdir()
        (staging / "b").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store.zarr"]
