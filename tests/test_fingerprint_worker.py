"""The worker's side of a unit: its cutouts go to the model in full batches, whatever the tiles."""

from __future__ import annotations

import numpy as np

from pipeline.cutouts import CutoutReader
from pipeline.fingerprint.plan import _image_limits
from pipeline.fingerprint.worker import ModelRef, TileJob, UnitJob, _prepared_batches
from pipeline.geometry import read_box
from pipeline.preprocess import preprocess_settings
from pipeline.sources import open_listed
from pipeline.testing import make_mosaic


def _job(tiles: list, pre: dict, limits: dict, *, side: int) -> UnitJob:
    """A unit of ``tiles`` in batches of 4 (no store, no model: only its cutouts are made)."""
    return UnitJob(
        store="unused.zarr",
        unit=0,
        row_start=0,
        n_rows=sum(len(t.windows) for t in tiles),
        tiles=tuple(tiles),
        model=ModelRef("m", "m.onnx", "0" * 64),
        preprocess=pre,
        image_limits=limits,
        batch_size=4,
        fill=0.0,
        side=side,
        dtype="float32",
    )


def test_batches_are_filled_across_tiles(tmp_path):
    # Small patches make tiles of one window each; a batch a tile ran the model on one cutout
    # at a time. Two images (their own stretch limits), tiles of 1-3 windows, batches of 4.
    paths = [make_mosaic(tmp_path / f"p{i}.fits", ny=96, nx=96, seed=i) for i in range(2)]
    sources = [open_listed(str(p), (str(p),)) for p in paths]
    pre = preprocess_settings({"scope": "image"})
    limits = _image_limits(sources, pre)
    tiles = []
    for k, n in enumerate([1, 3, 1, 2, 1, 1, 3]):
        src = sources[k % 2]
        wins = np.array([[8 * j, 4 * k, 32, 32] for j in range(n)], np.int64)
        tiles.append(TileJob(src, read_box(wins, src.shape), wins))
    job = _job(tiles, pre, {i: np.asarray(v, np.float32) for i, v in limits.items()}, side=32)
    got = list(_prepared_batches(job))
    assert [len(rgb) for _, rgb, _ in got] == [4, 4, 4]
    assert [t for t, _, _ in got] == [1, 4, 6]  # the tile of each batch's last cutout
    # The same cutouts, stretched with their own image's limits, in row order.
    reader = CutoutReader(preprocess=pre, fill=0.0, image_limits=job.image_limits)
    want = [
        reader.prepare(
            reader.cut(t.source.read(*t.read_box), t.read_box, t.windows, side=32), t.source.id
        )
        for t in tiles
    ]
    np.testing.assert_array_equal(
        np.concatenate([rgb for _, rgb, _ in got]), np.concatenate([w[0] for w in want])
    )
    np.testing.assert_array_equal(
        np.concatenate([f for _, _, f in got]), np.concatenate([w[1] for w in want])
    )


def test_a_batch_holds_one_cutout_size(tmp_path):
    # Blob windows: a tile whose windows are all of one size is cut at that size, one of
    # mixed sizes at the common side; a batch never mixes sizes (make demo's blob run did).
    path = make_mosaic(tmp_path / "b.fits", ny=128, nx=128, seed=3)
    src = open_listed(str(path), (str(path),))
    pre = preprocess_settings({"scope": "image"})
    limits = {i: np.asarray(v, np.float32) for i, v in _image_limits([src], pre).items()}
    sizes = [[32, 32], [48], [20, 48], [32], [32, 32, 32]]
    tiles = []
    for k, row in enumerate(sizes):
        wins = np.array([[4 + 20 * j, 10 * k, s, s] for j, s in enumerate(row)], np.int64)
        tiles.append(TileJob(src, read_box(wins, src.shape), wins))
    job = _job(tiles, pre, limits, side=48)
    got = list(_prepared_batches(job))
    # 32 32 | 48 + (20, 48 resampled to 48) | 32 + 32 32 32 (4: full) ; sizes never mixed
    assert [(len(rgb), rgb.shape[-1]) for _, rgb, _ in got] == [(2, 32), (3, 48), (4, 32)]
    assert [t for t, _, _ in got] == [0, 2, 4]
    reader = CutoutReader(preprocess=pre, fill=0.0, image_limits=limits)
    want = [
        reader.prepare(
            reader.cut(t.source.read(*t.read_box), t.read_box, t.windows, side=48), t.source.id
        )[0]
        for t in tiles
    ]
    flat = [w[i] for w in want for i in range(len(w))]  # each cutout as its tile alone gave
    k = 0
    for _, rgb, _ in got:
        np.testing.assert_array_equal(rgb, np.stack(flat[k : k + len(rgb)]))
        k += len(rgb)
    assert k == len(flat) == 9
