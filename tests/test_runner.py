"""`elodin run CONFIG.yaml [--incremental]`: every stage from one file, and scheduled reruns."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from pipeline.errors import ConfigError
from pipeline.runner import run
from pipeline.store import Store
from pipeline.testing import make_mosaic, store_digest


def _config(
    tmp_path: Path, stages=("fingerprint", "reduce", "cluster", "embed", "outliers", "export")
) -> Path:
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"""
elodin:
  run:
    inputs: ["{tmp_path}/images/*.fits"]
    store: {tmp_path}/survey.zarr
    stages: [{", ".join(stages)}]
    refit-fraction: 0.25
  model:
    name: efficientnet-lite0:native
  cutouts:
    size: 32
  tiling:
    tile-size: 128
  fingerprint:
    chunk-rows: 16
  compute:
    workers: 1
  analysis:
    reduce:
      components: 8
    cluster:
      n-clusters: 4
    embed:
      method: tsne
"""
    )
    return cfg


def _rows_of(store: Path, image: str) -> np.ndarray:
    ds = Store.open(store).dataset()
    return np.flatnonzero((ds.image.values == image) & ds.valid.values)


def test_incremental_runs_do_nothing_absorb_refit_and_replace(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        make_mosaic(images / f"field{i}.fits", ny=256, nx=256, seed=10 + i)  # 64 cutouts each
    cfg = _config(tmp_path)
    store = tmp_path / "survey.zarr"

    first = run(cfg, progress=False)
    assert first.work_done
    assert (tmp_path / "survey.parquet").exists()
    ds = Store.open(store).dataset()
    assert int(ds.valid.sum()) == 192
    assert np.isfinite(ds.embedding.values[ds.valid.values]).all()

    # Nothing new: no work, not a byte changed.
    before = store_digest(store)
    again = run(cfg, incremental=True, progress=False)
    assert not again.work_done and "nothing new" in again.lines[-1]
    assert store_digest(store) == before

    # A small addition (32 rows < 25 % of 192): the models stay, the new rows are placed.
    old_pca = Store.open(store).dataset().pca.values.copy()
    make_mosaic(images / "field3.fits", ny=128, nx=256, seed=20)
    small = run(cfg, incremental=True, progress=False)
    assert any("absorbed 32 new row(s)" in line for line in small.lines), small.lines
    ds = Store.open(store).dataset()
    new = _rows_of(store, "field3")
    assert len(new) == 32
    assert np.isfinite(ds.pca.values[new]).all() and (ds.cluster.values[new] >= 0).all()
    assert (
        np.isfinite(ds.embedding.values[new]).all()
        and np.isfinite(ds.outlier_score.values[new]).all()
    )
    np.testing.assert_array_equal(ds.pca.values[: len(old_pca)], old_pca)  # old rows untouched

    # A large addition (128 rows >= 25 % of 192): every stage is fitted again.
    for i in (4, 5):
        make_mosaic(images / f"field{i}.fits", ny=256, nx=256, seed=30 + i)
    big = run(cfg, incremental=True, progress=False)
    assert any("fitted on every row" in line for line in big.lines), big.lines
    assert Store.open(store).attrs["runner"]["fitted_rows"] == 192 + 32 + 128

    # A changed file: its old rows are retired and it is fingerprinted again.
    time.sleep(0.01)
    old_rows = _rows_of(store, "field1")
    (images / "field1.fits").unlink()
    make_mosaic(images / "field1.fits", ny=256, nx=256, seed=99)
    changed = run(cfg, incremental=True, progress=False)
    assert any("1 changed image(s) fingerprinted again" in line for line in changed.lines), (
        changed.lines
    )
    ds = Store.open(store).dataset()
    assert not ds.valid.values[old_rows].any()
    assert len(_rows_of(store, "field1")) == 64
    table = Store.open(store).images()
    (retired,) = np.flatnonzero(table.column("retired"))
    assert table.ids[retired] == "field1" and table.record(retired)["retired_rows"] == 64
    assert "retired" not in Store.open(store).attrs  # per-image facts live in the table


def test_run_config_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("elodin:\n  run:\n    inputs: [a.fits]\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: elodin.run.store is not set"):
        run(bad, progress=False)
    typo = tmp_path / "typo.yaml"
    typo.write_text("elodin:\n  run:\n    store: s.zarr\n    stagez: [fingerprint]\n")
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "run", str(typo)],
        capture_output=True,
        text=True,
        env=os.environ,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "unknown configuration key(s): elodin.run.stagez" in result.stderr


def test_changed_input_is_refused_without_incremental(tmp_path):
    from pipeline.errors import StoreError
    from pipeline.fingerprint import fingerprint

    img = make_mosaic(tmp_path / "f.fits", ny=128, nx=128)
    out = tmp_path / "s.zarr"
    kw = {"size": 32, "model": "efficientnet-lite0:native", "workers": 1, "progress": False}
    fingerprint([img], out, **kw)
    before = store_digest(out)
    data = fits.getdata(img)
    fits.writeto(img, data * 2, overwrite=True)
    os.utime(img, (time.time() + 5, time.time() + 5))
    with pytest.raises(StoreError, match="changed since it was fingerprinted"):
        fingerprint([img], out, **kw)
    assert store_digest(out) == before
    # With --incremental a changed input is retired, but only once the new file is known to be
    # usable: an all-NaN replacement is refused before the old rows are touched.
    fits.writeto(img, np.full_like(data, np.nan), overwrite=True)
    from pipeline.errors import InputError

    with pytest.raises(InputError, match="NaN"):
        fingerprint([img], out, replace_changed=True, **kw)
    assert store_digest(out) == before


def _elodin_run(cfg: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "run", str(cfg), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_run_with_a_bad_setting_writes_nothing(tmp_path):
    """`elodin run` refuses a setting the workers would have refused (a bad preprocess.scope)
    with one line, before the store exists or while an existing one stays byte-identical;
    the corrected config then runs into the same store."""
    images = tmp_path / "images"
    images.mkdir()
    make_mosaic(images / "field0.fits", ny=128, nx=128, seed=10)
    good = _config(tmp_path, stages=("fingerprint",))
    bad = tmp_path / "bad.yaml"
    bad.write_text(good.read_text() + "  preprocess:\n    scope: everywhere\n")
    store = tmp_path / "survey.zarr"

    def refused() -> None:
        result = _elodin_run(bad)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        lines = [line for line in result.stderr.splitlines() if line.startswith("elodin: error:")]
        assert len(lines) == 1 and "preprocess.scope" in lines[0], result.stderr

    refused()
    assert not store.exists()
    ok = _elodin_run(good)
    assert ok.returncode == 0, ok.stderr
    before = store_digest(store)
    make_mosaic(images / "field1.fits", ny=128, nx=128, seed=11)  # new rows would grow it
    refused()
    assert store_digest(store) == before


def test_run_refuses_a_bad_reduce_setting_before_it_writes(tmp_path):
    """A bad ``analysis.reduce.scale`` is refused before the fingerprint stage writes a store."""
    images = tmp_path / "images"
    images.mkdir()
    make_mosaic(images / "field0.fits", ny=128, nx=128, seed=10)
    cfg = _config(tmp_path, stages=("fingerprint", "reduce"))
    cfg.write_text(cfg.read_text().replace("components: 8", "components: 8\n      scale: often"))
    result = _elodin_run(cfg)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("elodin: error:")]
    assert len(lines) == 1 and "analysis.reduce.scale" in lines[0], result.stderr
    assert not (tmp_path / "survey.zarr").exists()


def test_absorption_uses_the_settings_the_stages_recorded(tmp_path):
    """`elodin outliers -k 20` (and embed / cluster / reduce) then an incremental absorption:
    the new rows are placed by the models restored from the store with the recorded k,
    reference, seed and n_neighbors, not with the configuration of the absorbing run."""
    import dask.config
    from analysis_store import append_rows, build_store
    from sklearn.neighbors import NearestNeighbors

    from pipeline import analysis
    from pipeline.analysis import _base
    from pipeline.runner import absorb_rows

    rng = np.random.default_rng(4)
    X = rng.normal(size=(240, 10)).astype(np.float32)
    X[:, 3] *= 40.0  # one wide feature: the standardised basis differs from the plain one
    st, _ = build_store(tmp_path / "s.zarr", X, chunk_rows=16)
    analysis.reduce(st.path, components=5, scale=True)
    analysis.cluster(st.path, n_clusters=3)
    analysis.embed(st.path, method="tsne", sample_size=120, n_neighbors=7, seed=2)
    analysis.outliers(st.path, k=20, reference_size=100, seed=3)
    start = Store.open(st.path).n_rows
    X_new = (rng.normal(size=(40, 10)) + 0.5).astype(np.float32)
    new = append_rows(Store.open(st.path, mode="r+"), X_new, image="img1")
    st = Store.open(st.path, mode="r+")
    other = {
        "elodin.analysis.outliers.k": 5,
        "elodin.analysis.outliers.reference-size": 50,
        "elodin.analysis.seed": 99,
        "elodin.analysis.embed.n-neighbors": 3,
        "elodin.analysis.reduce.scale": False,
    }
    with dask.config.set(other):
        assert absorb_rows(st, start, st.n_rows) == 40
        scorer, placer = analysis.load_outliers(st), analysis.load_embedding(st)
    assert (scorer.k, scorer.reference_size, scorer.random_state) == (20, 100, 3)
    assert placer.n_neighbors == 7

    ds = Store.open(st.path).dataset()
    pca = ds.pca.values.astype(np.float64)
    np.testing.assert_allclose(pca[new], analysis.load_pca(st).transform(X_new), atol=1e-5)
    # Projected in the recorded, standardised basis (each feature over its spread), not the
    # plain one the absorbing run's configuration names.
    saved = Store.open(st.path).dataset()
    standardised = (X_new - saved.pca_mean.values) / saved.pca_scale.values
    np.testing.assert_allclose(
        pca[new], standardised @ saved.pca_components.values.T, rtol=1e-4, atol=1e-4
    )
    assert np.ptp(saved.pca_scale.values) > 10
    centres = ds.cluster_centers.values
    d2 = ((pca[new, None, :] - centres[None]) ** 2).sum(axis=2)
    np.testing.assert_array_equal(ds.cluster.values[new], d2.argmin(axis=1))

    # The outlier reference: the recorded sample of the rows outliers() saw, k = 20.
    ref = _base.sample_valid(st, 100, seed=3, block=16, stop=start)
    np.testing.assert_array_equal(scorer.reference_index_, ref)
    dist, _ = NearestNeighbors(n_neighbors=20).fit(pca[ref]).kneighbors(pca[new])
    np.testing.assert_allclose(ds.outlier_score.values[new], dist.mean(axis=1), rtol=1e-5)
    dist5, _ = NearestNeighbors(n_neighbors=5).fit(pca[ref]).kneighbors(pca[new])
    assert not np.allclose(ds.outlier_score.values[new], dist5.mean(axis=1), rtol=1e-3)

    # The map: each new row at the mean position of its 7 nearest rows of the fitted sample.
    sample = _base.sample_valid(st, 120, seed=2, block=16, stop=start)
    _, ind = NearestNeighbors(n_neighbors=7).fit(pca[sample]).kneighbors(pca[new])
    want = ds.embedding.values[sample][ind].mean(axis=1)
    np.testing.assert_allclose(ds.embedding.values[new], want, rtol=1e-5, atol=1e-5)
