"""Similarity at survey scale: the FAISS neighbour index beside the exact scan, same rows, same run.

Rows with the structure of real fingerprints: the Hubble Deep Field (scikit-image) is
fingerprinted once with the real EfficientNet-Lite0 (sliding 64-pixel windows), the
fingerprints' PCA-32 is fitted, a Gaussian mixture (full covariances) is fitted in that space,
and ``--rows`` vectors are drawn from it plus 5 % isotropic noise: groups of different sizes,
shapes and densities, not isotropic blobs. They go into a real Zarr store (``pca`` written by
``elodin reduce``), and then, for each index kind:

- build time (``build_index``: sample, train, blocks read and encoded, saved in the store) and
  bytes per vector (the serialised index over the rows);
- per-query latency inside a process that has the index open (``NeighborIndex.kneighbors``,
  one query at a time: the explorer's and the Python API's case), p50 and p99;
- recall@10 against the exact answer (numpy brute force over the same vectors);

beside the baseline: the exact scan, in memory (numpy, one query) and as ``similar --exact``
streams the store; and ``similar`` end to end with the index (open, load, query, read rows).
``--graph`` also times the k-NN graph (``neighbors``) of every row; ``--umap ROWS`` times UMAP
of a ROWS-row store building its own k-NN against UMAP handed the store's graph (same run).

    ELODIN__CACHE_DIR=/path/to/models .venv/bin/python benchmarks/bench_similarity.py \
        [--rows 1000000] [--kinds flat ivfpq hnsw] [--queries 200] [--work /tmp/elodin-sim]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import time
from pathlib import Path

import numpy as np

D = 32


def real_structure(work: Path, seed: int):
    """A Gaussian mixture in the PCA-32 space of the HDF's real fingerprints."""
    from sklearn.mixture import GaussianMixture

    from pipeline import analysis
    from pipeline.demo import hubble_deep_field
    from pipeline.fingerprint import fingerprint
    from pipeline.store import Store

    store = work / "hdf.zarr"
    if not store.exists():
        fingerprint(
            [hubble_deep_field(work)],
            store,
            method="sliding",
            size=64,
            stride=16,
            tile_size=256,
            chunk_rows=64,
            workers=1,
            progress=False,
        )
    analysis.reduce(str(store), components=D)
    st = Store.open(str(store))
    pca = st.array("pca")[...]
    pca = pca[np.isfinite(pca).all(axis=1)]
    gm = GaussianMixture(16, covariance_type="full", reg_covar=1e-4, random_state=seed).fit(pca)
    return gm, len(pca), float(np.sqrt(np.mean(np.var(pca, axis=0))))


def make_store(path: Path, gm, n: int, scale: float, seed: int) -> np.ndarray:
    from pipeline import analysis
    from pipeline.store import Store, pack_units

    rng = np.random.default_rng(seed)
    x, _ = gm.sample(n)
    x = (x + rng.normal(scale=0.05 * scale, size=x.shape)).astype(np.float32)
    x = x[rng.permutation(n)]
    if path.exists():
        shutil.rmtree(path)
    chunk = 4096
    st = Store.create(
        path,
        feature_dim=D,
        topk=1,
        chunk_rows=chunk,
        attrs={"model": "bench", "model_sha256": "0" * 64, "fingerprint_dtype": "float32"},
    )
    layout = pack_units(np.r_[np.arange(0, n, chunk), n].astype(np.int64), chunk_rows=chunk)
    seg = st.append_segment(images=["sim"], layout=layout, plan_digest="bench", inputs={})
    for a in range(0, n, 1 << 17):
        b = min(n, a + (1 << 17))
        m = b - a
        st.write_rows(
            a,
            {
                "fingerprint": x[a:b],
                "valid": np.ones(m, bool),
                "image": np.full(m, "sim", dtype=object),
                "x": np.arange(a, b, dtype=np.float64),
                "y": np.zeros(m),
                "width": np.full(m, 64, np.int32),
                "height": np.full(m, 64, np.int32),
            },
        )
    for u in range(seg.unit_start, seg.unit_stop):
        st.mark_done(u)
    analysis.reduce(str(path), components=D)
    return np.ascontiguousarray(Store.open(str(path)).array("pca")[...], np.float32)


def exact_knn(X: np.ndarray, Q: np.ndarray, k: int):
    """Brute-force L2 neighbours (float64 distances from the float32 dot products)."""
    sq = (X.astype(np.float64) ** 2).sum(axis=1)
    out, times = [], []
    for q in Q:
        t = time.perf_counter()
        d2 = sq - 2 * (X @ q).astype(np.float64) + float(q.astype(np.float64) @ q)
        part = np.argpartition(d2, k)[:k]
        out.append(part[np.argsort(d2[part], kind="stable")])
        times.append(time.perf_counter() - t)
    return np.array(out), np.array(times)


def cli_end_to_end(path: Path, qrows, repeats: int = 5) -> dict:
    """``elodin similar`` as a user runs it: a fresh process per query (interpreter start-up,
    imports, opening the store, loading the index or scanning), the index and ``--exact``
    runs interleaved so both see the same machine load; medians in seconds."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    times: dict[str, list[float]] = {"index": [], "exact": []}
    for q in list(qrows)[:repeats]:
        for mode in ("index", "exact"):
            argv = [sys.executable, "-m", "pipeline.cli", "similar", str(path), "--cutout", str(q)]
            argv += ["-n", "10"] + (["--exact"] if mode == "exact" else [])
            t = time.perf_counter()
            subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL)
            times[mode].append(time.perf_counter() - t)
    return {m: float(np.median(v)) for m, v in times.items()}


def umap_with_and_without_graph(work: Path, gm, rows: int, scale: float, seed: int) -> dict:
    """UMAP of every row of one store, same run: first building its own k-NN (NN-descent),
    then handed the store's k-NN graph (``neighbors``, k = 20, from a flat index) as its
    precomputed k-NN; the graph's own time beside. One warm-up embed on a small sample first,
    so neither timed fit pays numba's compilation."""
    from pipeline import analysis
    from pipeline.analysis import index as nn
    from pipeline.store import Store

    path = work / f"umap-{rows}.zarr"
    make_store(path, gm, rows, scale, seed)
    analysis.embed(str(path), method="umap", sample_size=2000)  # compile numba's kernels
    t = time.perf_counter()
    analysis.embed(str(path), method="umap", sample_size=rows, n_neighbors=15)
    own = time.perf_counter() - t
    assert Store.open(str(path)).attrs["embedding"].get("precomputed_knn") is not True
    t = time.perf_counter()
    nn.build_index(str(path), kind="flat", progress=False)
    nn.neighbors(str(path), k=20, progress=False)
    graph = time.perf_counter() - t
    t = time.perf_counter()
    analysis.embed(str(path), method="umap", sample_size=rows, n_neighbors=15)
    pre = time.perf_counter() - t
    assert Store.open(str(path)).attrs["embedding"]["precomputed_knn"] is True
    return {"rows": rows, "umap_own_knn_s": own, "index_and_graph_s": graph, "umap_graph_s": pre}


def pct(t, p):
    return float(np.percentile(np.asarray(t) * 1e3, p))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--kinds", nargs="+", default=["flat", "ivfpq"])
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--graph", action="store_true", help="also the k-NN graph (k = 20)")
    ap.add_argument(
        "--umap", type=int, metavar="ROWS", help="also UMAP with and without the graph, ROWS rows"
    )
    ap.add_argument("--work", default="/tmp/elodin-sim")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from pipeline import analysis
    from pipeline.analysis import index as nn

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    gm, n_real, scale = real_structure(work, args.seed)
    print(
        f"structure: Gaussian mixture (16, full) on the PCA-32 of {n_real} real HDF fingerprints ({time.perf_counter() - t:.0f} s)"
    )
    path = work / f"sim-{args.rows}.zarr"
    t = time.perf_counter()
    X = make_store(path, gm, args.rows, scale, args.seed)
    print(f"store: {args.rows} rows x {D} in {time.perf_counter() - t:.0f} s")
    rng = np.random.default_rng(args.seed + 1)
    qrows = np.sort(rng.choice(args.rows, args.queries, replace=False))
    Q = X[qrows]
    truth, scan_t = exact_knn(X, Q, 11)
    truth = truth[:, 1:]  # each query row is its own nearest
    results = {
        "rows": args.rows,
        "exact_in_memory_ms": {"p50": pct(scan_t, 50), "p99": pct(scan_t, 99)},
    }
    print(
        f"baseline exact scan in memory (numpy): p50 {pct(scan_t, 50):.1f} ms, p99 {pct(scan_t, 99):.1f} ms per query"
    )
    t_ex = []
    for q in qrows[:5]:
        t = time.perf_counter()
        analysis.similar(str(path), cutout=int(q), n=10, exact=True)
        t_ex.append(time.perf_counter() - t)
    results["similar_exact_s"] = float(np.median(t_ex))
    print(
        f"baseline `similar --exact` (streams the store): median {np.median(t_ex):.2f} s per query (5 queries)"
    )

    for kind in args.kinds:
        t = time.perf_counter()
        res = nn.build_index(str(path), kind=kind, rebuild=True, progress=False)
        build = time.perf_counter() - t
        nn._CACHE.clear()
        t = time.perf_counter()
        model = nn.NeighborIndex.load(str(path))
        load = time.perf_counter() - t
        lat, found = [], []
        for q in Q:
            t = time.perf_counter()
            _, ids = model.kneighbors(q[None], 11)
            lat.append(time.perf_counter() - t)
            found.append(ids[0])
        found = np.array(found)
        # Drop the query row itself (it may tie with a duplicate and come second).
        hits = [
            len(np.intersect1d([i for i in f if i != r][:10], tr)) / 10
            for f, r, tr in zip(found, qrows, truth, strict=True)
        ]
        recall = float(np.mean(hits))
        nn._CACHE.clear()
        t_e2e = []
        for q in qrows[:5]:
            t = time.perf_counter()
            out = analysis.similar(str(path), cutout=int(q), n=10)
            t_e2e.append(time.perf_counter() - t)
            nn._CACHE.clear()  # each `elodin similar` is a new process: it loads the index
        assert out.meta["search"] == "index"
        cli = cli_end_to_end(path, qrows)
        row = {
            "kind": res.kind,
            "cli_index_s": cli["index"],
            "cli_exact_s": cli["exact"],
            "build_s": build,
            "bytes_per_vector": res.nbytes / res.n_rows,
            "load_s": load,
            "p50_ms": pct(lat, 50),
            "p99_ms": pct(lat, 99),
            "recall_at_10": recall,
            "similar_end_to_end_s": float(np.median(t_e2e)),
            "params": model.params_,
        }
        results[kind] = row
        print(
            f"{res.kind:>6}: build {build:.1f} s, {row['bytes_per_vector']:.0f} B/vector, load {load:.2f} s, "
            f"query p50 {row['p50_ms']:.2f} ms p99 {row['p99_ms']:.2f} ms, recall@10 {recall:.3f}; "
            f"`similar` end to end {row['similar_end_to_end_s']:.2f} s ({model.params_}); "
            f"`elodin similar` command {cli['index']:.2f} s, with --exact {cli['exact']:.2f} s"
        )
    if args.graph:
        t = time.perf_counter()
        g = nn.neighbors(str(path), k=20, progress=False)
        results["graph"] = {"kind": g.kind, "k": 20, "s": time.perf_counter() - t}
        print(f"k-NN graph (k = 20, {g.kind}): {time.perf_counter() - t:.0f} s")
    if args.umap:
        u = umap_with_and_without_graph(work, gm, args.umap, scale, args.seed)
        results["umap"] = u
        print(
            f"UMAP of {u['rows']} rows: {u['umap_own_knn_s']:.0f} s building its own k-NN, "
            f"{u['umap_graph_s']:.0f} s with the store's graph (index + graph {u['index_and_graph_s']:.0f} s)"
        )
    results["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"peak RSS {results['peak_rss_gb']:.2f} GB")
    print(json.dumps(results, default=str))


if __name__ == "__main__":
    main()
