"""Store layout: units own whole chunks; creation, growth, repair, validation."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.errors import StoreError
from pipeline.store import Store, block_rows_for, pack_units


@settings(max_examples=200, deadline=None)
@given(counts=st.lists(st.integers(0, 300), min_size=1, max_size=60), chunk=st.integers(1, 128))
def test_units_own_whole_chunks_and_every_window_one_row(counts, chunk):
    tile_start = np.r_[0, np.cumsum(counts)]
    lay = pack_units(tile_start, chunk_rows=chunk)
    # units cover the windows in order, without gaps, each under two chunks' worth
    assert lay.unit_windows[0] == 0 and lay.unit_windows[-1] == tile_start[-1]
    assert np.all(np.diff(lay.unit_windows) > 0) and np.all(np.diff(lay.unit_windows) < 2 * chunk)
    # a unit boundary inside a tile falls on a multiple of chunk from the tile's start
    for b in lay.unit_windows[1:-1]:
        t = np.searchsorted(tile_start, b, side="right") - 1
        assert (b - tile_start[t]) % chunk == 0
    # every unit starts on a chunk boundary and has room for its windows
    assert np.all(lay.unit_rows % chunk == 0)
    assert np.all(np.diff(lay.unit_rows) >= np.diff(lay.unit_windows))
    assert np.all(np.diff(lay.unit_rows) - np.diff(lay.unit_windows) < chunk)
    # every window gets its own row inside its unit's rows
    rows = lay.window_rows()
    assert len(rows) == tile_start[-1] and len(np.unique(rows)) == len(rows)
    unit_of_window = np.repeat(np.arange(lay.n_units), np.diff(lay.unit_windows))
    assert np.all(rows >= lay.unit_rows[unit_of_window]) and np.all(
        rows < lay.unit_rows[unit_of_window + 1]
    )


def test_small_tiles_share_a_unit_and_large_tiles_are_cut_into_chunk_sized_pieces():
    # tiles of 3, 3, 3, 3, 40, 3 windows, chunks of 10
    lay = pack_units(np.r_[0, np.cumsum([3, 3, 3, 3, 40, 3])], chunk_rows=10)
    assert lay.unit_windows.tolist() == [0, 12, 22, 32, 42, 52, 55]
    assert lay.unit_rows.tolist() == [0, 20, 30, 40, 50, 60, 70]


def _store(tmp_path, rows=(10, 7)):
    s = Store.create(
        tmp_path / "s.zarr",
        feature_dim=4,
        topk=3,
        chunk_rows=5,
        attrs={"model": "m", "model_sha256": "abc"},
    )
    lay = pack_units(np.r_[0, np.cumsum(rows)], chunk_rows=5)
    s.append_segment(images=["a"], layout=lay, plan_digest="d", inputs={"a": {"files": []}})
    return s


def test_grow_write_and_read_back_with_xarray(tmp_path):
    s = _store(tmp_path)
    assert s.n_rows == 20 and s.n_units == 4  # tiles of 10 and 7 windows cut into chunks of 5
    s.write_rows(
        0,
        {
            "fingerprint": np.ones((10, 4), "f4"),
            "valid": np.ones(10, bool),
            "image": np.array(["a"] * 10, dtype=object),
        },
    )
    s.mark_done(0)
    s2 = Store.open(tmp_path / "s.zarr")
    assert s2.done_units() == {0}
    ds = s2.dataset()
    assert ds.fingerprint.dims == ("cutout", "feature") and ds.top_class.dims == ("cutout", "topk")
    assert {"image", "x", "y", "width", "height", "ra", "dec"} <= set(ds.coords)
    assert ds.valid.values.sum() == 10 and np.isnan(ds.fingerprint.values[10:]).all()
    with pytest.raises(ValueError, match="chunk boundary"):
        s.write_rows(3, {"valid": np.ones(5, bool)})


def test_one_block_size_rule_whole_chunks(tmp_path):
    s = _store(tmp_path)  # chunks of 5 rows
    assert s.block_rows() == 64 * 5  # the default: 64 chunks
    assert s.block_rows(12) == 10 and s.block_rows(3) == 5  # whole chunks, at least one
    starts = [start for start, _ in s.iter_blocks("valid", block_rows=12)]
    assert starts == [0, 10] and block_rows_for(5, 12) == 10


def test_half_finished_append_is_repaired_on_open(tmp_path):
    s = _store(tmp_path)
    # A client killed after resizing some arrays but before recording the segment.
    s.array("fingerprint").resize((35, 4))
    s.array("x").resize((35,))
    with pytest.raises(StoreError, match="rows"):
        Store.open(tmp_path / "s.zarr", mode="r")
    repaired = Store.open(tmp_path / "s.zarr", mode="r+")
    assert repaired.n_rows == 20 and repaired.array("x").shape == (20,)


def test_refuses_another_model_and_non_stores(tmp_path):
    s = _store(tmp_path)
    with pytest.raises(StoreError, match="made with model_sha256"):
        s.check_compatible({"model": "m", "model_sha256": "other"})
    # A store of another model (one made before the default changed, say) names the flag.
    with pytest.raises(StoreError, match=r"made with model = \"m\".*or --model m$"):
        s.check_compatible({"model": "efficientnet-lite0:native:rot8"})
    with pytest.raises(StoreError, match="no fingerprint store"):
        Store.open(tmp_path / "missing.zarr")
    import zarr

    zarr.open_group(tmp_path / "plain.zarr", mode="w", zarr_format=3)
    with pytest.raises(StoreError, match="not an Elodin fingerprint store"):
        Store.open(tmp_path / "plain.zarr")
    with pytest.raises(StoreError, match="already exists"):
        Store.create(tmp_path / "s.zarr", feature_dim=4, topk=3, chunk_rows=5, attrs={})


def test_analysis_variables_follow_growth(tmp_path):
    s = _store(tmp_path)
    s.create_row_array("pca", tail=(2,), dims=("component",))
    s.write_rows(0, {"pca": np.ones((5, 2), "f4")})
    s.write_array("pca_components", np.eye(2, 4, dtype="f4"), dims=("component", "feature"))
    s.append_segment(
        images=["b"], layout=pack_units(np.array([0, 3]), chunk_rows=5), plan_digest="e", inputs={}
    )
    ds = Store.open(tmp_path / "s.zarr").dataset()
    assert ds.pca.shape == (25, 2) and ds.pca_components.shape == (2, 4)
    assert np.isnan(ds.pca.values[20:]).all()


def _survey_store(path, n_images: int) -> Store:
    """A store whose one segment holds ``n_images`` images with full records (a 3 kB WCS
    header each, as real FITS patches have), two windows per image."""
    from pipeline.tiling import TILE_DTYPE, Plan

    s = Store.create(
        path, feature_dim=4, topk=3, chunk_rows=8, attrs={"model": "m", "model_sha256": "abc"}
    )
    tiles = np.zeros(n_images, TILE_DTYPE)
    tiles["image"] = np.arange(n_images)
    plan = Plan(
        tuple(f"p{i}" for i in range(n_images)),
        tiles,
        np.tile([0, 0, 8, 8], (2 * n_images, 1)),
        np.arange(0, 2 * n_images + 1, 2),
    )
    header = "".join(
        f"{f'KEY{k}':<8}= {k:>20} / a header card of eighty bytes{'':<19}" for k in range(40)
    )
    inputs = {
        f"p{i}": {
            "files": [{"path": f"/survey/p{i}.fits", "size": 1000 + i, "mtime": 1.5e9 + i}],
            "source": {"id": f"p{i}", "paths": [f"/survey/p{i}.fits"], "kind": "fits",
                       "shape": [64, 64], "n_bands": 1, "hdu": 0, "variable": None,
                       "wcs_header": header},
            "limits": [[0.0, float(i)]],
        }
        for i in range(n_images)
    }  # fmt: skip
    s.save_plan(0, plan)
    s.append_segment(
        images=plan.images,
        layout=pack_units(plan.tile_start, chunk_rows=8),
        plan_digest="d",
        inputs=inputs,
        plan=plan,
    )
    return s


def test_root_metadata_does_not_grow_with_the_images(tmp_path):
    """The root document holds facts that do not grow with the survey: 10 or 3000 images give
    the same size (a few digits apart), and the records come back from the images table."""
    _survey_store(tmp_path / "small.zarr", 10)
    large = _survey_store(tmp_path / "large.zarr", 3000)
    size = {p: (tmp_path / p / "zarr.json").stat().st_size for p in ("small.zarr", "large.zarr")}
    assert size["large.zarr"] - size["small.zarr"] < 32, size
    assert size["large.zarr"] < 2048  # 3000 records at ~3 kB would be ~10 MB
    largest = {  # no JSON document anywhere in the store grows with the images (plans too)
        p: max(f.stat().st_size for f in (tmp_path / p).rglob("*.json"))
        for p in ("small.zarr", "large.zarr")
    }
    assert largest["large.zarr"] - largest["small.zarr"] < 32, largest
    table = Store.open(large.path).images()
    assert len(table) == 3000 and table.find("p2999") == 2999
    rec = table.record(1234)
    assert rec["files"] == [{"path": "/survey/p1234.fits", "size": 2234, "mtime": 1.5e9 + 1234}]
    assert rec["rows"] == [2 * 1234, 2 * 1234 + 2] and rec["segment"] == 0
    assert table.source(1234).shape == (64, 64) and table.limits(1234).tolist() == [[0, 1234]]
    ds = large.dataset()  # xarray sees the rows, not the table
    assert ds.sizes["cutout"] == 6000 and "id" not in ds
    # Retiring flags the record; the root document is not rewritten.
    before = (tmp_path / "large.zarr" / "zarr.json").read_bytes()
    large.mark_done(0)
    for u in range(1, large.n_units):
        large.mark_done(u)
    large.write_rows(
        0,
        {
            "valid": np.ones(8, bool),
            "image": np.array(["p0"] * 2 + ["p1"] * 2 + ["p2"] * 2 + ["p3"] * 2, dtype=object),
        },
    )
    assert large.retire_image(0, "p1") == 2
    assert (tmp_path / "large.zarr" / "zarr.json").read_bytes() == before
    table = Store.open(large.path).images()
    assert table.find("p1") is None and large.n_retired() == 1
    assert Store.open(large.path).array("valid")[:8].tolist() == [1, 1, 0, 0, 1, 1, 1, 1]


def test_half_finished_append_drops_uncommitted_image_records(tmp_path):
    s = _store(tmp_path)
    # Killed after the table grew but before the segment was recorded.
    s._append_images(["z"], {"z": {"files": [{"path": "/z", "size": 1, "mtime": 2}]}},
                     np.array([[20, 25]]), 1, 0, segment=1)  # fmt: skip
    assert len(Store.open(s.path).images()) == 1  # readers see the committed records only
    repaired = Store.open(s.path, mode="r+")
    assert repaired._group["images"]["id"].shape == (1,)
    assert repaired._group["images"]["file_path"].shape == (0,)


def test_done_markers_are_sharded_and_a_range_lists_only_its_shards(tmp_path, monkeypatch):
    """A unit's marker lives in the shard of its number; asking for a range of units lists
    only the shards it overlaps (a resume costs its segment, not every marker ever written)."""
    import fsspec.implementations.local as local

    s = _store(tmp_path)
    for u in (5, 4095, 4096, 2 * 4096 + 1):
        s.mark_done(u)
    done = tmp_path / "s.zarr" / "done"
    assert (done / "000000" / "0000000005").is_file()
    assert (done / "000002" / "0000008193").is_file()
    listed: list[str] = []
    real_ls = local.LocalFileSystem.ls

    def spy(self, path, *args, **kwargs):
        listed.append(str(path))
        return real_ls(self, path, *args, **kwargs)

    monkeypatch.setattr(local.LocalFileSystem, "ls", spy)
    assert s.done_units(range(0, 10)) == {5}
    assert listed and all(p.rstrip("/").endswith("done/000000") for p in listed), listed
    listed.clear()
    assert s.done_units(range(4000, 4100)) == {4095, 4096}
    assert not any("000002" in p for p in listed), listed
    monkeypatch.undo()
    assert s.done_units() == {5, 4095, 4096, 8193} and s.done_units(range(0)) == set()
    s.clear_done([4096])
    assert Store.open(s.path).done_units() == {5, 4095, 8193}


def test_flat_markers_of_an_older_store_are_still_read_and_cleared(tmp_path):
    """A store made before the markers were sharded kept them as done/<unit>: they count,
    beside new sharded ones, and clearing a unit removes both."""
    import json

    s = _store(tmp_path)
    done = tmp_path / "s.zarr" / "done"
    meta = json.loads((done / "zarr.json").read_text())
    del meta["attributes"]["shard_units"]  # what an older Elodin's create wrote
    (done / "zarr.json").write_text(json.dumps(meta))
    for u in (1, 2, 5000):
        (done / f"{u:010d}").write_text("done\n")
    old = Store.open(s.path, mode="r+")
    old.mark_done(2)  # redone since: a sharded marker beside the flat one
    old.mark_done(3)
    assert old.done_units() == {1, 2, 3, 5000}
    assert old.done_units(range(0, 3)) == {1, 2}
    old.clear_done([2, 5000])
    assert Store.open(s.path).done_units() == {1, 3}
    new = _store(tmp_path / "new")
    (tmp_path / "new" / "s.zarr" / "done" / f"{7:010d}").write_text("done\n")
    assert new.done_units() == set(), "a store made now never reads flat markers"


def test_empty_and_filled_rows_follow_the_store_schema(tmp_path):
    """One schema: the arrays Store.create makes and the rows a unit writes share every dtype
    and fill (an empty slot reads back as the array's fill value)."""
    from pipeline.store import empty_rows, filled_rows, row_schema

    s = _store(tmp_path)
    schema = row_schema(4, 3)
    assert set(schema) == {n for n in s._group.array_keys() if n not in ("images",)}
    empty = empty_rows(5, feature_dim=4, topk=3)
    for name, var in schema.items():
        arr = s.array(name)
        assert arr.shape[1:] == empty[name].shape[1:] == var.tail, name
        stored = np.asarray(arr[10:15])  # rows never written: the fill value
        if var.dtype is str:
            assert empty[name].tolist() == [""] * 5 == [str(v) for v in stored], name
        else:
            assert empty[name].dtype == arr.dtype, name
            np.testing.assert_array_equal(empty[name], stored, err_msg=name)
    rows = filled_rows(5, {"x": [np.arange(2.0), np.arange(1.0)], "top_class": [np.ones((3, 3), "i4")]},
                       feature_dim=4, topk=3)  # fmt: skip
    assert rows["valid"].tolist() == [True] * 3 + [False] * 2
    assert rows["x"][:3].tolist() == [0, 1, 0] and np.isnan(rows["x"][3:]).all()
    assert (rows["top_class"][3:] == -1).all() and np.isnan(rows["fingerprint"]).all()
    with pytest.raises(ValueError, match="different numbers of rows"):
        filled_rows(5, {"x": [np.arange(2.0)], "y": [np.arange(3.0)]}, feature_dim=4, topk=3)


def test_records_are_written_a_table_chunk_at_a_time(tmp_path, monkeypatch):
    """An append encodes and writes its records one table chunk of images at a time (never
    the whole segment's at once), slices ending on chunk boundaries even when the segment
    starts inside a chunk; every record, its files and rows come back as given."""
    from pipeline.store import images as table_module

    monkeypatch.setattr(table_module, "_IMAGE_CHUNK", 4)
    slices = []
    real = table_module._record_columns

    def spy(images, inputs, rows, file_start, segment):
        slices.append(list(images))
        return real(images, inputs, rows, file_start, segment)

    monkeypatch.setattr(table_module, "_record_columns", spy)
    s = Store.create(
        tmp_path / "s.zarr", feature_dim=4, topk=3, chunk_rows=8, attrs={"model_sha256": "a"}
    )

    asked: list[str] = []

    class Made(dict):  # records made when asked for, as fingerprint's are: each asked once
        def __getitem__(self, n):
            asked.append(n)
            return super().__getitem__(n)

        def get(self, n, default=None):
            return self[n] if n in self else default

    def inputs(names):  # 0, 1 or 2 files per image: file rows do not follow image rows
        return Made(
            {
                n: {
                    "files": [
                        {"path": f"/d/{n}-{j}.fits", "size": j, "mtime": 1.0} for j in range(k % 3)
                    ],
                    "limits": [[0.0, float(k)]],
                }
                for k, n in enumerate(names)
            }
        )

    first = [f"a{i}" for i in range(6)]
    second = [f"b{i}" for i in range(11)]
    written: list[int] = []  # what a progress bar is told
    for names in (first, second):
        s.append_segment(
            images=names,
            layout=pack_units(np.array([0, 8]), chunk_rows=8),
            plan_digest="d",
            inputs=inputs(names),
            on_records=written.append,
        )
    assert [len(x) for x in slices] == [4, 2, 2, 4, 4, 1]  # table rows 0-3 4-5 | 6-7 8-11 ...
    assert written == [len(x) for x in slices]
    assert asked == first + second
    table = Store.open(s.path).images()
    assert len(table) == 17
    for names in (first, second):
        for k, n in enumerate(names):
            rec = table.record(table.find(n))
            assert [f["path"] for f in rec["files"]] == [f"/d/{n}-{j}.fits" for j in range(k % 3)]
            assert table.limits(table.find(n)).tolist() == [[0, k]]


_PLAIN = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)


@given(value=_PLAIN | st.lists(st.builds(np.float32, st.floats(width=32)), max_size=3))
def test_record_text_is_the_stored_json_in_one_pass(value):
    """A record field's text is what the round trip through JSON wrote (tuples as lists,
    numpy numbers as strings), written in one pass for plain values."""
    import json

    from pipeline.store._common import _json_text, _jsonable

    want = "" if value is None else json.dumps(_jsonable(value), sort_keys=True)
    assert _json_text(value) == want
