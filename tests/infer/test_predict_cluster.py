"""`predict_slide` on dask: task sizes, the per-run worker plugin, a running cluster, the local worker's threads."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from napari_genemap.errors import GenemapInputError
from napari_genemap.infer import predict
from napari_genemap.infer.predict import EngineSpec, predict_slide, task_size
from napari_genemap.sample import sample_root

IMAGE = sample_root() / "images" / "B4_crop.jpg"
WORKER = SimpleNamespace(address="tcp://worker:1")


def sample_spec(checkpoint, cache) -> EngineSpec:
    return EngineSpec(str(IMAGE), str(checkpoint), str(cache), tile=128, halo=64, device="cpu")


@pytest.fixture(scope="module")
def signature(random_checkpoint, tmp_path_factory) -> dict:
    """The cache signature of the sample with the random checkpoint (what the client's engine holds)."""
    engine = sample_spec(random_checkpoint, tmp_path_factory.mktemp("cache")).build()
    engine.close()
    return engine.cache.signature


def gene_maps(store) -> list[np.ndarray]:
    import spatialdata as sd

    image = sd.read_zarr(store).images[predict.GENE_MAPS_KEY]  # one level: a DataArray; several: a DataTree
    if not hasattr(image, "children"):
        return [image.values]
    return [image[scale]["image"].values for scale in sorted(image.children)]


def test_tasks_are_cut_so_that_every_worker_thread_gets_some():
    assert task_size(8, 2) == 1  # HER2ST C3: 8 tissue tiles and two workers make 8 tasks, not one of 8 tiles
    assert task_size(8, 1) == 2
    assert task_size(10_000, 64) == predict.MAX_TILES_PER_TASK
    assert task_size(3, 0) == 1  # no worker yet (a cluster that scales up when work arrives)


def test_a_worker_that_would_fill_another_cache_is_refused(tmp_path, random_checkpoint, signature):
    client = {**signature, "package_version": "0.0.0", "slide": {**signature["slide"], "mtime_ns": 1}}
    plugin = predict._engine_plugin(sample_spec(random_checkpoint, tmp_path), "genemap-engine-test", client)
    with pytest.raises(GenemapInputError) as error:
        plugin.setup(WORKER)
    message = str(error.value)
    assert message.startswith("worker tcp://worker:1: its cache signature differs from the client's")
    assert "package_version: " in message and "'0.0.0' on the client" in message
    assert "slide.mtime_ns: " in message and "1 on the client" in message
    assert plugin.engine is None


def test_a_worker_without_the_checkpoint_names_itself(tmp_path, random_checkpoint, signature):
    plugin = predict._engine_plugin(sample_spec(tmp_path / "missing", tmp_path), "genemap-engine-test", signature)
    with pytest.raises(GenemapInputError, match=r"^worker tcp://worker:1: .*missing"):
        plugin.setup(WORKER)


def test_removing_the_plugin_waits_for_a_running_task(tmp_path, random_checkpoint, signature):
    plugin = predict._engine_plugin(sample_spec(random_checkpoint, tmp_path), "genemap-engine-test", signature)
    plugin.setup(WORKER)
    engine = plugin.acquire()  # a task is running...
    plugin.teardown(WORKER)  # ...when its run ends (the client was interrupted)
    engine.ensure(0, [(0, 0)])  # the task still finishes with a working engine
    assert engine.stats["predicted"] == 1
    plugin.release()
    assert plugin.engine is None and engine._readers._shutdown  # closed once the task let go
    with pytest.raises(RuntimeError, match="the run has ended"):
        plugin.acquire()


@pytest.mark.slow  # two worker processes import torch and load the model: about 15-30 s on two busy cores
def test_a_running_cluster_predicts_what_one_process_does(tmp_path, small_prediction):
    """Two workers of a running scheduler share the tiles; the store equals the one-process prediction bit for
    bit; each task reported its tiles; the run's plugin (its engines) is gone afterwards."""
    from distributed import Client, LocalCluster

    checkpoint, reference = small_prediction
    spec = sample_spec(checkpoint, tmp_path / "cache")
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        summary = predict_slide(spec, tmp_path / "pred.zarr", scheduler=cluster.scheduler_address)
        events = [message for _, message in client.get_events(predict.EVENT_TOPIC)]
        plugins = client.run(lambda dask_worker: list(dask_worker.plugins))
    assert summary["predicted"] == 9 == sum(event["predicted"] for event in events)
    assert len(events) == 5  # 9 tiles, 2 threads: tasks of task_size(9, 2) = 2 tiles
    assert not [name for names in plugins.values() for name in names if name.startswith(predict.PLUGIN_NAME)]
    ours, theirs = gene_maps(tmp_path / "pred.zarr"), gene_maps(reference)
    assert len(ours) == len(theirs)
    for level, (mine, expected) in enumerate(zip(ours, theirs, strict=True)):
        assert mine.dtype == expected.dtype and np.array_equal(mine, expected), f"level {level}"


def test_the_local_worker_uses_as_many_torch_threads_as_this_process():
    """dask's nanny sets OMP/MKL_NUM_THREADS=1 in its workers; the local cluster's one worker sets them back."""
    import torch
    from distributed import Client

    def threads() -> int:
        import torch

        return torch.get_num_threads()

    with predict._local_cluster() as cluster, Client(cluster) as client:
        assert client.submit(threads).result() == torch.get_num_threads()
