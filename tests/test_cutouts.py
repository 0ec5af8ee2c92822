"""One CutoutReader: the store's images reopened from their records, cut with its fill,
stretched with its recorded limits, resampled; the worker, the pixel baseline, similar --image,
the report and adapt all read cutouts through it."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.cutouts import CutoutReader, image_records, read_windows, recorded_limits, resize
from pipeline.geometry import cut_windows
from pipeline.report.thumbnails import ThumbnailReader
from pipeline.sources import open_sources
from pipeline.testing import synthetic_mosaic


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    path = synthetic_mosaic(tmp_path_factory.mktemp("cut") / "f.fits", shape=(60, 70), seed=2)
    (src,) = open_sources([str(path)])
    return src


def test_cut_of_one_size_is_cut_windows_and_varying_sizes_share_a_side(source):
    data = source.read(0, 60, 0, 70)
    box = (0, 60, 0, 70)
    same = np.array([[0, 0, 8, 8], [60, 50, 8, 8]])
    reader = CutoutReader(fill=-1.0)
    np.testing.assert_array_equal(
        reader.cut(data, box, same), cut_windows(data, box, same, fill=-1.0)
    )
    mixed = np.array([[0, 0, 8, 8], [10, 10, 16, 16]])
    out = reader.cut(data, box, mixed, side=12)
    assert out.shape == (2, 1, 12, 12)
    one = cut_windows(data, box, mixed[1:], fill=-1.0)[0]
    np.testing.assert_array_equal(out[1], resize(one, (1, 12, 12)).astype(np.float32))
    with pytest.raises(ValueError, match="common side"):
        reader.cut(data, box, mixed)


def test_one_window_is_cut_as_the_strided_gather_does(source):
    data = source.read(0, 60, 0, 70)
    box = (0, 60, 0, 70)
    wins = np.array([[3, 5, 8, 8], [61, 52, 8, 8], [40, 0, 8, 8]])
    many = cut_windows(data, box, wins, fill=-1.0)
    for k in range(len(wins)):  # one window alone takes the slice path
        np.testing.assert_array_equal(
            cut_windows(data, box, wins[k : k + 1], fill=-1.0), many[k : k + 1]
        )


@pytest.mark.parametrize(
    "pre", [{"scope": "image"}, {"scope": "cutout"}, {"scope": "image", "rgb": "lupton"}]
)
def test_cutouts_of_many_images_stretch_as_one_call_per_image(pre, rng):
    """``prepare_many`` (the worker's batch of several small patches) gives what a
    ``prepare`` per image gives, images of 1 and 3 bands mixed, each with its own limits."""
    from pipeline.preprocess import preprocess_settings

    pre = preprocess_settings(pre)
    raws = [
        rng.normal(size=(n, b, 8, 8)).astype(np.float32) * (1 + i)
        for i, (n, b) in enumerate([(1, 1), (2, 1), (1, 3), (3, 3), (1, 1)])
    ]
    raws[1][0, 0, 2, 2] = np.nan  # a masked pixel
    images = [f"im{i}" for i in range(len(raws))]
    limits = {
        img: np.sort(rng.normal(size=(r.shape[1], 2)), axis=1)
        for img, r in zip(images, raws, strict=True)
    }
    reader = CutoutReader(preprocess=pre, fill=0.0, image_limits=limits)
    rgb, frac = reader.prepare_many(list(zip(raws, images, strict=True)))
    want = [reader.prepare(r, img) for r, img in zip(raws, images, strict=True)]
    np.testing.assert_array_equal(rgb, np.concatenate([w[0] for w in want]))
    np.testing.assert_array_equal(frac, np.concatenate([w[1] for w in want]))


def test_read_raw_equals_cutting_the_whole_image(source):
    windows = np.array([[-3, -2, 8, 8], [30, 20, 9, 7], [65, 55, 8, 8], [200, 200, 4, 4]])
    reader = CutoutReader({source.id: source}, fill=0.5)
    data = source.read(0, 60, 0, 70)
    for win, raw in zip(windows, reader.read_raw(source.id, windows), strict=True):
        np.testing.assert_array_equal(
            raw, cut_windows(data, (0, 60, 0, 70), win[None], fill=0.5)[0]
        )
    assert len(read_windows(source, windows[:0])) == 0


def _store_of(path, source):
    """A store recording ``source`` (with its limits) and an image recorded by files alone."""
    from pipeline.store import Store, pack_units

    s = Store.create(
        path,
        feature_dim=4,
        topk=3,
        chunk_rows=4,
        attrs={
            "model": "m",
            "model_sha256": "abc",
            "preprocess": {"scope": "image"},
            "cutouts": {"fill": None},
        },
    )
    inputs = {
        source.id: {"files": [], "source": source.to_record(), "limits": [[1.0, 2.0]]},
        "gone": {"files": []},
    }
    s.append_segment(
        images=[source.id, "gone"],
        layout=pack_units(np.array([0, 2, 4]), chunk_rows=4),
        plan_digest="d",
        inputs=inputs,
    )
    return Store.open(path)


def test_from_store_reopens_records_and_uses_recorded_limits(source, tmp_path):
    store = _store_of(tmp_path / "s.zarr", source)
    assert set(image_records(store)) == {source.id, "gone"}
    reader = CutoutReader.from_store(store)
    assert set(reader.sources) == {source.id} and np.isnan(reader.fill)
    np.testing.assert_array_equal(reader.image_limits(source.id), [[1.0, 2.0]])
    assert recorded_limits(store)[source.id].dtype == np.float32
    # A stretch with the recorded limits maps them to the ends of the range.
    raw = np.array([[[[1.0, 2.0]]]], np.float32)
    rgb, frac = reader.prepare(raw, source.id)
    assert rgb.shape == (1, 3, 1, 2) and frac[0] == 0
    # The report's reader is the same reader (its fill for a `null` store is 0, as before).
    thumbs = ThumbnailReader(store)
    assert isinstance(thumbs, CutoutReader) and thumbs.fill == 0.0
    np.testing.assert_array_equal(thumbs.stretch(raw, source.id), rgb)


def test_recorded_limits_and_sources_parse_each_record_once(source, tmp_path, monkeypatch):
    """Listing, counting and reading every recorded limit (a reader's ``all_limits``) parses
    each record's JSON at most once, and the legacy record (files only) is reopened by
    ``ImageTable.source(i, from_files=True)``: with no file recorded, one StoreError."""
    import json

    from pipeline.errors import StoreError
    from pipeline.store import images as images_module

    store = _store_of(tmp_path / "s.zarr", source)
    parsed: list[str] = []

    class CountingJson:
        @staticmethod
        def loads(text):
            parsed.append(text)
            return json.loads(text)

    monkeypatch.setattr(images_module, "json", CountingJson)
    limits = recorded_limits(store)
    assert len(limits) == 1 and list(limits) == [source.id] and not parsed  # raw column only
    reader = CutoutReader.from_store(store)
    reader.all_limits()
    reader.all_limits()
    assert len(limits) == 1 and list(reader.sources) == [source.id]
    assert len(parsed) == len(set(parsed)) == 1  # the one limits record, once
    table = store.images()
    assert table.source(table.find(source.id), from_files=True).id == source.id
    with pytest.raises(StoreError, match="records no source"):
        table.source(table.find("gone"))
    with pytest.raises(StoreError, match="does not record the file of image gone"):
        table.source(table.find("gone"), from_files=True)
    with pytest.raises(StoreError, match="does not record the file of image gone"):
        CutoutReader.from_store(store, require_sources=True)
