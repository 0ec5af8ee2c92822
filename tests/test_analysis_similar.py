"""Similarity search streamed over real stores, against brute-force numpy and set arithmetic;
queries by image file on stores fingerprinted by the real stage (fp16 and user models)."""

from __future__ import annotations

from pathlib import Path

import dask.config
import numpy as np
import pytest
from analysis_store import build_store, make_labelled_sources, store_digest

from pipeline import analysis
from pipeline.cli import main
from pipeline.errors import ConfigError, StoreError
from pipeline.store import Store
from pipeline.testing import fingerprinted_store

N = 400
TOPK = 5


def overlapping_coords(n: int) -> dict:
    """16-pixel windows every 8 pixels (neighbours overlap), 20 per row, two images."""
    i = np.arange(n)
    image = np.where(i < n // 2, "left", "right").astype(object)
    j = i % (n // 2)
    x = 7.5 + 8 * (j % 20)
    y = 7.5 + 8 * (j // 20)
    scale = 0.2 / 3600  # 0.2 arcsec per pixel
    ra = np.where(image == "left", 150.0, 150.1) - x * scale
    dec = 2.0 + y * scale
    return {
        "image": image,
        "x": x,
        "y": y,
        "width": np.full(n, 16),
        "height": np.full(n, 16),
        "ra": ra,
        "dec": dec,
    }


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    rng = np.random.default_rng(11)
    X = rng.normal(size=(N, 12)).astype(np.float32)
    classes = np.array([rng.choice(30, TOPK, replace=False) for _ in range(N)], np.int32)
    coords = overlapping_coords(N)
    st, rows = build_store(
        tmp_path_factory.mktemp("sim") / "s.zarr",
        X,
        chunk_rows=32,
        topk=TOPK,
        top_class=classes,
        coords=coords,
    )
    analysis.reduce(st.path, components=6)
    ds = Store.open(st.path).dataset()
    return st, rows, ds.pca.values[rows], classes, coords


def brute(values: np.ndarray, q: int, metric: str) -> np.ndarray:
    if metric == "l2":
        return np.linalg.norm(values - values[q], axis=1)
    unit = values / np.linalg.norm(values, axis=1, keepdims=True)
    return 1 - unit @ unit[q]


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_pca_metrics_equal_brute_force(store, metric):
    st, rows, pca, _, _ = store
    q = 37
    table = analysis.similar(st.path, cutout=int(rows[q]), n=7, metric=metric, block_rows=64)
    d = brute(pca.astype(np.float64), q, metric)
    d[q] = np.inf  # the query itself is left out
    order = np.argsort(d, kind="stable")[:7]
    np.testing.assert_array_equal(table["index"], rows[order])
    np.testing.assert_allclose(table["distance"], d[order], rtol=1e-6, atol=1e-9)
    assert list(table.colnames) == ["rank", "index", "image", "x", "y", "ra", "dec", "distance"]
    assert str(table["ra"].unit) == "deg" and table.meta["query_index"] == rows[q]


def test_jaccard_equals_set_computation(store):
    st, rows, _, classes, _ = store
    q = 5
    table = analysis.similar(st.path, cutout=int(rows[q]), n=10, metric="jaccard", block_rows=64)
    qs = set(classes[q])
    jac = np.array([1 - len(qs & set(c)) / len(qs | set(c)) for c in classes])
    jac[q] = np.inf
    np.testing.assert_allclose(table["distance"], np.sort(jac)[:10])
    for idx, dist in zip(table["index"], table["distance"], strict=True):
        i = int(np.flatnonzero(rows == idx)[0])
        assert dist == pytest.approx(1 - len(qs & set(classes[i])) / len(qs | set(classes[i])))


def test_overlapping_windows_can_be_left_out(store):
    st, rows, _, _, coords = store
    q = 45  # an inner window of the first image: 8 neighbours overlap it
    near = analysis.similar(st.path, cutout=int(rows[q]), n=N, block_rows=64)
    far = analysis.similar(st.path, cutout=int(rows[q]), n=N, exclude_overlaps=True, block_rows=64)
    same = coords["image"] == coords["image"][q]
    overlaps = (
        same
        & (np.abs(coords["x"] - coords["x"][q]) < 16)
        & (np.abs(coords["y"] - coords["y"][q]) < 16)
    )
    overlaps[q] = False
    assert overlaps.sum() == 8
    assert set(far["index"]) == set(near["index"]) - set(rows[overlaps])
    assert len(far) == N - 1 - 8


def test_query_by_radec_finds_the_nearest_cutout(store):
    st, rows, _, _, coords = store
    q = 260
    ra, dec = coords["ra"][q] + 0.5 / 3600, coords["dec"][q] + 0.3 / 3600
    table = analysis.similar(st.path, radec=(ra, dec), n=3, block_rows=64)
    assert table.meta["query_index"] == rows[q]
    sep = analysis.nearest_cutout(st.path, ra, dec)[1] * 3600
    assert sep == pytest.approx(np.hypot(0.5 * np.cos(np.deg2rad(dec)), 0.3), rel=1e-3)


@pytest.mark.parametrize(
    ("query", "error", "words"),
    [
        ({"cutout": 10**6}, StoreError, "cutout index 1000000 is out of range"),
        ({"cutout": -1}, StoreError, "out of range"),
        ({"radec": (150.05, 2.5)}, StoreError, "outside the store's footprint"),
        ({"radec": (10.0, -30.0)}, StoreError, "outside the store's footprint"),
        ({"cutout": 1, "metric": "manhattan"}, ConfigError, "unknown metric 'manhattan'"),
        ({}, ConfigError, "give exactly one query"),
    ],
)
def test_bad_queries(store, query, error, words):
    st = store[0]
    before = store_digest(st.path)
    with pytest.raises(error) as e:
        analysis.similar(st.path, **query)
    assert words in str(e.value) and "\n" not in str(e.value)
    assert store_digest(st.path) == before


def test_empty_slot_query(store):
    st = store[0]
    valid = Store.open(st.path).dataset().valid.values
    with pytest.raises(StoreError, match=rf"row {np.flatnonzero(~valid)[0]} is an empty slot"):
        analysis.similar(st.path, cutout=int(np.flatnonzero(~valid)[0]))


# ------------------------------------------------------------------------- the terminal
def _printed_distances(out: str) -> list[str]:
    lines = out.strip().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("----")) + 1
    return [line.split()[-1] for line in lines[start:]]


def test_cli_prints_four_significant_digits(store, capsys):
    st, rows, _, _, _ = store
    assert main(["similar", st.path, "--cutout", str(rows[3]), "-n", "6"]) == 0
    printed = _printed_distances(capsys.readouterr().out)
    table = analysis.similar(st.path, cutout=int(rows[3]), n=6)
    assert printed == [f"{d:.4g}" for d in table["distance"]]
    # The Table itself keeps full precision.
    assert any(float(p) != d for p, d in zip(printed, table["distance"], strict=True))


# ---------------------------------------------------------------------- query by image
@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return make_labelled_sources(tmp_path_factory.mktemp("images"), per_class=3, seed=8)[0]


def _fingerprinted(path: Path, sources: list[str], client, model: str) -> str:
    return fingerprinted_store(
        path, sources, client=client, model=model, chunk_rows=4, components=4
    )


@pytest.fixture(scope="module")
def fp16_store(tmp_path_factory, sources, client):
    pytest.importorskip("onnxconverter_common")
    with dask.config.set({"elodin.model.precision": "fp16"}):
        path = _fingerprinted(
            tmp_path_factory.mktemp("fp16") / "s.zarr", sources, client, "efficientnet-lite0:native"
        )
    assert Store.open(path).attrs["model"] == "efficientnet-lite0:native@fp16"
    return path


@pytest.fixture(scope="module")
def user_store(tmp_path_factory, sources, client):
    from pipeline.testing import TINY_CARD as CARD
    from pipeline.testing import tiny_onnx as _tiny_onnx

    work = tmp_path_factory.mktemp("user")
    _tiny_onnx(work / "tiny.onnx")
    (work / "tiny.yaml").write_text(CARD)
    path = _fingerprinted(work / "s.zarr", sources, client, str(work / "tiny.onnx"))
    assert Store.open(path).attrs["model"] == "tiny"
    return path


@pytest.mark.parametrize("kind", ["fp16", "user"])
def test_query_by_image_runs_the_stores_own_model(kind, request, sources, client):
    store = request.getfixturevalue(f"{kind}_store")
    query = sources[4]
    table = analysis.similar(store, image=query, n=3, client=client)
    assert table["image"][0] == Path(query).stem
    # Fingerprinted on the spot with the store's model file: its own cutout, at distance ~0.
    scale = np.linalg.norm(Store.open(store).dataset().pca.values[int(table["index"][0])])
    assert table["distance"][0] < 1e-3 * scale
    assert table["distance"][1] > 100 * table["distance"][0]


def test_cli_query_by_image_on_a_user_model_store(user_store, sources, capsys):
    assert main(["similar", user_store, "--image", sources[7], "-n", "2"]) == 0
    out = capsys.readouterr().out
    assert f"image {sources[7]}" in out and Path(sources[7]).stem in out


def test_one_distance_for_search_and_report():
    """The report's brute-force search and the similarity stage share one distance function,
    and an empty Jaccard union (two rows without any class) is distance 1.0, never NaN: such
    rows are ranked last, not dropped."""
    import importlib

    sim = importlib.import_module("pipeline.analysis.similar")
    build = importlib.import_module("pipeline.report.build")

    assert build.distances is sim.distances
    rows = np.array([[-1, -1, -1], [3, 4, -1], [5, 6, 7], [-1, -1, -1]])
    np.testing.assert_allclose(
        sim.distances(rows, np.array([-1, -1, -1]), "jaccard"), [1.0, 1.0, 1.0, 1.0]
    )
    np.testing.assert_allclose(
        sim.distances(rows, np.array([3, 5, -1]), "jaccard"), [1.0, 2 / 3, 3 / 4, 1.0]
    )
    x = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    np.testing.assert_allclose(sim.distances(x, np.array([1.0, 0.0]), "cosine"), [1.0, 0.0, 1.0])
    np.testing.assert_allclose(sim.distances(x, np.zeros(2), "cosine"), [1.0, 1.0, 1.0])
    np.testing.assert_allclose(sim.distances(x, np.array([1.0, 0.0]), "l2"), [1.0, 0.0, np.sqrt(5)])
