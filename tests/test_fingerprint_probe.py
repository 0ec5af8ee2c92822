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
