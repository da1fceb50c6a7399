"""End to end on a dask.distributed LocalCluster of two worker processes.

NAPs and layouts of a real on-disk store computed on the cluster must be identical to
the local (synchronous) scheduler: seeds are drawn up front, so neither chunking nor
task placement can change a result.
"""

from __future__ import annotations

import pytest
import xarray as xr

import topoxr
from topoxr.layouts import compute_layouts
from topoxr.grouping import naps
from topoxr.testing import make_activations, write_store

distributed = pytest.importorskip("distributed")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("dist") / "run.zarr")
    # small chunks, so the NAP reduction really is spread over many tasks
    write_store(make_activations(n_neurons=24, n_samples=96, random_state=3), path,
                layer="dense1", batch_size=16, chunk_samples=16)
    return path


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None, silence_logs=40) as cluster, \
            distributed.Client(cluster) as c:
        yield c


def test_naps_on_the_cluster_equal_local(store, client):
    # open_store reads blocks of many zarr chunks (about 32 MiB): this small store is one
    # block, so split it along sample to spread the NAP reduction over many tasks
    layer = topoxr.open_store(store)["model/dense1"].to_dataset().chunk({"sample": 16})
    assert layer.activation.data.numblocks[1] > 1
    lazy = naps(layer, by=["label", "correct"])
    on_cluster = client.compute(lazy).result()
    local = lazy.compute(scheduler="sync")
    xr.testing.assert_identical(on_cluster, local)
    assert len(client.scheduler_info()["workers"]) == 2


def test_layouts_on_the_cluster_equal_local(store, client):
    tree = topoxr.open_store(store)
    kwargs = {"methods": ["random", "pca"], "seeds": [0, 3], "progress": False}
    on_cluster = compute_layouts(tree, client=client, **kwargs)
    local = compute_layouts(tree, scheduler="sync", **kwargs)
    xr.testing.assert_identical(on_cluster["model/dense1"].to_dataset(),
                                local["model/dense1"].to_dataset())


def test_layouts_with_the_processes_scheduler_equal_local(store):
    tree = topoxr.open_store(store)
    kwargs = {"methods": ["random"], "seeds": [1], "progress": False}
    xr.testing.assert_identical(
        compute_layouts(tree, scheduler="processes", **kwargs)["model/dense1"].to_dataset(),
        compute_layouts(tree, scheduler="sync", **kwargs)["model/dense1"].to_dataset())


def test_two_calls_at_once_on_one_cluster_each_get_their_own_layouts(client):
    """Task keys were positions only (topoxr-layout-0-0-0-0): two calls sharing the
    scheduler at once got each other's results (20 of 40 in a threaded run)."""
    import threading

    trees = [xr.DataTree.from_dict({"/m/l": make_activations(n_neurons=20 + 5 * i,
                                                             n_samples=60, random_state=i)})
             for i in range(2)]
    kwargs = dict(methods=["pca", "random"], seeds=[0, 1], progress=False)
    expected = [compute_layouts(t, scheduler="sync", **kwargs)["m/l"].to_dataset()
                for t in trees]
    for _ in range(4):
        got: list = [None, None]
        barrier = threading.Barrier(2)

        def run(i):
            barrier.wait()
            got[i] = compute_layouts(trees[i], client=client, **kwargs)["m/l"].to_dataset()

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i in range(2):
            xr.testing.assert_identical(got[i], expected[i])
