"""End-to-end fingerprinting on a real LocalCluster (processes) into real Zarr stores."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import dask.config
import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from pipeline.errors import StoreError
from pipeline.fingerprint import fingerprint, gpu_share
from pipeline.store import Store, chunk_rows_for, pack_units
from pipeline.testing import error_lines, fingerprint_command, make_mosaic, store_digest

MODEL = "efficientnet-lite0:native"  # 64x64 cutouts straight in: the fastest real model
# Small tiles and chunks so that a small mosaic still makes many work units.
SETTINGS = {
    "method": "sliding",
    "size": 64,
    "stride": 64,
    "tile_size": 256,
    "chunk_rows": 16,
    "model": MODEL,
}


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            resources={"GPU": 1},
        ) as cluster,
        Client(cluster) as c,
    ):
        yield c


@pytest.fixture(scope="module")
def mosaic(tmp_path_factory) -> Path:
    return make_mosaic(tmp_path_factory.mktemp("mosaic") / "field.fits")


@pytest.fixture(scope="module")
def clean_store(tmp_path_factory, mosaic, client) -> Path:
    out = tmp_path_factory.mktemp("clean") / "clean.zarr"
    fingerprint([mosaic], out, client=client, progress=False, **SETTINGS)
    return out


def test_every_planned_cutout_once_and_rows_aligned(clean_store, mosaic, lite0_native_onnx):
    from pipeline.models import get_session
    from pipeline.preprocess import image_limits_for, stretch_cutouts
    from pipeline.sources import open_sources

    ds = Store.open(clean_store).dataset().load()
    valid = ds.valid.values
    ny, nx = fits.getdata(mosaic).shape
    # 640 x 768 in 64-pixel windows, stride 64: exactly 10 x 12 windows.
    assert valid.sum() == 10 * 12
    centres = set(zip(ds.x.values[valid], ds.y.values[valid], strict=True))
    expected = {(x0 + 31.5, y0 + 31.5) for y0 in range(0, ny, 64) for x0 in range(0, nx, 64)}
    assert centres == expected, "every planned window once, none twice, none extra"
    assert np.isfinite(ds.fingerprint.values[valid]).all()
    assert not np.isfinite(ds.fingerprint.values[~valid]).any()

    # Rows and coordinates are aligned: the stored fingerprint of a row is the model's output on
    # the window read straight from the FITS at that row's x, y.
    data = fits.getdata(mosaic).astype(np.float32)
    limits = image_limits_for(open_sources([mosaic])[0])  # the default stretch is per image
    session = get_session(lite0_native_onnx, threads=1)
    rows = np.flatnonzero(valid)[[0, 7, 33, 64, 119]]
    for r in rows:
        x0, y0 = int(ds.x.values[r] - 31.5), int(ds.y.values[r] - 31.5)
        cut = data[y0 : y0 + 64, x0 : x0 + 64][None, None]
        rgb, _ = stretch_cutouts(cut, image_limits=limits)
        out = session.infer(rgb)
        np.testing.assert_allclose(ds.fingerprint.values[r], out.features[0], atol=1e-4)
        np.testing.assert_array_equal(ds.top_class.values[r], out.top_class[0])

    # Sky coordinates through the image's WCS.
    w = WCS(fits.getheader(mosaic))
    sky = w.pixel_to_world(ds.x.values[valid], ds.y.values[valid])
    np.testing.assert_allclose(ds.ra.values[valid], sky.ra.deg, atol=1e-9)
    np.testing.assert_allclose(ds.dec.values[valid], sky.dec.deg, atol=1e-9)
    assert set(ds.image.values[valid]) == {"field"}


def test_store_records_what_made_it(clean_store, lite0_native_onnx):
    from pipeline.models.zoo import sha256_file

    attrs = Store.open(clean_store).attrs
    assert attrs["model"] == MODEL
    assert attrs["model_sha256"] == sha256_file(lite0_native_onnx)
    assert attrs["cutouts"]["size"] == 64 and attrs["cutouts"]["method"] == "sliding"
    assert attrs["preprocess"]["stretch"] and "pipeline_version" in attrs


def test_finished_run_does_no_inference(clean_store, mosaic, client):
    before = store_digest(clean_store)
    result = fingerprint([mosaic], clean_store, client=client, progress=False, **SETTINGS)
    assert result.units_run == 0 and result.units_skipped > 0
    assert store_digest(clean_store) == before


def test_other_model_or_settings_are_refused_and_store_unchanged(
    clean_store, mosaic, client, tmp_path
):
    before = store_digest(clean_store)
    other = make_mosaic(tmp_path / "other.fits", seed=2)
    with pytest.raises(StoreError, match="made with model"):
        fingerprint(
            [other],
            clean_store,
            client=client,
            progress=False,
            **{**SETTINGS, "model": "efficientnet-lite0"},
        )
    with pytest.raises(StoreError, match="made with cutouts"):
        fingerprint(
            [other],
            clean_store,
            client=client,
            progress=False,
            **{**SETTINGS, "size": 48, "stride": 48},
        )
    assert store_digest(clean_store) == before


def test_a_growing_survey_appends_new_images(tmp_path, mosaic, client):
    out = tmp_path / "grow.zarr"
    fingerprint([mosaic], out, client=client, progress=False, **SETTINGS)
    other = make_mosaic(tmp_path / "second.fits", ny=320, nx=320, seed=3)
    result = fingerprint([mosaic, other], out, client=client, progress=False, **SETTINGS)
    ds = Store.open(out).dataset()
    valid = ds.valid.values
    assert valid.sum() == 120 + 25
    assert sorted(set(ds.image.values[valid])) == ["field", "second"]
    assert result.units_skipped > 0  # the first image's units were not run again
    assert len(Store.open(out).segments) == 2


@pytest.mark.parametrize("seed", range(5))
def test_chunk_size_gives_every_thread_its_units(seed):
    """pack_units makes at least floor(windows / chunk) units, so chunk_rows_for's chunk gives every
    thread at least units_per_thread of them, on any split of the windows into tiles."""
    rs = np.random.default_rng(seed)
    for _ in range(50):
        tile_start = np.r_[0, np.cumsum(rs.integers(1, 3000, rs.integers(1, 30)))]
        n, threads = int(tile_start[-1]), int(rs.integers(1, 17))
        chunk = chunk_rows_for(
            n, threads=threads, largest=1024, smallest=8, units_per_thread=4, multiple=8
        )
        lay = pack_units(tile_start, chunk_rows=chunk)
        assert n // chunk <= lay.n_units <= -(-n // chunk)
        if chunk > 8:  # not held up by the smallest chunk
            assert chunk % 8 == 0 and lay.n_units >= 4 * threads
        assert chunk <= 1024 and (lay.unit_rows % chunk == 0).all()  # whole chunks per unit
        assert (np.diff(lay.unit_rows) > 0).all()  # each chunk in one unit: one writer


def test_a_small_job_gives_every_worker_thread_several_units(tmp_path, client):
    """2,000 windows under the default 1024-row chunks were 2 units for 2 worker threads; the
    store now takes smaller chunks for it: at least 4 units per thread, each chunk written by
    one unit, and the chunk size recorded, so an append keeps it."""
    img = make_mosaic(tmp_path / "small.fits", ny=40 * 64, nx=50 * 64, seed=6)
    out = tmp_path / "small.zarr"
    kw = {k: v for k, v in SETTINGS.items() if k not in ("chunk_rows", "tile_size")}
    result = fingerprint([img], out, client=client, progress=False, **kw)
    st = Store.open(out)
    threads = sum(w["nthreads"] for w in client.scheduler_info()["workers"].values())
    assert threads == 2 and result.n_cutouts == 2000
    assert st.n_units == result.units_run >= 4 * threads
    chunk = st.chunk_rows
    assert 128 <= chunk < 1024 and chunk % 64 == 0  # a whole number of batches of 64
    for name in ("fingerprint", "valid", "image", "x"):
        assert st.array(name).chunks[0] == chunk
    lay = pack_units(st.load_plan(0).tile_start, chunk_rows=chunk)
    assert (lay.unit_rows % chunk == 0).all() and (np.diff(lay.unit_rows) > 0).all()
    assert st.done_units() == set(range(st.n_units))
    ds = st.dataset()
    assert int(ds.valid.sum()) == 2000
    assert (
        len(set(zip(ds.x.values[ds.valid.values], ds.y.values[ds.valid.values], strict=True)))
        == 2000
    )

    # A later, smaller job would pick another size; the store keeps its own.
    other = make_mosaic(tmp_path / "tiny.fits", ny=256, nx=256, seed=7)
    fingerprint([img, other], out, client=client, progress=False, **kw)
    st = Store.open(out)
    assert st.chunk_rows == chunk and st.array("fingerprint").chunks[0] == chunk
    assert int(st.dataset().valid.sum()) == 2016


def test_gpu_resource_restriction_reaches_the_scheduler(tmp_path, mosaic, client):
    def install(dask_scheduler):
        from distributed.diagnostics.plugin import SchedulerPlugin

        class Recorder(SchedulerPlugin):
            name = "elodin-test-recorder"

            def __init__(self):
                self.seen = {}

            def transition(self, key, start, finish, *args, **kwargs):
                ts = dask_scheduler.tasks.get(key)
                if ts is not None and str(key).startswith("elodin-unit"):
                    self.seen[str(key)] = dict(ts.resource_restrictions or {})

        dask_scheduler.add_plugin(Recorder(), name="elodin-test-recorder")

    client.run_on_scheduler(install)
    # The GPU=1 slots of this cluster run the CPU provider (no GPU here): name it explicitly,
    # since --gpu with automatic providers insists on CUDA.
    with dask.config.set({"elodin.model.providers": ["CPUExecutionProvider"]}):
        fingerprint(
            [mosaic], tmp_path / "gpu.zarr", client=client, progress=False, gpu=True, **SETTINGS
        )
    seen = client.run_on_scheduler(
        lambda dask_scheduler: dask_scheduler.plugins["elodin-test-recorder"].seen
    )
    assert seen and all(r == {"GPU": gpu_share()} for r in seen.values())


def _cli(*args: str, **kw) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", *args]


def _fingerprint_cmd(*inputs: str, out: Path, model: str = MODEL, extra: tuple = ()) -> list[str]:
    """`elodin fingerprint` with the SETTINGS of this module (chunk rows come from the env)."""
    return fingerprint_command(
        *inputs, out=out, model=model, size=64, stride=64, tile_size=256, progress=True, extra=extra
    )


def _n_markers(done_dir) -> int:
    """Done markers written so far (one file per unit, in shards: Store.mark_done)."""
    return sum(1 for p in done_dir.rglob("*") if p.is_file() and p.name.isdigit())


def test_killed_client_resumes_to_the_same_store(tmp_path, client):
    """kill -9 of the client (and its local workers) mid-run; the same command finishes the job
    and the store equals a clean run's."""
    mosaic = make_mosaic(tmp_path / "field.fits", ny=1024, nx=1280, seed=5)
    # The 224 model: slow enough on this machine that the kill lands mid-run (20 units).
    settings = {**SETTINGS, "model": "efficientnet-lite0"}
    clean = tmp_path / "clean.zarr"
    fingerprint([mosaic], clean, client=client, progress=False, **settings)

    out = tmp_path / "resumed.zarr"
    cmd = _fingerprint_cmd(
        str(mosaic), out=out, model="efficientnet-lite0", extra=("--no-progress",)
    )
    env = {**os.environ, "ELODIN__FINGERPRINT__CHUNK_ROWS": "16"}
    proc = subprocess.Popen(
        cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    done_dir = out / "done"
    deadline = time.time() + 240
    while time.time() < deadline:
        if done_dir.is_dir() and _n_markers(done_dir) >= 3:
            break
        if proc.poll() is not None:
            pytest.fail(
                f"run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
            )
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    n_done = _n_markers(done_dir)
    n_units = Store.open(out).n_units
    assert 0 < n_done < n_units == 20, "the kill landed mid-run"

    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{n_units - n_done} work unit(s) run, {n_done} already done" in rerun.stdout

    a = Store.open(clean).dataset().load()
    b = Store.open(out).dataset().load()
    for name in ("valid", "x", "y", "width", "height", "ra", "dec", "image", "top_class"):
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)
    np.testing.assert_allclose(
        a.fingerprint.values, b.fingerprint.values, atol=1e-4, equal_nan=True
    )


def _bad(tmp_path: Path, name: str) -> list[str]:
    """Inputs that must each be refused with one line naming the file."""
    if name == "missing":
        return [str(tmp_path / "nope.fits")]
    if name == "truncated":
        good = make_mosaic(tmp_path / "t.fits", ny=128, nx=128)
        data = good.read_bytes()
        (tmp_path / "trunc.fits").write_bytes(data[: len(data) // 2])
        return [str(tmp_path / "trunc.fits")]
    if name == "all-nan":
        fits.PrimaryHDU(np.full((128, 128), np.nan, np.float32)).writeto(tmp_path / "nan.fits")
        return [str(tmp_path / "nan.fits")]
    if name == "too-small":
        fits.PrimaryHDU(np.ones((40, 50), np.float32)).writeto(tmp_path / "small.fits")
        return [str(tmp_path / "small.fits")]
    if name == "table-hdu":
        from astropy.table import Table

        Table({"a": [1, 2]}).write(tmp_path / "tab.fits")
        return [str(tmp_path / "tab.fits") + "[1]"]
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["missing", "truncated", "all-nan", "too-small", "table-hdu"])
def test_cli_bad_input_is_one_line_and_the_store_is_untouched(tmp_path, clean_store, name):
    before = store_digest(clean_store)
    args = _bad(tmp_path, name)
    cmd = _fingerprint_cmd(*args, out=clean_store, extra=("--no-progress",))
    env = {**os.environ, "ELODIN__FINGERPRINT__CHUNK_ROWS": "16"}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    stem = Path(args[0].split("[")[0]).name
    assert stem in lines[0], lines[0]
    assert store_digest(clean_store) == before


# Settings that only the workers (stretch, sessions), detection or the task loop read: each
# must be refused with one line before anything is written, never after the store was made.
BAD_SETTINGS = {
    "invalid scope": ({"SCOPE": "everywhere"}, "preprocess.scope"),
    "fixed without limits": ({"INTERVAL": "fixed"}, "preprocess.vmin / vmax"),
    "cutout scope, limits reversed": (
        {"SCOPE": "cutout", "INTERVAL": "fixed", "VMIN": "5.0", "VMAX": "1.0"},
        "preprocess.vmin / vmax",
    ),
    "unknown stretch": ({"STRETCH": "cubic"}, "preprocess.stretch"),
    "unknown interval": ({"INTERVAL": "histeq"}, "preprocess.interval"),
    "percentile above 100": ({"PERCENTILE": "150"}, "preprocess.percentile"),
    "negative asinh-a": ({"ASINH_A": "-1.0"}, "preprocess.asinh-a"),
    "nan-fill above 1": ({"NAN_FILL": "2.0"}, "preprocess.nan-fill"),
    "a band the image lacks": ({"BANDS": "[0, 1, 2]"}, "preprocess.bands"),
    "unknown provider": ({"/MODEL__PROVIDERS": "['FooExecutionProvider']"}, "model.providers"),
    "unknown cudnn search": (
        {"/MODEL__CUDA__CUDNN_CONV_ALGO_SEARCH": "FAST"},
        "cudnn-conv-algo-search",
    ),
    "no gpu units": ({"/FINGERPRINT__GPU_UNITS": "0"}, "fingerprint.gpu-units"),
    "no session threads": ({"/MODEL__THREADS": "0"}, "model.threads"),
}


def _bad_env(values: dict) -> dict:
    """``ELODIN__PREPROCESS__KEY`` variables (``/SECTION__KEY`` for other sections)."""
    env = {**os.environ, "ELODIN__FINGERPRINT__CHUNK_ROWS": "16"}
    for key, value in values.items():
        name = key[1:] if key.startswith("/") else f"PREPROCESS__{key}"
        env[f"ELODIN__{name}"] = value
    return env


def _refused(cmd: list[str], env: dict, key: str) -> None:
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and key in lines[0], result.stderr


@pytest.mark.parametrize("case", sorted(BAD_SETTINGS))
def test_bad_setting_is_one_line_and_creates_no_store(tmp_path, mosaic, case):
    values, key = BAD_SETTINGS[case]
    out = tmp_path / "new.zarr"
    _refused(
        _fingerprint_cmd(str(mosaic), out=out, extra=("--no-progress",)), _bad_env(values), key
    )
    assert not out.exists()


@pytest.mark.parametrize("case", sorted(BAD_SETTINGS))
def test_bad_setting_leaves_an_existing_store_byte_identical(tmp_path, clean_store, mosaic, case):
    values, key = BAD_SETTINGS[case]
    out = tmp_path / "copy.zarr"
    shutil.copytree(clean_store, out)
    before = store_digest(out)
    other = make_mosaic(tmp_path / "other.fits", ny=256, nx=256, seed=2)  # new rows would grow it
    cmd = _fingerprint_cmd(str(mosaic), str(other), out=out, extra=("--no-progress",))
    _refused(cmd, _bad_env(values), key)
    assert store_digest(out) == before


def test_refused_settings_then_the_corrected_rerun_into_the_same_path(tmp_path, mosaic):
    """The refused run poisons nothing: the corrected command, same path, makes the store."""
    out = tmp_path / "fixed.zarr"
    cmd = _fingerprint_cmd(str(mosaic), out=out, extra=("--no-progress",))
    _refused(cmd, _bad_env({"SCOPE": "everywhere"}), "preprocess.scope")
    good = subprocess.run(
        cmd, env=_bad_env({"SCOPE": "cutout"}), capture_output=True, text=True, timeout=300
    )
    assert good.returncode == 0, good.stderr
    assert "120 cutouts" in good.stdout
    assert Store.open(out).attrs["preprocess"]["scope"] == "cutout"


def test_image_smaller_than_a_cutout_under_drop_creates_nothing(tmp_path):
    fits.PrimaryHDU(np.ones((40, 50), np.float32)).writeto(tmp_path / "small.fits")
    out = tmp_path / "new.zarr"
    cmd = _cli(
        "fingerprint",
        str(tmp_path / "small.fits"),
        "-o",
        str(out),
        "--edge",
        "drop",
        "--model",
        MODEL,
        "--workers",
        "1",
    )
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "small" in result.stderr and "smaller than" in result.stderr
    assert not out.exists()


def test_cli_fingerprint_then_demo_style_rerun(tmp_path, mosaic):
    out = tmp_path / "cli.zarr"
    cmd = _fingerprint_cmd(str(mosaic), out=out)
    env = {**os.environ, "ELODIN__FINGERPRINT__CHUNK_ROWS": "16"}
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert "120 cutouts" in first.stdout
    assert "fingerprint" in first.stderr and "cutout" in first.stderr  # the progress bar
    assert "Dask dashboard: http" in first.stderr
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert "0 work unit(s) run" in again.stdout


def test_a_segment_resumes_whole_reopening_images_not_given_again(tmp_path, client):
    """Units of an image that is not among this run's inputs are redone from the store's
    record of that image (HDU included), so the store ends as a clean run would."""
    from astropy.io import fits as afits

    a = make_mosaic(tmp_path / "a.fits", ny=256, nx=256, seed=7)
    data = afits.getdata(make_mosaic(tmp_path / "tmp.fits", ny=256, nx=256, seed=8))
    b = tmp_path / "b.fits"
    afits.HDUList([afits.PrimaryHDU(), afits.ImageHDU(data, name="SCI")]).writeto(b)
    out = tmp_path / "seg.zarr"
    fingerprint([a, f"{b}[SCI]"], out, client=client, progress=False, **SETTINGS)
    clean = Store.open(out).dataset().load()
    rows_b = np.flatnonzero(clean.image.values == "b[SCI]")
    assert len(rows_b) == 16
    # Forget the units holding b's rows, as if the run had died before them.
    st = Store.open(out, mode="r+")
    b_units = {u for u in st.done_units() if u >= st.n_units // 2}
    st.clear_done(sorted(b_units))
    again = fingerprint([a], out, client=client, progress=False, **SETTINGS)
    assert again.units_run == len(b_units) > 0
    ds = Store.open(out).dataset().load()
    np.testing.assert_array_equal(ds.valid.values, clean.valid.values)
    np.testing.assert_allclose(
        ds.fingerprint.values, clean.fingerprint.values, atol=1e-5, equal_nan=True
    )


def test_user_model_without_feature_dim_in_its_card(tmp_path, client):
    """A user ONNX with a card that does not give feature_dim: the store takes it from the model."""
    from pipeline.testing import TINY_CARD as CARD
    from pipeline.testing import tiny_onnx as _tiny_onnx

    _tiny_onnx(tmp_path / "tiny.onnx")
    (tmp_path / "tiny.yaml").write_text(CARD)
    img = make_mosaic(tmp_path / "f.fits", ny=256, nx=256, seed=4)
    out = tmp_path / "user.zarr"
    fingerprint(
        [img],
        out,
        client=client,
        progress=False,
        **{**SETTINGS, "model": str(tmp_path / "tiny.onnx")},
    )
    ds = Store.open(out).dataset()
    assert (
        ds.fingerprint.shape[1] == 8 and np.isfinite(ds.fingerprint.values[ds.valid.values]).all()
    )


def test_model_threads_setting_reaches_every_worker_session():
    # config model.threads was documented but never read: sessions always took the host's share.
    import dask.config

    from pipeline.fingerprint import ModelRef, _session_threads

    with dask.config.set({"elodin.model.threads": 3}):
        per_host = _session_threads(client=None)  # set: no worker is asked
    ref = ModelRef("m", "m.onnx", "0" * 64, "auto", 5, per_host)
    assert ref.threads() == 3
    assert ModelRef("m", "m.onnx", "0" * 64, "auto", 5, ()).threads() is None


# -------------------------------------------------------------------- survey scale (issue 14)
def _corrupt_keeping_size_and_mtime(path: Path) -> None:
    """Overwrite a file's bytes with garbage of the same length and put its mtime back: the
    listing sees it unchanged, and anything that opens it fails."""
    st = path.stat()
    path.write_bytes(b"\0not a FITS file\0" * (st.st_size // 17) + b"\0" * (st.st_size % 17))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_no_op_rerun_opens_no_image_and_writes_nothing(tmp_path, client):
    """Nothing new: the inputs are recognised from the store's records by (path, size, mtime)
    alone. Every file is made unreadable first, so opening any one of them fails the run."""
    files = [make_mosaic(tmp_path / f"p{i}.fits", ny=128, nx=128, seed=40 + i) for i in range(3)]
    out = tmp_path / "noop.zarr"
    first = fingerprint(files, out, client=client, progress=False, **SETTINGS)
    assert first.units_run > 0
    before = store_digest(out)
    for f in files:
        _corrupt_keeping_size_and_mtime(f)
    # No client given either: a run with nothing to do starts no cluster.
    again = fingerprint(files, out, progress=False, **SETTINGS)
    assert again.units_run == 0 and again.units_skipped == first.units_run
    assert again.n_cutouts == first.n_cutouts and again.images == first.images
    assert store_digest(out) == before
    # The same corruption with a new mtime is a changed input: refused, store untouched.
    os.utime(files[0])
    with pytest.raises(StoreError, match="p0.*changed since it was fingerprinted"):
        fingerprint(files, out, progress=False, **SETTINGS)
    assert store_digest(out) == before


def test_new_images_are_opened_and_measured_on_the_workers(tmp_path, client, monkeypatch):
    """The client opens no image and measures no limits: both are batched tasks on the
    (process) workers, which the client's patches below do not reach."""
    import pipeline.preprocess
    import pipeline.sources.inputs

    def refuse(*args, **kwargs):
        raise AssertionError("an image was opened or measured on the client")

    monkeypatch.setattr(pipeline.sources.inputs, "_probe", refuse)
    monkeypatch.setattr(pipeline.preprocess, "image_limits_for", refuse)
    files = [make_mosaic(tmp_path / f"w{i}.fits", ny=128, nx=128, seed=60 + i) for i in range(3)]
    out = tmp_path / "probed.zarr"
    got = fingerprint(files, out, client=client, progress=False, **SETTINGS)
    assert got.n_cutouts == 3 * 4 and got.units_run > 0
    table = Store.open(out).images()
    assert all(table.limits(i) is not None for i in range(len(table.ids)))


def _write_schema_1(path: Path) -> None:
    """Rewrite a store in the layout schema 1 (the code before issue 14) wrote: every image's
    record in the root attrs (``segments[*].images`` / ``inputs``, ``retired``), no
    ``images/`` table. Field by field what that code's ``append_segment`` and
    ``retire_image`` stored."""
    import zarr

    group = zarr.open_group(str(path), mode="r+", zarr_format=3)
    st = Store.open(path)
    table = st.images()
    segments, retired = [], []
    for index, seg in enumerate(st.segments):
        inputs, images = {}, []
        for i in table.in_segment(index, retired=True):
            rec = table.record(i)
            old = {
                "files": [
                    {"path": f["path"], "size": f["size"], "mtime": str(f["mtime"])}
                    for f in rec["files"]
                ],
                "source": rec["source"],
                "limits": rec["limits"],
            }
            if rec["retired"]:
                retired.append(
                    {
                        "id": rec["id"],
                        "segment": index,
                        "reason": rec["retired_reason"],
                        "rows": rec["retired_rows"],
                        **old,
                    }
                )
            else:
                images.append(rec["id"])
                inputs[rec["id"]] = old
        segments.append(
            {
                "images": images,
                "row_start": seg.row_start,
                "row_stop": seg.row_stop,
                "unit_start": seg.unit_start,
                "unit_stop": seg.unit_stop,
                "plan_digest": seg.plan_digest,
                "inputs": inputs,
            }
        )
    for index in range(len(st.segments)):  # schema 1 kept a plan's image ids in its attrs
        plan_group = group["plans"][str(index)]
        ids = [str(v) for v in plan_group["images"][...]]
        del plan_group["images"]
        plan_group.attrs["images"] = ids
    attrs = {**group.attrs.asdict(), "elodin_schema": 1, "segments": segments}
    if retired:
        attrs["retired"] = retired
    group.attrs.put(attrs)
    del group["images"]


def _tree(path: Path) -> dict[str, bytes]:
    return {
        str(f.relative_to(path)): f.read_bytes()
        for f in sorted(path.rglob("*"))
        if f.is_file() and "locks" not in f.parts
    }


def test_an_upgraded_schema_1_store_equals_a_fresh_one(tmp_path, client):
    """A store in the old layout (two segments, one image retired and fingerprinted again) is
    refused with the upgrade command, and `elodin upgrade` makes it the store a fresh run
    writes, file for file."""
    from pipeline.store import upgrade

    a = make_mosaic(tmp_path / "a.fits", ny=128, nx=256, seed=50)
    b = make_mosaic(tmp_path / "b.fits", ny=128, nx=128, seed=51)
    fresh = tmp_path / "fresh.zarr"
    fingerprint([a], fresh, client=client, progress=False, **SETTINGS)
    fingerprint([a, b], fresh, client=client, progress=False, **SETTINGS)
    time.sleep(0.01)
    make_mosaic(a, ny=128, nx=256, seed=52)  # a changed: retired, then fingerprinted again
    fingerprint([a, b], fresh, client=client, progress=False, replace_changed=True, **SETTINGS)
    table = Store.open(fresh).images()
    assert table.ids.tolist() == ["a", "b", "a"] and table.column("retired").tolist() == [
        True,
        False,
        False,
    ]
    old = tmp_path / "old.zarr"
    shutil.copytree(fresh, old)
    _write_schema_1(old)
    with pytest.raises(StoreError, match=r"schema 1 .*run `elodin upgrade .*old\.zarr`"):
        Store.open(old)
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "upgrade", str(old)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "upgraded from schema 1 to 2 (3 image record(s)" in result.stdout
    assert _tree(old) == _tree(fresh)
    assert "already at schema 2" in upgrade(old)


def test_a_failed_upgrade_leaves_the_store_as_it_was(tmp_path, clean_store, monkeypatch):
    from pipeline import store as store_module

    old = tmp_path / "old.zarr"
    shutil.copytree(clean_store, old)
    _write_schema_1(old)
    before = store_digest(old)
    real = store_module.Store._append_images

    def fail_after_writing(self, *args, **kwargs):
        real(self, *args, **kwargs)  # the table is half written when the disk goes
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store_module.Store, "_append_images", fail_after_writing)
    with pytest.raises(StoreError, match="No space left on device.*still at schema 1"):
        store_module.upgrade(old)
    assert store_digest(old) == before
    monkeypatch.undo()
    shutil.rmtree(old / "plans" / "0")  # a segment without its saved plan cannot be upgraded
    before = store_digest(old)
    with pytest.raises(StoreError, match="segment 0 has no saved plan"):
        store_module.upgrade(old)
    assert store_digest(old) == before
