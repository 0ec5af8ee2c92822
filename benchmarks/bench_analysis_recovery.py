"""Do the clusters recover labelled classes, and do CNN fingerprints beat the pixel baseline?

Labelled synthetic sources (tests/analysis_store.py: Sersic n = 1 discs, n = 4 spheroids,
Gaussian point sources, blank sky; ``--per-class`` of each, 64 x 64 FITS images with noise,
random orientation, offsets and a common flux range) are fingerprinted with the real pipeline
(``method="full"``, EfficientNet-Lite0 at native resolution) on a local Dask cluster, reduced
to ``--components`` with PCA both from the CNN features (``pca``) and from the stretched
pixels (``pca_pixels``, the sdss_clustering baseline), and grouped into 4 clusters. The
adjusted Rand index against the true classes is printed for every seed, flux range and
algorithm, then averaged.

    .venv/bin/python benchmarks/bench_analysis_recovery.py [--seeds 0 1 2 3 4] [--per-class 40]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

FLUX = {"faint": (3e3, 3e4), "bright": (1e4, 5e4)}
ALGORITHMS = ("kmeans", "agglomerative", "hdbscan")


def run_one(
    client, work: Path, *, seed: int, flux: tuple[float, float], per_class: int, components: int
) -> dict:
    from analysis_store import make_labelled_sources
    from sklearn.metrics import adjusted_rand_score

    from pipeline import analysis
    from pipeline.analysis._base import to_str
    from pipeline.fingerprint import fingerprint
    from pipeline.store import Store

    images = work / f"img-{seed}-{flux[0]:g}"
    paths, labels = make_labelled_sources(images, per_class=per_class, seed=seed, flux=flux)
    store = work / f"s-{seed}-{flux[0]:g}.zarr"
    fingerprint(
        paths,
        store,
        method="full",
        model="efficientnet-lite0:native",
        client=client,
        progress=False,
        chunk_rows=32,
    )
    analysis.reduce(store, components=components, client=client)
    analysis.reduce(store, components=components, features="pixels", client=client)
    ds = Store.open(store).dataset()
    valid = ds.valid.values
    truth_of = {Path(p).stem: lab for p, lab in zip(paths, labels, strict=True)}
    truth = np.array([truth_of.get(i, -1) for i in to_str(ds.image.values)])[valid]
    out = {}
    for feat, var in (("pca", "cluster"), ("pca_pixels", "cluster_pixels")):
        for algo in ALGORITHMS:
            analysis.cluster(store, algorithm=algo, n_clusters=4, features=feat, client=client)
            found = Store.open(store).dataset()[var].values[valid]
            out[(feat, algo)] = adjusted_rand_score(truth, found)
    shutil.rmtree(images)
    shutil.rmtree(store)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--per-class", type=int, default=40)
    ap.add_argument("--components", type=int, default=10)
    args = ap.parse_args(argv)

    from distributed import Client, LocalCluster

    t0 = time.perf_counter()
    results: dict[tuple[str, str, str], list[float]] = {}
    with (
        tempfile.TemporaryDirectory(prefix="elodin-recovery-") as tmp,
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        for name, flux in FLUX.items():
            for seed in args.seeds:
                ari = run_one(
                    client,
                    Path(tmp),
                    seed=seed,
                    flux=flux,
                    per_class=args.per_class,
                    components=args.components,
                )
                line = "  ".join(f"{f}/{a} {v:.3f}" for (f, a), v in ari.items())
                print(f"{name:<6} seed {seed}: {line}", flush=True)
                for (f, a), v in ari.items():
                    results.setdefault((name, f, a), []).append(v)
    print(
        f"\nadjusted Rand index, mean ± std over seeds {args.seeds} ({args.per_class} per class, {args.components} components):"
    )
    print(
        f"{'flux':<7}{'algorithm':<15}{'CNN (pca)':>16}{'pixels (pca_pixels)':>22}{'CNN better':>12}"
    )
    for name in FLUX:
        for algo in ALGORITHMS:
            cnn = np.array(results[(name, "pca", algo)])
            pix = np.array(results[(name, "pca_pixels", algo)])
            print(
                f"{name:<7}{algo:<15}{cnn.mean():>10.3f} ± {cnn.std():.3f}{pix.mean():>15.3f} ± {pix.std():.3f}{int((cnn > pix).sum()):>8}/{len(cnn)}"
            )
    print(f"\n{time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
