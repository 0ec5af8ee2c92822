"""The report on a real store: a FITS mosaic fingerprinted on a LocalCluster (processes), with
analysis variables computed here (numpy PCA, scikit-learn k-means), then every figure checked
against what it should show, and index.html opened in a real headless chromium."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline.errors import InputError
from pipeline.report import build_report, make_report
from pipeline.report.figures import BACKGROUND, cluster_colours
from pipeline.report.select import KSmallest, grid_cells, random_keys
from pipeline.report.thumbnails import (
    ThumbnailReader,
    downsample_factor,
    downsampled_image,
    first_row_at_bottom,
    read_windows,
    to_uint8,
    window_boxes,
)
from pipeline.sources import ImageSource
from pipeline.store import Store
from pipeline.testing import synthetic_mosaic

MODEL = "efficientnet-lite0:native"
NY, NX = 300, 340  # not multiples of the window: the pad policy makes windows past the edge
SIZE = 32
K = 3
N_COMP = 6


def make_mosaic(path: Path, *, seed: int = 3) -> Path:
    """Sky noise plus Gaussian sources of random shapes, with a TAN WCS."""
    return synthetic_mosaic(
        path,
        shape=(NY, NX),
        seed=seed,
        n_sources=45,
        flux=(50, 3000),
        sigma=(1.2, 7),
        crval=(83.8, -5.4),
        pixel_scale=0.05,
    )


def add_analysis(path: Path, *, seed: int = 0) -> None:
    """The analysis variables the report reads, computed the plain way: PCA by SVD, k-means,
    the embedding = first two PCs, outlier score = distance to the own cluster's centre."""
    from sklearn.cluster import KMeans

    st = Store.open(path, mode="r+")
    valid = st.array("valid")[...]
    x = st.array("fingerprint")[...][valid].astype(np.float64)
    mu = x.mean(axis=0)
    _, s, vt = np.linalg.svd(x - mu, full_matrices=False)
    pcs = np.full((st.n_rows, N_COMP), np.nan, np.float32)
    pcs[valid] = (x - mu) @ vt[:N_COMP].T
    km = KMeans(K, n_init=4, random_state=seed).fit(pcs[valid])
    cluster = np.full(st.n_rows, -1, np.int32)
    cluster[valid] = km.labels_
    emb = np.full((st.n_rows, 2), np.nan, np.float32)
    emb[valid] = pcs[valid][:, :2] * [1.0, 2.0]
    score = np.full(st.n_rows, np.nan, np.float32)
    score[valid] = np.linalg.norm(pcs[valid] - km.cluster_centers_[km.labels_], axis=1)
    for name, data, tail, dims in (
        ("pca", pcs, (N_COMP,), ("component",)),
        ("cluster", cluster, (), ()),
        ("embedding", emb, (2,), ("embedding_dim",)),
        ("outlier_score", score, (), ()),
    ):
        fill = -1 if data.dtype.kind == "i" else np.nan
        st.create_row_array(name, tail=tail, dims=dims, dtype=str(data.dtype), fill=fill)
        st.write_rows(0, {name: data})
    ratio = (s**2 / np.sum(s**2))[:N_COMP].astype(np.float32)
    st.write_array("pca_explained_variance_ratio", ratio, dims=("component",))
    st.write_array(
        "cluster_centers", km.cluster_centers_.astype(np.float32), dims=("cluster_id", "component")
    )


@pytest.fixture(scope="module")
def mosaic(tmp_path_factory) -> Path:
    return make_mosaic(tmp_path_factory.mktemp("mosaic") / "orion.fits")


@pytest.fixture(scope="module")
def bare_store(tmp_path_factory, mosaic) -> Path:
    """A fingerprinted store with no analysis yet (real model, real LocalCluster)."""
    from distributed import Client, LocalCluster

    from pipeline.fingerprint import fingerprint

    out = tmp_path_factory.mktemp("stores") / "bare.zarr"
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as client,
    ):
        fingerprint(
            [mosaic],
            out,
            method="sliding",
            size=SIZE,
            stride=SIZE,
            edge="pad",
            model=MODEL,
            tile_size=128,
            chunk_rows=16,
            client=client,
            progress=False,
        )
    return out


@pytest.fixture(scope="module")
def store(bare_store, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stores") / "analysed.zarr"
    shutil.copytree(bare_store, out)
    add_analysis(out)
    return out


@pytest.fixture(scope="module")
def report(store, tmp_path_factory):
    return build_report(
        store, tmp_path_factory.mktemp("report"), n_outliers=10, n_similar=6, query=None
    )


@pytest.fixture(scope="module")
def table(store) -> dict:
    ds = Store.open(store).dataset().load()
    return {name: np.asarray(ds[name].values) for name in ds.variables}


def _occupied_cells(png: Path, manifest: dict) -> set[tuple[int, int]]:
    """Cells of the map PNG whose pixels are not all background."""
    img = np.asarray(Image.open(png).convert("RGB")).astype(int)
    g, cell = manifest["n_cells"], manifest["cell"]
    ox, oy = manifest["origin"]
    found = set()
    for r in range(g):
        for c in range(g):
            block = img[oy + r * cell : oy + (r + 1) * cell, ox + c * cell : ox + (c + 1) * cell]
            if np.any(np.abs(block - np.array(BACKGROUND)).sum(axis=-1) > 0):
                found.add((r, c))
    return found


# ------------------------------------------------------------------------------ figures
def test_embedding_map_one_thumbnail_per_occupied_cell(report, table):
    m = report.manifest["grid"]
    valid = table["valid"]
    emb = table["embedding"][valid].astype(np.float64)
    rows = np.flatnonzero(valid)
    g = m["n_cells"]
    assert g == int(np.clip(round(np.sqrt(valid.sum())), 4, 40))
    lo, hi = emb.min(axis=0), emb.max(axis=0)
    cells, dist = grid_cells(emb, lo, hi, g)
    expected = {}
    for c in np.unique(cells):
        members = np.flatnonzero(cells == c)
        expected[int(c)] = int(rows[members[np.argmin(dist[members])]])
    assert m["count"] == len(expected) == len(m["rows"])
    assert dict(zip(m["cells"], m["rows"], strict=True)) == expected
    # The PNG shows exactly those cells, framed in the cluster's colour.
    png = Path(report.index.parent / m["file"])
    drawn = _occupied_cells(png, m)
    assert drawn == {divmod(c, g) for c in expected}
    img = np.asarray(Image.open(png).convert("RGB"))
    palette = cluster_colours(range(K))
    for c, r in expected.items():
        rr, cc = divmod(c, g)
        corner = img[m["origin"][1] + rr * m["cell"], m["origin"][0] + cc * m["cell"]]
        assert tuple(corner) == palette[int(table["cluster"][r])]


def test_one_gallery_per_cluster_nearest_the_centre(report, table):
    galleries = report.manifest["galleries"]
    valid = table["valid"]
    assert sorted(g["cluster"] for g in galleries) == list(range(K))
    centres = table["cluster_centers"].astype(np.float64)
    for g in galleries:
        assert (report.index.parent / g["file"]).exists()
        members = np.flatnonzero(valid & (table["cluster"] == g["cluster"]))
        d = np.linalg.norm(table["pca"][members].astype(np.float64) - centres[g["cluster"]], axis=1)
        want = members[np.argsort(d, kind="stable")[: len(g["nearest"])]]
        assert g["nearest"] == want.tolist()
        assert len(g["nearest"]) == min(8, len(members))
        assert set(g["random"]) <= set(members.tolist())
        assert not set(g["random"]) & set(g["nearest"])
        assert g["count"] == len(g["nearest"]) + len(g["random"])
    # Cluster sizes as in the store.
    sizes = report.manifest["clusters"]
    for c in range(K):
        assert sizes[str(c)] == int((valid & (table["cluster"] == c)).sum())
    assert (report.index.parent / "cluster-sizes.png").exists()
    assert (report.index.parent / "pca-variance.png").exists()


def test_overlay_is_the_downsampled_image_with_windows(report, table, mosaic):
    (ov,) = report.manifest["overlays"]
    f = ov["factor"]
    assert f == downsample_factor((NY, NX), 2048) == 1
    img = Image.open(report.index.parent / ov["file"])
    assert img.size == (-(-NX // f), -(-NY // f))
    assert ov["n_windows"] == int(table["valid"].sum())
    # A window's first pixel carries its cluster's colour (unless a later window's outline
    # covers it, which only happens on shared edges; the first row and column are never
    # covered). A FITS image is drawn as ds9 draws it: its first row at the bottom.
    pix = np.asarray(img.convert("RGB"))
    palette = cluster_colours(range(K))
    boxes = window_boxes(table["x"], table["y"], table["width"], table["height"])
    first = np.flatnonzero(table["valid"] & (boxes[:, 0] == 0) & (boxes[:, 1] == 0))[0]
    assert tuple(pix[-1, 0]) == palette[int(table["cluster"][first])]


def test_overlay_of_a_large_factor(store, tmp_path):
    r = build_report(store, tmp_path, overlay_side=40, max_points=50)
    (ov,) = r.manifest["overlays"]
    f = downsample_factor((NY, NX), 40)
    assert ov["factor"] == f == 9
    assert Image.open(tmp_path / ov["file"]).size == (-(-NX // f), -(-NY // f))
    assert r.manifest["interactive"]["n_points"] == 50
    assert "50 of" in (tmp_path / "index.html").read_text()


def test_downsampled_image_reads_like_numpy(mosaic):
    src = ImageSource.from_record(_source_record(mosaic))
    data = fits.getdata(mosaic).astype(np.float32)
    for f in (1, 3, 7):
        got = downsampled_image(src, f, tile=64)
        py, px = -(-NY // f) * f, -(-NX // f) * f
        pad = np.full((py, px), np.nan, np.float32)
        pad[:NY, :NX] = data
        want = np.nanmean(pad.reshape(py // f, f, px // f, f), axis=(1, 3))
        np.testing.assert_allclose(got[0], want, rtol=1e-5)
    for f in (9, 25):
        got = downsampled_image(src, f, tile=8)
        ys = np.minimum(np.arange(-(-NY // f)) * f + f // 2, NY - 1)
        xs = np.minimum(np.arange(-(-NX // f)) * f + f // 2, NX - 1)
        np.testing.assert_array_equal(got[0], data[np.ix_(ys, xs)])


def test_outlier_gallery_is_the_top_scores(report, table):
    o = report.manifest["outliers"]
    valid = np.flatnonzero(table["valid"])
    s = table["outlier_score"][valid].astype(np.float64)
    want = valid[np.lexsort((valid, -s))[:10]]
    assert o["rows"] == want.tolist()
    assert o["count"] == 10
    assert np.all(np.diff(o["scores"]) <= 0)


def test_similar_sheet_is_the_nearest_in_pca(report, table):
    sim = report.manifest["similar"]
    q = sim["query"]
    assert table["valid"][q]
    rows = np.flatnonzero(table["valid"])
    rows = rows[rows != q]
    d = np.linalg.norm(table["pca"][rows].astype(np.float64) - table["pca"][q], axis=1)
    assert sim["rows"] == rows[np.lexsort((rows, d))[:6]].tolist()
    np.testing.assert_allclose(sim["distances"], np.sort(d)[:6], rtol=1e-5)
    assert sim["count"] == 6
    assert (report.index.parent / sim["file"]).exists()


def test_thumbnails_equal_a_direct_read_and_stretch(store, table, mosaic):
    from pipeline.preprocess import image_limits_for, stretch_cutouts

    st = Store.open(store)
    reader = ThumbnailReader(st)
    data = fits.getdata(mosaic).astype(np.float32)
    fill = st.attrs["cutouts"]["fill"]
    padded = np.pad(data, SIZE, constant_values=fill)
    valid = np.flatnonzero(table["valid"])
    boxes = window_boxes(table["x"], table["y"], table["width"], table["height"])[valid]
    # Windows past the right / bottom edge exist (pad policy) and are among those checked.
    edge = (boxes[:, 0] + SIZE > NX) | (boxes[:, 1] + SIZE > NY)
    assert edge.any()
    got = reader.read(table["image"][valid], boxes)
    src = reader.source("orion")
    raw = np.stack(
        [padded[y0 + SIZE : y0 + SIZE + h, x0 + SIZE : x0 + SIZE + w] for x0, y0, w, h in boxes]
    )[:, None]
    want, _ = stretch_cutouts(
        raw,
        config=st.attrs["preprocess"],
        image_limits=image_limits_for(src, st.attrs["preprocess"]),
    )
    np.testing.assert_array_equal(np.stack(got), want)
    # The centres round-trip: the windows are the plan's.
    np.testing.assert_array_equal(boxes[:, 0] % SIZE, 0)
    np.testing.assert_array_equal(boxes[:, 1] % SIZE, 0)


def test_windows_of_varying_size_are_read_and_stretched_alike(store, mosaic):
    """Blob and catalog windows vary in size: each is read and stretched like a direct cut."""
    from pipeline.preprocess import image_limits_for, stretch_cutouts

    st = Store.open(store)
    reader = ThumbnailReader(st)
    data = fits.getdata(mosaic).astype(np.float32)
    boxes = np.array(
        [(5, 7, 20, 20), (100, 40, 57, 57), (NX - 30, NY - 10, 48, 48), (0, 0, 33, 33)]
    )
    got = reader.read(["orion"] * len(boxes), boxes)
    limits = image_limits_for(reader.source("orion"), st.attrs["preprocess"])
    padded = np.pad(data, 64, constant_values=st.attrs["cutouts"]["fill"])
    for (x0, y0, w, h), g in zip(boxes, got, strict=True):
        raw = padded[None, None, y0 + 64 : y0 + 64 + h, x0 + 64 : x0 + 64 + w]
        want, _ = stretch_cutouts(raw, config=st.attrs["preprocess"], image_limits=limits)
        np.testing.assert_array_equal(g, want[0])
    thumbs = reader.thumbnails(["orion"] * len(boxes), boxes, size=40)
    assert thumbs.shape == (len(boxes), 40, 40, 3) and thumbs.dtype == np.uint8
    # Drawn as ds9 draws a FITS image (first row at the bottom); a window already 40 px a
    # side is its stretched pixels, flipped.
    same = reader.thumbnails(["orion"], np.array([(5, 7, 40, 40)]), size=40)[0]
    (rgb,) = reader.read(["orion"], np.array([(5, 7, 40, 40)]))
    np.testing.assert_array_equal(same, to_uint8(rgb)[::-1])


def test_a_moved_source_image_is_one_clear_error(store, tmp_path, mosaic):
    import zarr

    moved = tmp_path / "moved.zarr"
    shutil.copytree(store, moved)
    # The image's record in the store's images table now names a file that is gone.
    table = zarr.open_group(str(moved / "images"), mode="r+", zarr_format=3)
    record = json.loads(str(table["source"][0]))
    record["paths"] = [str(tmp_path / "gone.fits")]
    table["source"][0] = json.dumps(record, sort_keys=True)
    with pytest.raises(InputError, match=r"gone\.fits.*reads its thumbnails back"):
        make_report(moved, tmp_path / "r")


class _CountingSource:
    """An ImageSource stand-in that counts what is read (the real one is wrapped, not faked)."""

    def __init__(self, src):
        self.src, self.shape, self.n_bands, self.reads = src, src.shape, src.n_bands, []

    def read(self, y0, y1, x0, x1):
        self.reads.append((y1 - y0) * (x1 - x0))
        return self.src.read(y0, y1, x0, x1)


def test_windows_are_read_by_neighbourhood(mosaic):
    src = ImageSource.from_record(_source_record(mosaic))
    data = fits.getdata(mosaic).astype(np.float32)
    # Crowded: a 4 x 4 block of touching windows is one read of their bounding box.
    crowd = np.array([(x, y, 16, 16) for y in range(0, 64, 16) for x in range(0, 64, 16)])
    cs = _CountingSource(src)
    out = read_windows(cs, crowd)
    assert cs.reads == [64 * 64]
    for (x0, y0, w, h), o in zip(crowd, out, strict=True):
        np.testing.assert_array_equal(o[0], data[y0 : y0 + h, x0 : x0 + w])
    # Sparse: two far-apart windows in one cell are read one by one, not as their box.
    sparse = np.array([(0, 0, 8, 8), (300, 250, 8, 8)])
    cs = _CountingSource(src)
    read_windows(cs, sparse)
    assert sorted(cs.reads) == [64, 64]
    # Past every edge: the outside is the fill value.
    edge = np.array([(-4, -4, 8, 8), (NX - 4, NY - 4, 8, 8), (NX + 10, 0, 8, 8)])
    a, b, c = read_windows(src, edge, fill=-1.0)
    np.testing.assert_array_equal(a[0, 4:, 4:], data[:4, :4])
    assert np.all(a[0, :4] == -1) and np.all(a[0, :, :4] == -1)
    np.testing.assert_array_equal(b[0, :4, :4], data[-4:, -4:])
    assert np.all(c == -1)


def _source_record(mosaic: Path) -> dict:
    return {
        "id": "orion",
        "paths": [str(mosaic)],
        "kind": "fits",
        "shape": [NY, NX],
        "n_bands": 1,
        "hdu": 0,
        "variable": None,
        "wcs_header": None,
    }


# ------------------------------------------------------------------------------ robustness
def test_store_without_analysis_still_reports(bare_store, tmp_path, caplog):
    caplog.set_level("INFO", logger="pipeline.report")
    r = build_report(bare_store, tmp_path)
    assert r.index.exists()
    for key in ("grid", "interactive", "clusters", "galleries", "outliers", "pca"):
        assert key in r.manifest["skipped"]
    assert "skipped" in caplog.text
    # Overlays and the similarity sheet need no analysis (fingerprints are compared directly).
    assert len(r.manifest["overlays"]) == 1
    assert "fingerprint space" in r.manifest["similar"]["how"]
    html = r.index.read_text()
    assert "run `elodin cluster` first" in html


def test_partial_analysis_uses_what_is_there(store, tmp_path, table):
    import zarr

    partial = tmp_path / "partial.zarr"
    shutil.copytree(store, partial)
    group = zarr.open_group(str(partial), mode="r+", zarr_format=3)
    for name in ("embedding", "cluster_centers", "outlier_score"):
        del group[name]
    r = build_report(partial, tmp_path / "r", n_outliers=5)
    # The map falls back to PCA 1-2, galleries to the PCA mean of each cluster.
    assert r.manifest["grid"]["space"] == "pca"
    assert any("PCA components 1 and 2" in n for n in r.manifest["notes"])
    assert "outliers" in r.manifest["skipped"] and "outliers" not in r.manifest
    valid = table["valid"]
    for g in r.manifest["galleries"]:
        members = np.flatnonzero(valid & (table["cluster"] == g["cluster"]))
        pcs = table["pca"][members].astype(np.float64)
        d = np.linalg.norm(pcs - pcs.mean(axis=0), axis=1)
        want = members[np.lexsort((members, d))[: len(g["nearest"])]]
        assert g["nearest"] == want.tolist()


@pytest.mark.parametrize("metric", ["cosine", "jaccard"])
def test_similar_by_other_metrics(store, tmp_path, table, metric):
    r = build_report(store, tmp_path, query=7, n_similar=5, metric=metric, max_points=0)
    sim = r.manifest["similar"]
    rows = np.flatnonzero(table["valid"])
    rows = rows[rows != 7]
    if metric == "cosine":
        v = table["pca"][rows].astype(np.float64)
        q = table["pca"][7].astype(np.float64)
        d = 1 - v @ q / (np.linalg.norm(v, axis=1) * np.linalg.norm(q))
    else:
        q = set(table["top_class"][7].tolist())
        d = np.array(
            [1 - len(set(t) & q) / len(set(t) | q) for t in table["top_class"][rows].tolist()]
        )
    # Ties (common with Jaccard) may be broken either way: compare distances, and each
    # returned row's own distance.
    np.testing.assert_allclose(sim["distances"], np.sort(d)[:5], atol=1e-6)
    where = {int(r): i for i, r in enumerate(rows)}
    np.testing.assert_allclose([d[where[r]] for r in sim["rows"]], sim["distances"], atol=1e-6)
    assert 7 not in sim["rows"] and len(set(sim["rows"])) == 5
    assert "interactive" in r.manifest["skipped"]


def test_bad_settings_are_config_errors(store, tmp_path):
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="report.metric"):
        build_report(store, tmp_path, metric="manhattan")
    with pytest.raises(ConfigError, match="report.thumb-px"):
        build_report(store, tmp_path, thumb_px=2)
    with pytest.raises(TypeError):
        build_report(store, tmp_path, thumbnail_size=64)


def test_bad_query_is_one_clear_error(store, tmp_path):
    st = Store.open(store)
    empty = (
        int(np.flatnonzero(~st.array("valid")[...])[0]) if (~st.array("valid")[...]).any() else None
    )
    for q in [st.n_rows + 5, -1] + ([empty] if empty is not None else []):
        with pytest.raises(InputError, match="not a valid cutout"):
            make_report(store, tmp_path, query=q)


def test_same_seed_same_report(store, tmp_path, report):
    r = build_report(store, tmp_path, n_outliers=10, n_similar=6)
    a = {k: v for k, v in r.manifest.items() if k != "seconds"}
    b = {k: v for k, v in report.manifest.items() if k != "seconds"}
    assert json.dumps(a, sort_keys=True, default=str).replace(str(tmp_path), "") == json.dumps(
        b, sort_keys=True, default=str
    ).replace(str(report.index.parent), "")


def test_cli_report_prints_the_index(store, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = tmp_path / "r"
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "report",
            str(store),
            "-o",
            str(out),
            "--query",
            "3",
            "-n",
            "4",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1] == str(out / "index.html")
    manifest = json.loads((out / "report.json").read_text())
    assert manifest["similar"]["query"] == 3 and manifest["similar"]["count"] == 4
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "report",
            str(store),
            "-o",
            str(out),
            "--query",
            "99999",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert p.returncode == 2
    assert p.stderr.startswith("elodin: error:") and "Traceback" not in p.stderr


# ------------------------------------------------------------------------------ selection
@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(0, 200),
    k=st.integers(0, 6),
    groups=st.integers(1, 5),
    block=st.integers(1, 64),
    seed=st.integers(0, 2**16),
)
def test_k_smallest_matches_a_full_sort(n, k, groups, block, seed):
    rs = np.random.default_rng(seed)
    keys = rs.integers(0, 20, n).astype(float)  # many ties: broken by row
    keys[rs.random(n) < 0.1] = np.nan
    grp = rs.integers(0, groups, n)
    ks = KSmallest(k)
    for s in range(0, n, block):
        ks.update(np.arange(s, min(n, s + block)), keys[s : s + block], grp[s : s + block])
    res = ks.result()
    for g in range(groups):
        m = np.flatnonzero((grp == g) & np.isfinite(keys))
        want = m[np.lexsort((m, keys[m]))][:k]
        got = res.get(g, (np.zeros(0, np.int64), None))[0]
        assert got.tolist() == want.tolist()


def test_random_keys_do_not_depend_on_blocks():
    whole = random_keys(7, 0, 1000)
    parts = np.concatenate([random_keys(7, s, 100) for s in range(0, 1000, 100)])
    np.testing.assert_array_equal(whole, parts)
    assert 0 <= whole.min() and whole.max() < 1
    assert abs(whole.mean() - 0.5) < 0.05
    assert not np.array_equal(whole, random_keys(8, 0, 1000))


# ------------------------------------------------------------------------------ browser
CHROMIUM = next(
    (p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser") if os.access(p, os.X_OK)),
    None,
)
BROWSER_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Screen position (page coordinates) and row of the first point of each scatter renderer.
_POINTS_JS = """() => {
  const pv = Object.values(Bokeh.index)[0];
  const rect = pv.canvas_view.el.getBoundingClientRect();
  const out = [];
  for (const rv of pv.renderer_views.values()) {
    if (rv.glyph && rv.glyph.sx && rv.glyph.sx.length)
      out.push([rect.left + rv.glyph.sx[0], rect.top + rv.glyph.sy[0], rv.model.data_source.data.row[0]]);
  }
  return out;
}"""


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (run .ci/install-browser.sh)")
def test_index_html_in_a_real_browser(report, tmp_path):
    from playwright.sync_api import sync_playwright

    problems: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 1000})
            page.on(
                "console",
                lambda m: (
                    problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None
                ),
            )
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            # Only file:// and data: URIs: a CDN or any network fetch would be a failure offline.
            page.on(
                "request",
                lambda r: (
                    None
                    if r.url.startswith(("file:", "data:"))
                    else problems.append(f"request {r.url}")
                ),
            )
            page.on("requestfailed", lambda r: problems.append(f"failed {r.url}"))
            page.goto(report.index.resolve().as_uri())
            page.wait_for_function(
                "() => window.Bokeh && Object.keys(Bokeh.index).length > 0", timeout=30000
            )
            assert page.evaluate("() => Bokeh.documents[0].roots().length") >= 1
            assert page.locator(".bk-Figure").count() >= 1
            assert page.locator("canvas").count() >= 1
            # Every linked PNG loads (relative links from disk).
            broken = page.evaluate(
                "() => [...document.images].filter(i => !i.complete || i.naturalWidth === 0).map(i => i.src)"
            )
            assert broken == []
            n_imgs = page.evaluate("() => document.images.length")
            assert n_imgs >= 3 + K + 2  # map, sizes, pca, galleries, overlay, similar, outliers
            # Hover a point: the tooltip shows that row's thumbnail and facts.
            page.locator("#embedding").scroll_into_view_if_needed()
            page.wait_for_timeout(300)
            x, y, row = page.evaluate(_POINTS_JS)[0]
            page.mouse.move(x, y)
            tip = page.locator(".bk-Tooltip img")
            tip.first.wait_for(timeout=10000)
            assert tip.first.get_attribute("src").startswith("data:image/png;base64,")
            # The tooltip's content lives in a shadow root: read it from the image's own box.
            text = tip.first.evaluate("img => img.parentElement.textContent")
            assert f"row {row}" in text and "orion" in text and "RA" in text
            shot = tmp_path / "report.png"
            page.screenshot(path=str(shot))
            page.screenshot(path=str(tmp_path / "report-full.png"), full_page=True)
        finally:
            browser.close()
    assert problems == []
    assert Image.open(shot).size == (1300, 1000)
    shutil.copy(shot, "/tmp/elodin-report.png")
    shutil.copy(tmp_path / "report-full.png", "/tmp/elodin-report-full.png")


@pytest.mark.parametrize(
    ("kind", "wcs", "bottom"),
    [("fits", None, True), ("zarr", "WCS", True), ("image", None, False), ("image", "WCS", True)],
)
def test_sky_images_are_drawn_first_row_at_the_bottom(kind, wcs, bottom):
    """FITS pixel coordinates count rows up from the bottom (ds9 draws them so, and a field
    with North along +y comes out North up); a picture without a WCS is drawn as stored."""
    record = {"id": "a", "paths": ["a"], "kind": kind, "shape": [4, 4], "n_bands": 1}
    assert first_row_at_bottom(ImageSource.from_record({**record, "wcs_header": wcs})) is bottom
