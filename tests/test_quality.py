"""Fingerprint quality: the invariance setting end to end, and the morphology benchmark's parts."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import dask.config
import numpy as np
import pytest

from pipeline.errors import StoreError
from pipeline.fingerprint import fingerprint
from pipeline.store import Store
from pipeline.testing import store_digest, synthetic_mosaic

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "method": "sliding",
    "size": 64,
    "stride": 64,
    "tile_size": 256,
    "chunk_rows": 16,
    "model": "efficientnet-lite0:native",
}


def _bench():
    spec = importlib.util.spec_from_file_location(
        "bench_quality", ROOT / "benchmarks" / "bench_quality.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_quality"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster) as c,
    ):
        yield c


def test_invariance_is_recorded_and_a_store_refuses_another(tmp_path, client, model_cache):
    from pipeline.models import get_session, resolve
    from pipeline.models.export import ensure_onnx
    from pipeline.preprocess import image_limits_for, stretch_cutouts
    from pipeline.sources import open_sources

    mosaic = synthetic_mosaic(tmp_path / "field.fits", shape=(192, 192), seed=4, n_sources=6)
    out = tmp_path / "rot8.zarr"
    with dask.config.set({"elodin.model.invariance": 8}):
        fingerprint([mosaic], out, client=client, progress=False, **SETTINGS)
    store = Store.open(out)
    assert store.attrs["model"] == "efficientnet-lite0:native:rot8"
    # The stored rows are the invariant model's: a cutout's fingerprint is that of its rotation.
    ds = store.dataset().load()
    row = int(np.flatnonzero(ds.valid.values)[4])
    x0, y0 = int(ds.x.values[row] - 31.5), int(ds.y.values[row] - 31.5)
    from astropy.io import fits

    cut = fits.getdata(mosaic).astype(np.float32)[y0 : y0 + 64, x0 : x0 + 64]
    src = open_sources([mosaic])[0]
    rgb, _ = stretch_cutouts(np.rot90(cut)[None, None].copy(), image_limits=image_limits_for(src))
    sess = get_session(ensure_onnx(resolve("efficientnet-lite0:native:rot8"), cache=model_cache))
    np.testing.assert_allclose(ds.fingerprint.values[row], sess.infer(rgb).features[0], atol=1e-4)

    before = store_digest(out)
    other = synthetic_mosaic(tmp_path / "other.fits", shape=(192, 192), seed=5, n_sources=6)
    with pytest.raises(StoreError, match="made with model"):
        fingerprint([other], out, client=client, progress=False, **SETTINGS)  # invariance none
    with (
        dask.config.set({"elodin.model.invariance": 4}),
        pytest.raises(StoreError, match="made with model"),
    ):
        fingerprint([other], out, client=client, progress=False, **SETTINGS)
    assert store_digest(out) == before


def test_simulated_classes_look_like_their_class():
    bench = _bench()
    stamps, labels = bench.simulate(4, seed=1)
    assert stamps.shape == (4 * len(bench.CLASSES), 64, 64) and stamps.dtype == np.float32
    assert np.bincount(labels).tolist() == [4] * len(bench.CLASSES)
    total = stamps.sum(axis=(1, 2))
    blank = labels == bench.CLASSES.index("blank")
    # Blank sky is unit Gaussian noise (its sum over 64^2 pixels has sigma 64); every other
    # stamp holds a source's flux (log-uniform from 250) above it.
    assert np.allclose(stamps[blank].std(axis=(1, 2)), 1.0, atol=0.05)
    assert np.abs(total[blank]).max() < 3 * 64 and total[~blank].min() > 2 * 64
    # Same seed, same stamps: the benchmark's figures are reproducible.
    np.testing.assert_array_equal(bench.simulate(4, seed=1)[0], stamps)


def test_scores_rank_separable_above_random(rng):
    bench = _bench()
    labels = np.repeat(np.arange(3), 30)
    separable = rng.normal(size=(90, 30)) + 8.0 * np.eye(3, 30)[labels]
    good = bench.scores(separable, labels)
    bad = bench.scores(rng.normal(size=(90, 30)), labels)
    assert good[0] > 0.95 and good[1] > 0.9
    assert bad[0] < 0.6 and bad[1] < 0.2


def test_benchmark_runs_through_the_real_model(model_cache, capsys):
    bench = _bench()
    rows = bench.run(
        ["pixels", "efficientnet-lite0:native"], per_class=6, hdf_per_class=10, threads=1
    )
    assert [r["recipe"] for r in rows] == ["pixels", "efficientnet-lite0:native"]
    assert rows[0]["dim"] == 64 * 64 and rows[1]["dim"] == 1280
    for r in rows:
        assert 0.0 <= r["bacc"] <= 1.0 and -1.0 <= r["ari"] <= 1.0 and 0.0 <= r["hdf"] <= 1.0
    assert rows[1]["rate"] > 0
