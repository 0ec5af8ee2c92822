"""New images are opened and measured on the workers, in batches, and a bad one is still one
line: the first in the order the client used to check them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from pipeline.errors import ConfigError, InputError, StoreError
from pipeline.fingerprint import InputListing, probe
from pipeline.testing import make_mosaic


@pytest.fixture(scope="module")
def client():
    from pipeline.testing import local_compute

    with local_compute(n_workers=1, threads_per_worker=2, processes=False) as c:
        yield c


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("probe")
    good = [make_mosaic(d / f"g{i}.fits", ny=64, nx=64, seed=i) for i in range(5)]
    (d / "bad.fits").write_bytes(b"\0not a FITS file\0" * 200)
    fits.PrimaryHDU(np.full((64, 64), np.nan, np.float32)).writeto(d / "nan.fits")
    return [*good, d / "bad.fits", d / "nan.fits"]


def _preprocess(**over):
    from pipeline.preprocess import preprocess_settings

    return preprocess_settings(over)


def test_batches_give_the_same_sources_and_limits_as_the_client(client, files, monkeypatch):
    from pipeline.fingerprint.plan import _image_limits
    from pipeline.sources import open_listed

    listing = InputListing.of([str(f) for f in files[:5]])
    pre = _preprocess(scope="image")
    got = probe.probe_images(
        client, listing, range(5), hdu=None, variable=None, preprocess=pre, batch=2
    )
    want = [open_listed(i, s) for i, s in zip(listing.ids, listing.specs, strict=True)]
    # The sources stay on the workers: ids and shapes came back, no source yet.
    src = got.sources
    assert isinstance(src, probe.ProbedSources) and not src._held
    assert src.ids == listing.ids and src.shapes == tuple(tuple(s.shape) for s in want)
    assert [s.to_record() for s in src] == [s.to_record() for s in want]
    assert list(src._held) == [0, 1, 2]  # brought together (_GATHER batches from the first)
    monkeypatch.setattr(probe, "_GATHER", 1)
    src._held = {}
    assert src[3].id == want[3].id and list(src._held) == [1]  # one batch, then the next
    assert src.by_id()[want[2].id].to_record() == want[2].to_record()
    assert got.limits == _image_limits(want, pre) and len(got.limits) == 5
    assert not got.errors and got.limits_error is None


def test_the_first_problem_is_raised_in_the_order_the_client_checked(client, files):
    # Listing: g0 g1 g2 g3 g4 bad nan. "nan" cannot be measured, "bad" cannot be opened:
    # an image that does not open comes first, whatever the batch, and before the store check.
    listing = InputListing.of([str(f) for f in files])
    pre = _preprocess(scope="image")
    calls = []

    def check_store():
        calls.append(1)
        raise StoreError("the store refuses")

    with pytest.raises(InputError, match="bad.fits"):
        probe.open_and_measure(
            client,
            listing,
            range(7),
            [],
            hdu=None,
            variable=None,
            preprocess=pre,
            check_store=check_store,
        )
    assert not calls
    # Only changed images fail to open: the store check comes first.
    with pytest.raises(StoreError, match="refuses"):
        probe.open_and_measure(
            client,
            listing,
            [0, 1, 6],
            [5],
            hdu=None,
            variable=None,
            preprocess=pre,
            check_store=check_store,
        )
    # Everything opens: the limits' problem is the one line, naming the file.
    with pytest.raises(InputError, match="nan.fits"):
        probe.open_and_measure(
            client,
            listing,
            [0, 1, 2, 6],
            [],
            hdu=None,
            variable=None,
            preprocess=pre,
            check_store=lambda: None,
        )
    # A setting the image cannot take (bands) is found on the workers too.
    with pytest.raises(ConfigError, match="g0.fits"):
        probe.open_and_measure(
            client,
            listing,
            [0],
            [],
            hdu=None,
            variable=None,
            preprocess=_preprocess(bands=[0, 1, 2]),
            check_store=lambda: None,
        )


def test_a_file_that_kills_its_workers_is_named(tmp_path, files):
    """Workers that die opening an input (a reader that segfaults): the batch is probed again
    one image a task, and the run stops with one line naming that file, nothing written."""
    import dask

    from pipeline.fingerprint import fingerprint
    from pipeline.store import Store
    from pipeline.testing import CrashOnOpen, local_compute

    crash = tmp_path / "crash.fits"
    crash.write_bytes(Path(files[0]).read_bytes())
    inputs = [str(files[1]), str(crash), str(files[2]), str(files[3])]
    out = tmp_path / "out.zarr"
    with (
        dask.config.set({"distributed.scheduler.allowed-failures": 0}),
        local_compute(n_workers=1, dashboard_address=":0") as c,
    ):
        c.register_plugin(CrashOnOpen("crash.fits"))
        with pytest.raises(InputError, match=r"crash\.fits: the Dask workers opening it died"):
            fingerprint(inputs, out, client=c, progress=False, model="efficientnet-lite0:native")
    assert not Store.exists(out)


# What the unit tasks were given; the workers are this process's threads (a closure's list would
# be pickled with the task, a module's is not).
_SEEN: list = []


def _seen_task(job, probed=()):
    from pipeline.fingerprint.worker import _unit_task

    _SEEN.append(([type(t.source) for t in job.tiles], len(probed), job.image_limits))
    return _unit_task(job, probed)


def test_units_name_new_sources_by_place_and_the_client_never_brings_them(
    client, files, tmp_path, monkeypatch
):
    """Once units are being made, no probed source comes to the client: each unit names its new
    images by probe batch and place, and its task is given those batches as arguments."""
    import xarray as xr

    from pipeline.fingerprint import api, fingerprint, submit, worker

    making_units, brought, seen = [], [], _SEEN
    seen.clear()
    real_units, real_getitem = api._units, probe.ProbedSources.__getitem__

    def units(*a, **k):
        making_units.append(1)
        return real_units(*a, **k)

    def getitem(self, k):
        if making_units:
            brought.append(k)
        return real_getitem(self, k)

    monkeypatch.setattr(api, "_units", units)
    monkeypatch.setattr(probe.ProbedSources, "__getitem__", getitem)
    monkeypatch.setattr(submit, "_unit_task", _seen_task)
    monkeypatch.setattr(probe, "BATCH", 2)  # five images: three probe batches
    out = tmp_path / "refs.zarr"
    inputs = [str(f) for f in files[:5]]
    fingerprint(inputs, out, client=client, progress=False, model="efficientnet-lite0:native")
    assert making_units and not brought, "a probed source was brought to the client"
    assert seen and all(kinds == [worker.ProbedRef] * len(kinds) for kinds, _, _ in seen)
    assert all(n >= 1 for _, n, _ in seen) and all(not lim for _, _, lim in seen)
    # The same fingerprints as sources held on the client: a plain run of each image alone.
    monkeypatch.undo()
    ds = xr.open_zarr(out, consolidated=False)
    for f in files[:2]:
        one = tmp_path / f"{Path(f).stem}.zarr"
        fingerprint([str(f)], one, client=client, progress=False, model="efficientnet-lite0:native")
        alone = xr.open_zarr(one, consolidated=False)
        own = alone["valid"].values
        rows = ds["image"].values == alone["image"].values[own][0]
        assert rows.sum() == own.sum() >= 1
        np.testing.assert_array_equal(
            ds["fingerprint"].values[rows], alone["fingerprint"].values[own]
        )


def test_a_batch_is_let_go_once_every_image_of_it_is_in_a_unit(client, files):
    """The client holds a probe batch until each of its images has been handed to a unit;
    then only those units hold it, and the workers drop it when they are done."""
    import gc

    listing = InputListing.of([str(f) for f in files[:5]])
    got = probe.probe_images(
        client, listing, range(5), hdu=None, variable=None, preprocess=_preprocess(), batch=2
    )
    src = got.sources
    key = src._batches[0].key
    first = src.ref(0)
    assert client.refcount[key] >= 1 and src._batches[0] is first[0]
    again = src.ref(0)  # the same image again (a unit made again): still held
    second = src.ref(1)
    assert second[0].key == key and second[1].index == 1
    # Every image of batch 0 handed out: the jobs' references are the only ones left.
    assert client.refcount[key] >= 1 and src._batches[0] is not first[0]
    assert src.ref(1)[0].key == key  # found through the jobs still alive
    del first, again, second
    gc.collect()
    assert client.refcount.get(key, 0) == 0
    with pytest.raises(RuntimeError, match="let go while still needed"):
        src.ref(0)
    # Batch 1, half handed out, is still held by the client.
    third = src.ref(2)
    del third
    gc.collect()
    assert client.refcount[src._batches[1].key] >= 1
    # Batch 2 (one image) handed out and done with: a source of batch 1 still comes over,
    # its look-ahead stopping before the batch let go.
    src.ref(4)
    gc.collect()
    src._held = {}
    assert src[3].id == listing.ids[3] and list(src._held) == [1]


def test_the_client_does_not_hold_the_new_plan_while_units_run(
    client, files, tmp_path, monkeypatch
):
    """A catalog or blob plan is data per window: once recorded in the store (the units read
    it back a segment at a time) the run does not keep its own copy while the units run."""
    import gc
    import weakref

    from pipeline.fingerprint import api

    made, alive = [], []
    real_plan, real_run = api._plan_sources, api._run_jobs

    def plan_sources(*a, **k):
        plan = real_plan(*a, **k)
        made.append(weakref.ref(plan))
        return plan

    def run_jobs(*a, **k):
        gc.collect()
        alive.extend(ref() is not None for ref in made)
        return real_run(*a, **k)

    monkeypatch.setattr(api, "_plan_sources", plan_sources)
    monkeypatch.setattr(api, "_run_jobs", run_jobs)
    out = tmp_path / "plan.zarr"
    inputs = [str(f) for f in files[:3]]
    result = api.fingerprint(
        inputs, out, client=client, progress=False, model="efficientnet-lite0:native"
    )
    assert result.units_run >= 1 and made and alive == [False] * len(made)


def test_opening_shows_progress_by_image(client, files, capsys):
    """10^6 new files are minutes of opening: a bar counts the images as batches come back."""
    listing = InputListing.of([str(f) for f in files[:5]])
    probe.probe_images(
        client,
        listing,
        range(5),
        hdu=None,
        variable=None,
        preprocess=_preprocess(),
        batch=2,
        progress=True,
    )
    err = capsys.readouterr().err
    assert "open" in err and "5/5" in err and "image" in err
    probe.probe_images(
        client, listing, range(5), hdu=None, variable=None, preprocess=_preprocess(), batch=2
    )
    assert "open" not in capsys.readouterr().err  # progress=False (the default): silent
