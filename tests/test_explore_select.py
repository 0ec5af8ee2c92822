"""The explorer's lasso selections, labels on a whole selection, colour by any per-cutout
variable (in the API), and a store whose files are not writable (file permissions, not the
--read-only flag): through the real ``elodin explore`` process and its HTTP API."""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess

import numpy as np
import pytest
from explore_store import ExplorerProcess, http, make_store
from matplotlib.path import Path as MplPath
from PIL import Image

from pipeline.store import Store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("explore-select"))


@pytest.fixture
def fresh(store, tmp_path):
    out = tmp_path / "copy.zarr"
    shutil.copytree(store, out)
    return out


def _map(path):
    st = Store.open(path)
    valid = np.flatnonzero(st.array("valid")[...])
    return st, valid, st.array("embedding")[...][valid].astype(np.float64)


def _triangle(e: np.ndarray) -> list[list[float]]:
    """A triangle over the lower left of the map, its corners off the points (no point on
    an edge, where the test's matplotlib and the explorer's edges-included rule differ)."""
    span = e.max(axis=0) - e.min(axis=0)
    lo, hi = e.min(axis=0) + 0.0123 * span, e.max(axis=0) - 0.0171 * span
    return [
        [float(lo[0]), float(lo[1])],
        [float(hi[0]), float(lo[1])],
        [float(lo[0]), float(hi[1])],
    ]


def test_a_lasso_exports_and_labels_the_rows_inside(fresh):
    from astropy.table import Table

    _, valid, e = _map(fresh)
    poly = _triangle(e)
    inside = valid[MplPath(np.array(poly)).contains_points(e)]
    assert 5 < len(inside) < len(valid)
    with ExplorerProcess(fresh) as server:
        status, _, r = http(server.url + "api/export", data={"polygon": poly})
        assert status == 200 and r["rows"] == len(inside)
        assert Table.read(r["path"])["index"].tolist() == inside.tolist()
        # The selection labelled at once: one request, every row, one log entry each.
        rows = [int(v) for v in inside]
        status, _, r = http(server.url + "api/label", data={"rows": rows, "label": "interesting"})
        assert status == 200 and r["rows"] == len(rows)
        assert r["counts"]["interesting"] == len(rows)
        assert http(server.url + f"api/label/{rows[-1]}")[2]["label"] == "interesting"
        log = http(server.url + "api/labels")[2]["log"]
        assert sorted(x["row"] for x in log) == rows
        empty = int(np.flatnonzero(~Store.open(fresh).array("valid")[...])[0])
        for bad in (
            {"polygon": [[0, 0], [1, 1]]},
            {"polygon": [[0, 0], [1, "x"], [2, 2]]},
            {"polygon": "../x"},
            {"polygon": [[0, 0], [1, 1], [0, float("nan")]]},
        ):
            status, _, r = http(server.url + "api/export", data=bad)
            assert 400 <= status < 500 and "error" in r, (bad, status, r)
        for bad in ({"rows": [], "label": "interesting"}, {"rows": [empty], "label": "interesting"},
                    {"rows": ["1"], "label": "interesting"}, {"rows": rows, "label": "maybe"}):  # fmt: skip
            status, _, r = http(server.url + "api/label", data=bad)
            assert 400 <= status < 500 and "error" in r, (bad, status, r)
    labels = Store.open(fresh).array("label")[...]
    assert (labels[inside] == 1).all() and (np.delete(labels, inside) == -1).all()


def test_colour_by_any_per_cutout_variable(fresh):
    from pipeline.explore.data import Explorer
    from pipeline.explore.render import MapRenderer

    st = Store.open(fresh, mode="r+")
    # A variable of the user's own, one number per cutout: the map can be coloured by it.
    rng = np.random.default_rng(1)
    st.create_row_array("redshift", dtype="float32")
    st.write_rows(0, {"redshift": rng.uniform(0, 2, st.n_rows).astype(np.float32)})
    ex = Explorer(fresh, read_only=True)
    opts = ex.colour_options()
    assert {"density", "cluster", "outlier_score", "image", "label", "redshift", "ra"} <= set(opts)
    assert "valid" not in opts and "embedding" not in opts  # not one number per cutout
    valid = ex.rows
    np.testing.assert_array_equal(ex.column("redshift"), st.array("redshift")[...][valid])
    r = MapRenderer(ex, width=60, height=40)
    x0, x1, y0, y1 = ex.extent
    out = r.render("redshift", (x0, x1), (y0, y1))
    assert np.count_nonzero(out.image >> 24) > 0
    with ExplorerProcess(fresh) as server:
        summary = http(server.url + "api/summary")[2]
        assert "redshift" in summary["colour_by"]
        status, ctype, png = http(server.url + "api/map.png?by=redshift")
        assert status == 200 and ctype == "image/png"
        img = np.asarray(Image.open(io.BytesIO(png)))
        assert img.shape[2] == 4 and (img[..., 3] > 0).any()
        zoom = f"api/map.png?by=cluster&x0={x0}&x1={(x0 + x1) / 2}&y0={y0}&y1={y1}"
        assert http(server.url + zoom)[0] == 200
        for bad in ("by=../../etc/passwd", "by=fingerprint", "by=redshift&x0=nan",
                    "by=redshift&x1=abc", "by=valid"):  # fmt: skip
            status, _, r = http(server.url + "api/map.png?" + bad)
            assert status == 400 and "error" in r, (bad, status, r)


def _read_only_tree(path) -> None:
    for root, _dirs, files in os.walk(path):
        for f in files:
            os.chmod(os.path.join(root, f), stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
        os.chmod(root, stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP)


def _writable_tree(path) -> None:
    for root, dirs, files in os.walk(path):
        os.chmod(root, stat.S_IRWXU)
        for d in dirs:
            os.chmod(os.path.join(root, d), stat.S_IRWXU)
        for f in files:
            os.chmod(os.path.join(root, f), stat.S_IRUSR | stat.S_IWUSR)


def test_a_store_whose_files_are_not_writable_refuses_labels(fresh):
    """The store's files and directories made read-only by their modes; the explorer runs
    without the capability that lets root ignore modes (setpriv), as any user would."""
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is needed to drop root's override of file modes")
    probe = subprocess.run(
        ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "true"], check=False
    )
    if probe.returncode != 0:
        pytest.skip("cannot drop capabilities here")
    from analysis_store import store_digest

    _, valid, _ = _map(fresh)
    before = store_digest(fresh)
    _read_only_tree(fresh)
    try:
        p = ExplorerProcess(fresh)
        p.cmd = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *p.cmd]
        with p as server:
            s = http(server.url + "api/summary")[2]
            assert s["writable"] is False
            row = int(valid[0])
            for body in ({"row": row, "label": "interesting"},
                         {"rows": [int(v) for v in valid[:4]], "label": "interesting"}):  # fmt: skip
                status, _, r = http(server.url + "api/label", data=body)
                assert status == 409 and "read-only" in r["error"], (status, r)
            assert http(server.url + f"api/label/{row}")[2]["label"] == "none"
            # Reading still works: the map, a cutout, neighbours.
            assert http(server.url + f"api/cutout/{row}.png")[0] == 200
            assert http(server.url + f"api/similar/{row}?n=3")[0] == 200
    finally:
        _writable_tree(fresh)
    assert store_digest(fresh) == before
