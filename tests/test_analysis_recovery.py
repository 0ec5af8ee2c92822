"""End to end on labelled synthetic sources: the real fingerprint stage on a real LocalCluster
(processes), then reduce and cluster on its workers. Do the clusters recover the classes, and
do CNN fingerprints beat the pixel-PCA baseline?

The sources (tests/analysis_store.py) are 40 each of Sersic n = 1 discs, n = 4 spheroids,
Gaussian point sources and blank sky, 64 x 64 FITS images with noise, random orientation and
offsets, all classes sharing one flux range (3e3-3e4 counts on a sky noise of 3), so only their
shapes tell them apart. On this data the CNN features win for every clustering method and
seed tried (benchmarks/bench_analysis_recovery.py). On brighter sources (1e4-5e4) the pixel
baseline does as well or better with k-means and Ward: bright, centred, well-resolved
profiles are what pixel PCA is good at; benchmarks/README.md ("Analysis") has both tables.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from analysis_store import make_labelled_sources
from sklearn.metrics import adjusted_rand_score

from pipeline import analysis
from pipeline.analysis._base import to_str
from pipeline.errors import StoreError
from pipeline.store import Store
from pipeline.testing import fingerprinted_store


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, client):
    work = tmp_path_factory.mktemp("recovery")
    paths, labels = make_labelled_sources(work / "images", per_class=40, seed=3)
    store = work / "sources.zarr"
    fingerprinted_store(store, paths, client=client, chunk_rows=32, components=10, pixels=True)
    ds = Store.open(store).dataset()
    truth_of = {Path(p).stem: lab for p, lab in zip(paths, labels, strict=True)}
    truth = np.array([truth_of.get(i, -1) for i in to_str(ds.image.values)])
    return str(store), paths, truth, ds.valid.values


def test_clusters_recover_classes_and_cnn_beats_pixels(labelled, client):
    store, _, truth, valid = labelled
    assert valid.sum() == 160
    ari = {}
    for features, variable in (("pca", "cluster"), ("pca_pixels", "cluster_pixels")):
        analysis.cluster(store, algorithm="kmeans", n_clusters=4, features=features, client=client)
        found = Store.open(store).dataset()[variable].values
        ari[features] = adjusted_rand_score(truth[valid], found[valid])
    print(
        f"adjusted Rand index, k-means on 4 classes: CNN {ari['pca']:.3f}, pixels {ari['pca_pixels']:.3f}"
    )
    assert ari["pca"] > 0.5  # chance is 0
    assert ari["pca"] > ari["pca_pixels"]


def test_pixel_baseline_reads_each_window_from_its_image(labelled):
    store, _, _, _ = labelled
    ds = Store.open(store).dataset()
    attrs = Store.open(store).attrs["pca_pixels"]
    assert attrs["channels"] == 1 and attrs["pixel_side"] == 32
    assert ds.pca_pixels_components.shape == (10, 32 * 32)
    # `auto` leaves the pixels unscaled (standardised, their sky corners weigh as much as the
    # source at the centre); the scale is still recorded, on the pixel dimension.
    assert attrs["scale"] is False and ds.pca_pixels_scale.dims == ("pixel",)
    assert (ds.pca_pixels_scale.values == 1).all()
    assert np.isfinite(ds.pca_pixels.values[ds.valid.values]).all()
    assert np.isnan(ds.pca_pixels.values[~ds.valid.values]).all()


def test_query_by_image_file_finds_its_own_cutout(labelled):
    store, paths, _, _ = labelled
    table = analysis.similar(store, image=paths[45], n=3)
    assert table["image"][0] == Path(paths[45]).stem
    # Fingerprinted on the spot with the store's model and preprocessing: the same vector.
    scale = np.linalg.norm(Store.open(store).dataset().pca.values[int(table["index"][0])])
    assert table["distance"][0] < 1e-3 * scale
    assert table["distance"][1] > 100 * table["distance"][0]


def test_radec_query_needs_a_celestial_wcs(labelled):
    store = labelled[0]
    with pytest.raises(StoreError, match="no cutout has sky coordinates"):
        analysis.similar(store, radec=(150.0, 2.0))
