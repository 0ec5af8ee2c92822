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
from test_fingerprint import make_mosaic, store_digest

from pipeline.errors import ConfigError
from pipeline.runner import run
from pipeline.store import Store


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
