"""``elodin explore``: the HTTP API against the real server (a subprocess of the real CLI on a
free port), labels in the store under the writer lock, "more like my labels", the map
renderer and the selection export."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from explore_store import ROOT, ExplorerProcess, http
from PIL import Image

from pipeline.errors import ConfigError
from pipeline.store import Store


@pytest.fixture(scope="module")
def store(explorer_store):
    return explorer_store


@pytest.fixture
def fresh(explorer_copy):
    return explorer_copy


@pytest.fixture(scope="module")
def server(store, tmp_path_factory):
    """One read-only explorer for the tests that only read (labels go to `fresh` copies)."""
    copy = tmp_path_factory.mktemp("ro") / "ro.zarr"
    shutil.copytree(store, copy)
    with ExplorerProcess(copy, "--read-only") as p:
        yield p


@pytest.fixture(scope="module")
def writable(store, tmp_path_factory):
    """An explorer that may write labels (only bad requests are sent to it)."""
    copy = tmp_path_factory.mktemp("rw") / "rw.zarr"
    shutil.copytree(store, copy)
    with ExplorerProcess(copy) as p:
        yield p, copy


@pytest.fixture(scope="module")
def table(store):
    ds = Store.open(store).dataset().load()
    return {name: np.asarray(ds[name].values) for name in ds.variables}


def _valid(table) -> np.ndarray:
    return np.flatnonzero(table["valid"])


# ---------------------------------------------------------------------------- the server
def test_prints_its_url_and_stops_cleanly_on_sigterm(fresh):
    with ExplorerProcess(fresh) as p:
        assert p.lines[-1] == f"Explorer: {p.url}\n"
        assert p.url.startswith("http://127.0.0.1:")
        status, _, _ = http(p.url + "api/summary")
        assert status == 200
    assert p.rc == 0, p.stderr
    assert "Traceback" not in p.stderr
    # Nothing listens on the port any more (SO_REUSEADDR: closed connections may linger).
    import socket

    port = int(p.url.rsplit(":", 1)[1].strip("/"))
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()


def test_every_interface_is_a_warning(fresh):
    with ExplorerProcess(fresh, "--host", "0.0.0.0") as p:
        status, _, _ = http(p.url + "api/summary")
        assert status == 200
    assert "every interface" in p.stderr


def test_a_busy_port_and_a_missing_store_are_one_line(fresh, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = _cli("explore", str(fresh), "--port", str(port), "--no-browser")
    assert r.returncode == 2 and r.stderr.startswith("elodin: error: cannot listen"), r.stderr
    r = _cli("explore", str(tmp_path / "none.zarr"), "--no-browser")
    assert r.returncode == 2 and "no fingerprint store" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def _cli(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip


# ------------------------------------------------------------------------------- the API
def test_summary(server, table):
    status, ctype, s = http(server.url + "api/summary")
    assert status == 200 and ctype.startswith("application/json")
    assert s["rows"] == int(table["valid"].sum())
    assert s["store_rows"] == len(table["valid"]) > s["rows"]  # the store has empty slots
    assert {"embedding", "pca", "cluster", "outlier_score", "fingerprint"} <= set(s["variables"])
    assert s["map"] == "embedding"
    assert s["writable"] is False  # --read-only


def test_cutout_is_the_stretched_window(server, store, table):
    from pipeline import config
    from pipeline.report.thumbnails import ThumbnailReader, window_boxes

    row = int(_valid(table)[10])
    status, ctype, body = http(server.url + f"api/cutout/{row}.png")
    assert status == 200 and ctype == "image/png"
    got = np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))
    size = config.get_int("explore.thumb-px")
    reader = ThumbnailReader(Store.open(store))
    box = window_boxes(
        table["x"][[row]], table["y"][[row]], table["width"][[row]], table["height"][[row]]
    )
    want = reader.thumbnails([str(table["image"][row])], box, size=size)[0]
    np.testing.assert_array_equal(got, want)
    # Asked again: the same bytes (from the cache).
    assert http(server.url + f"api/cutout/{row}.png")[2] == body


def test_similar_is_the_exact_query(server, store, table):
    from pipeline.analysis import similar

    row = int(_valid(table)[3])
    status, _, s = http(server.url + f"api/similar/{row}?n=5")
    assert status == 200 and s["query"] == row
    want = similar(store, cutout=row, n=5)
    assert [r["row"] for r in s["results"]] == list(want["index"])
    np.testing.assert_allclose([r["distance"] for r in s["results"]], want["distance"], rtol=1e-6)
    assert len(http(server.url + f"api/similar/{row}")[2]["results"]) == 9


def test_similar_uses_the_neighbors_graph_when_present(fresh, table):
    st = Store.open(fresh, mode="r+")
    n = st.n_rows
    graph = np.tile(np.arange(12, dtype=np.int64)[::-1], (n, 1))  # recognisable
    st.create_row_array("neighbors", tail=(12,), dims=("k",), dtype="int64", fill=-1)
    st.write_rows(0, {"neighbors": graph})
    st.create_row_array("neighbor_distance", tail=(12,), dims=("k",))
    st.write_rows(0, {"neighbor_distance": np.tile(np.arange(12, dtype=np.float32), (n, 1))})
    row = int(_valid(table)[0])
    with ExplorerProcess(fresh) as p:
        s = http(p.url + f"api/similar/{row}?n=4")[2]
    assert [r["row"] for r in s["results"]] == [11, 10, 9, 8]
    assert [r["distance"] for r in s["results"]] == [0.0, 1.0, 2.0, 3.0]


def test_outliers_paged(server, table):
    valid = _valid(table)
    s = table["outlier_score"][valid].astype(np.float64)
    order = valid[np.lexsort((valid, -s))]
    p0 = http(server.url + "api/outliers?n=5")[2]
    p1 = http(server.url + "api/outliers?n=5&page=1")[2]
    assert [r["row"] for r in p0["results"]] == order[:5].tolist()
    assert [r["row"] for r in p1["results"]] == order[5:10].tolist()
    assert p0["results"][0]["row"] == int(
        np.argmax(np.where(table["valid"], table["outlier_score"], -1))
    )


BAD_ROWS = [
    "-1",
    "abc",
    "1.5",
    "1e3",
    "%2E%2E%2Fzarr.json",
    "..%2F..%2Fetc%2Fpasswd",
    "%20",
    "0x10",
    "%D9%A3",
]


@pytest.mark.parametrize("text", BAD_ROWS)
def test_bad_rows_are_400_json(server, text):
    for path in (f"api/cutout/{text}.png", f"api/similar/{text}", f"api/label/{text}"):
        status, ctype, body = http(server.url + path)
        assert status == 400, (path, status, body)
        assert ctype.startswith("application/json") and "error" in body


def test_out_of_range_and_empty_rows_are_404_json(server, table):
    n = len(table["valid"])
    empty = int(np.flatnonzero(~table["valid"])[0])
    for row, why in ((n, "out of range"), (10**11, "out of range"), (empty, "empty slot")):
        for path in (f"api/cutout/{row}.png", f"api/similar/{row}", f"api/label/{row}"):
            status, _, body = http(server.url + path)
            assert status == 404 and why in body["error"], (path, body)


def test_other_bad_requests(server, table):
    row = int(_valid(table)[0])
    for path in (f"api/cutout/{row}", f"api/cutout/{row}.png/x", f"api/similar/{row}?n=0",
                 f"api/similar/{row}?n=-3", f"api/similar/{row}?n=abc", "api/outliers?page=-1",
                 "api/ranked?n=100000"):  # fmt: skip
        status, _, body = http(server.url + path)
        assert status == 400 and "error" in body, (path, status, body)
    for path in ("api/nothing", "api/cutout", "api/../zarr.json", "api/exports/..%2Fzarr.json"):
        status, ctype, body = http(server.url + path)
        assert status == 404 and ctype.startswith("application/json"), (path, status, body)
    # Another Host (a DNS name rebound to 127.0.0.1) is refused.
    status, _, body = http(server.url + "api/summary", headers={"Host": "evil.example:80"})
    assert status == 403


@pytest.mark.parametrize(
    "body, ctype",
    [
        (b"{not json", "application/json"),
        (b'["row", 1]', "application/json"),
        (b'{"row": 1, "label": "interesting"}', "text/plain"),  # a cross-site form's type
        (b'{"row": "1", "label": "interesting"}', "application/json"),
        (b'{"row": true, "label": "interesting"}', "application/json"),
        (b'{"row": -1, "label": "interesting"}', "application/json"),
        (b'{"row": 1.5, "label": "interesting"}', "application/json"),
        (b'{"label": "interesting"}', "application/json"),
        (b'{"row": ROW, "label": "fascinating"}', "application/json"),
        (b'{"row": ROW, "label": 1}', "application/json"),
        (b'{"row": ROW}', "application/json"),
    ],
)
def test_bad_label_requests_are_400_and_change_nothing(writable, table, body, ctype):
    from analysis_store import store_digest

    proc, path = writable
    body = body.replace(b"ROW", str(int(_valid(table)[0])).encode())
    before = store_digest(path)
    status, _, answer = http(proc.url + "api/label", data=body, headers={"Content-Type": ctype})
    assert status == 400 and "error" in answer, answer
    assert store_digest(path) == before
    assert not (path / "label").exists()


# ------------------------------------------------------------------------------ labels
def test_a_label_is_stored_with_its_time_and_survives_a_restart(fresh, table):
    row, other = (int(r) for r in _valid(table)[[4, 9]])
    t0 = time.time()
    with ExplorerProcess(fresh) as p:
        status, _, r = http(p.url + "api/label", data={"row": row, "label": "interesting"})
        assert status == 200 and r["label"] == "interesting"
        http(p.url + "api/label", data={"row": other, "label": "not_interesting"})
        http(p.url + "api/label", data={"row": other, "label": "none"})
        assert http(p.url + f"api/label/{row}")[2] == {"row": row, "label": "interesting"}
    st = Store.open(fresh)
    labels = st.array("label")[...]
    assert labels[row] == 1 and labels[other] == -1
    assert np.count_nonzero(labels >= 0) == 1
    assert st.array("label_log_row")[...].tolist() == [row, other, other]
    assert st.array("label_log_label")[...].tolist() == [1, 0, -1]
    times = st.array("label_log_time")[...]
    assert np.all(np.diff(times) >= 0) and t0 <= times[0] <= time.time()
    assert Store.lock_holder(fresh) is None  # the lock was given back
    with ExplorerProcess(fresh) as p:
        assert http(p.url + f"api/label/{row}")[2]["label"] == "interesting"
        log = http(p.url + "api/labels")[2]
    assert [e["row"] for e in log["log"]] == [row, other, other]
    assert log["counts"] == {"interesting": 1, "not_interesting": 0}


def test_a_store_locked_by_a_run_refuses_labels_and_changes_nothing(fresh, table):
    from analysis_store import store_digest

    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; from pipeline.store import Store; l = Store.lock(sys.argv[1]); "
         "print('locked', flush=True); sys.stdin.read()", str(fresh)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = store_digest(fresh)
        with ExplorerProcess(fresh) as p:
            assert http(p.url + "api/summary")[2]["writable"] is False
            row = int(_valid(table)[0])
            status, _, r = http(p.url + "api/label", data={"row": row, "label": "interesting"})
            assert status == 409 and "another run is writing" in r["error"]
            assert http(p.url + f"api/label/{row}")[2]["label"] == "none"
        assert store_digest(fresh) == before
    finally:
        holder.communicate("")
    with ExplorerProcess(fresh) as p:  # once the run is over, labels are taken
        assert http(p.url + "api/label", data={"row": row, "label": "interesting"})[0] == 200


def test_a_read_only_store_refuses_labels(server, store, table):
    row = int(_valid(table)[0])
    status, _, r = http(server.url + "api/label", data={"row": row, "label": "interesting"})
    assert status == 409 and "read-only" in r["error"]


def test_more_like_my_labels_is_a_logistic_regression_in_pca_space(fresh, table):
    from sklearn.linear_model import LogisticRegression

    valid = _valid(table)
    cl = table["cluster"]
    pos = [int(r) for r in valid if cl[r] == 0][:3]
    neg = [int(r) for r in valid if cl[r] == 1][:3]
    with ExplorerProcess(fresh) as p:
        assert http(p.url + "api/ranked")[0] == 409  # no labels yet
        for r in pos[:1]:
            http(p.url + "api/label", data={"row": r, "label": "interesting"})
        status, _, r = http(p.url + "api/ranked")
        assert status == 409 and "at least one" in r["error"]
        for r in pos[1:]:
            http(p.url + "api/label", data={"row": r, "label": "interesting"})
        for r in neg:
            http(p.url + "api/label", data={"row": r, "label": "not_interesting"})
        first = http(p.url + "api/ranked?n=10")[2]
        # Refitted on a new label: one more negative changes the scores.
        http(
            p.url + "api/label",
            data={"row": int(valid[cl[valid] == 2][0]), "label": "not_interesting"},
        )
        second = http(p.url + "api/ranked?n=10")[2]
    pca = table["pca"].astype(np.float64)
    model = LogisticRegression(class_weight="balanced", max_iter=1000).fit(
        pca[pos + neg], [1] * len(pos) + [0] * len(neg)
    )
    rest = np.array([r for r in valid if r not in pos + neg])
    prob = model.predict_proba(pca[rest])[:, 1]
    want = rest[np.lexsort((rest, -prob))[:10]]
    assert [r["row"] for r in first["results"]] == want.tolist()
    np.testing.assert_allclose(
        [r["score"] for r in first["results"]], np.sort(prob)[::-1][:10], rtol=1e-6
    )
    assert not {r["row"] for r in first["results"]} & set(pos + neg)
    assert all(cl[r["row"]] == 0 for r in first["results"])  # more of cluster 0
    assert [r["score"] for r in first["results"]] != [r["score"] for r in second["results"]]


# ------------------------------------------------------------------------------ export
def test_export_of_a_box_is_the_rows_inside(server, table):
    from astropy.table import Table

    valid = _valid(table)
    e = table["embedding"][valid]
    box = [float(np.percentile(e[:, 0], 20)), float(np.percentile(e[:, 0], 70)), -1e9, 1e9]
    want = valid[(e[:, 0] >= box[0]) & (e[:, 0] <= box[1])]
    status, _, r = http(server.url + "api/export", data={"box": box})
    assert status == 200 and r["rows"] == len(want)
    t = Table.read(r["path"])
    assert t["index"].tolist() == want.tolist()
    assert {"ra", "dec", "cluster", "outlier_score", "embedding_0"} <= set(t.colnames)
    status, _, raw = http(server.url + r["url"].lstrip("/"))
    assert status == 200 and raw[:4] == b"PAR1"
    # Rows given; bad selections are 4xx.
    status, _, r = http(
        server.url + "api/export", data={"rows": [int(v) for v in valid[:3]], "format": "ecsv"}
    )
    assert status == 200 and Table.read(r["path"])["index"].tolist() == valid[:3].tolist()
    for bad in ({"rows": []}, {"rows": ["../x"]}, {"box": [0, 1]}, {"box": [0, 1, 0, "x"]},
                {"rows": [1], "format": "../../x"}, {"rows": [10**9]}):  # fmt: skip
        status, _, r = http(server.url + "api/export", data=bad)
        assert 400 <= status < 500 and "error" in r, (bad, status, r)


def test_export_rows_keyword(store, table, tmp_path):
    from astropy.table import Table

    from pipeline.analysis import export

    valid = _valid(table)
    empty = int(np.flatnonzero(~table["valid"])[0])
    rows = np.array([valid[7], empty, valid[2], valid[7]])
    res = export(store, tmp_path / "sel.parquet", rows=rows)
    assert res.n_rows == 2
    assert Table.read(tmp_path / "sel.parquet")["index"].tolist() == sorted([valid[2], valid[7]])
    with pytest.raises(ConfigError, match="no valid cutout"):
        export(store, tmp_path / "none.parquet", rows=[empty])
    with pytest.raises(ConfigError, match="must lie in"):
        export(store, tmp_path / "bad.fits", rows=[-1])
    assert not (tmp_path / "none.parquet").exists()


# ------------------------------------------------------------------------------ render
def test_render_covers_the_view_and_counts_it(store, table):
    from pipeline.explore.data import Explorer
    from pipeline.explore.render import MapRenderer

    ex = Explorer(store, read_only=True)
    r = MapRenderer(ex, width=120, height=80)
    valid = _valid(table)
    e = table["embedding"][valid].astype(np.float64)
    for by in ex.colour_options():
        out = r.render(by, (e[:, 0].min(), e[:, 0].max()), (e[:, 1].min(), e[:, 1].max()))
        assert out.image.shape == (80, 120) and out.image.dtype == np.uint32
        assert out.in_view == len(valid)
        assert np.count_nonzero(out.image >> 24) > 0  # something drawn
    # Zoomed on one point: it is drawn near the centre, nothing else.
    x, y = e[0]
    out = r.render("density", (x - 1e-3, x + 1e-3), (y - 1e-3, y + 1e-3))
    drawn = np.argwhere(out.image >> 24)
    assert out.in_view >= 1 and len(drawn)
    assert np.all(np.abs(drawn.mean(axis=0) - [40, 60]) < 4)
    # Rows are bottom-up (Bokeh's image_rgba): a point at the view's bottom is in row 0.
    out = r.render("density", (x - 1, x + 1), (y, y + 2))
    assert (np.argwhere(out.image >> 24)[:, 0] < 4).any()
    assert r.legend("cluster") and set(r.legend("label")) == {
        "none",
        "not_interesting",
        "interesting",
    }
