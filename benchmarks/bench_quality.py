"""Do fingerprints group what an astronomer would group? Simulated morphology and the real HDF.

Simulated (GalSim, the survey image simulator used by LSST DESC): 64 x 64 stamps at 0.2"/px,
convolved with a Kolmogorov PSF (FWHM 0.6-1.0") and with Gaussian sky noise (sigma 1, sky
subtracted), sizes and fluxes spread (log-uniform fluxes: faint to bright), random position
angles and sub-pixel offsets. Two class sets (``--classes``):

- ``issue`` (the default): the five classes the issue names, ``star``, ``disc``, ``spheroid``,
  ``clumpy``, ``blank``, with discs at all inclinations;
- ``hard``: seven, adding ``edge-on`` and ``merger``; discs are then 0-78 degrees. Two of its
  classes overlap physically (a disc at 78 degrees and an edge-on one at 80 look alike through
  the PSF; a merger 0.6" apart at flux ratio 4 looks like one galaxy), so its ceiling is low:
  the ``probe`` column (a supervised linear classifier) stays at 0.70-0.80 for every recipe.

The classes:

- ``star``: a point source;
- ``disc``: an exponential disc of thickness 0.1 at an inclination drawn for random orientations
  (cos i uniform in [0, 1]; in ``hard``, [0.2, 1]: face-on to 78 degrees);
- ``edge-on``: the same disc seen within 10 degrees of edge-on (80-90 degrees);
- ``spheroid``: a de Vaucouleurs profile, axis ratio 0.6-1;
- ``clumpy``: star-forming knots (GalSim RandomKnots, 5-40 of them) on a faint disc;
- ``merger``: two galaxies (discs or spheroids) 0.6-2" apart, flux ratio 1-4;
- ``blank``: sky noise only.

Every stamp goes through Elodin's own path: :func:`pipeline.preprocess.stretch_cutouts` (limits per
image: the benchmark's stamps are one survey image, sampled with
:func:`pipeline.preprocess.image_limits_for`; or per cutout) and the ONNX Runtime session of
:mod:`pipeline.models.runtime` on the exported graph of each recipe. Each recipe's features, like
the baseline (the asinh-stretched pixels themselves), are reduced to their first 20 PCA components
as ``elodin reduce`` would: standardised first where its ``analysis.reduce.scale`` (``auto`` by
default: :func:`pipeline.analysis.reduce.scales_features`) says so, the ``std`` column; a recipe's
``|pca-scale=true`` or ``|pca-scale=false`` overrides it. On those the benchmark reports

- k-NN (k = 10) balanced accuracy, 5-fold stratified cross-validated;
- k-means (k = number of classes) adjusted Rand index against the classes;
- ``probe``: what the features hold, for reference: the balanced accuracy of a supervised
  linear classifier (logistic regression on 100 standardised PCA components, 5-fold
  cross-validated). The fingerprints are never trained on labels; this only bounds what a
  distance on them could find;

and, on the real Hubble Deep Field (scikit-image's), the balanced accuracy of telling 64 x 64
windows centred on detected sources from windows of blank sky (photutils segmentation).

    .venv/bin/python benchmarks/bench_quality.py --quick          # ~2 min on an idle 2-core box
    .venv/bin/python benchmarks/bench_quality.py                  # every recipe, 150 per class
    .venv/bin/python benchmarks/bench_quality.py --recipes pixels efficientnet-lite0:native:stages:zoom3:rot4
    .venv/bin/python benchmarks/bench_quality.py --seed 1 ...    # another draw of the stamps
    .venv/bin/python benchmarks/bench_quality.py --recipes pixels --adapt 5   # + `models adapt`

``--adapt EPOCHS`` adds a row per adapted encoder: the stamps laid out as one FITS mosaic,
``elodin models adapt``'s code on it (``--adapt-method head`` by default, from
:data:`ADAPT_BASES` or ``--adapt-base NAME ...``), the exported model through the user-model
path, scored like every recipe.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

SIDE = 64
SCALE = 0.2  # arcsec / pixel
CLASS_SETS = {
    "issue": ("star", "disc", "spheroid", "clumpy", "blank"),
    "hard": ("star", "disc", "edge-on", "spheroid", "clumpy", "merger", "blank"),
}
CLASSES = CLASS_SETS["issue"]
PCA_COMPONENTS = 20
KNN_K = 10

# Recipes: "pixels" (the baseline) or a model name, optionally "|key=value,..." preprocess
# overrides (e.g. "efficientnet-lite0|scope=cutout").
# What `--adapt` adapts with each method: the head keeps the encoder, so it can start from the
# best ImageNet features; SimSiam fine-tunes a plain network.
ADAPT_BASES = {
    "head": "efficientnet-lite0:native:stages:zoom3:rot4",
    "simsiam": "efficientnet-lite0:native",
}
QUICK_RECIPES = (
    "pixels",
    "efficientnet-lite0",
    "efficientnet-lite0:rot8",
    "efficientnet-lite0:native",
    "efficientnet-lite0:native:rot8",
    "efficientnet-lite0:native:multi",
    "efficientnet-lite0:native:multi:rot8",
    "efficientnet-lite0:native:stages:zoom3:rot4",
    "efficientnet-lite0:native|scope=cutout",
    "efficientnet-lite0:native|asinh-a=1.0",
)
FULL_RECIPES = (
    "pixels",
    "pixels|scope=cutout",
    "efficientnet-lite0",
    "efficientnet-lite0:rot8",
    "efficientnet-lite0:multi",
    "efficientnet-lite0|scope=cutout",
    "efficientnet-lite0|asinh-a=1.0",
    "efficientnet-lite0:native",
    "efficientnet-lite0:native:rot4",
    "efficientnet-lite0:native:rot8",
    "efficientnet-lite0:native:multi",
    "efficientnet-lite0:native:multi:rot8",
    "efficientnet-lite0:multi:rot8",
    "efficientnet-lite0:native:zoom3:rot8",
    "efficientnet-lite0:native:multi:zoom3:rot4",
    "efficientnet-lite0:native:multi:zoom3:rot8",
    "efficientnet-lite0:native:stages:zoom3:rot4",
    "efficientnet-lite0:native:stages:zoom3:rot4|pca-scale=false",
    "efficientnet-lite0:native:stages:zoom3:rot8",
    "efficientnet-lite0:native:rot8|pca-scale=true",
    "pixels|pca-scale=true",
    "efficientnet-lite0:native:rot8|scope=cutout",
    "efficientnet-lite0:native:rot8|asinh-a=0.02",
    "efficientnet-lite0:native:rot8|asinh-a=1.0",
)


# ------------------------------------------------------------------------------ simulation
def _galaxy(kind: str, flux: float, ud, gd, *, edge_on_apart: bool = False):
    """One GalSim profile of a galaxy class, before the PSF."""
    import galsim

    angle = ud() * 180.0 * galsim.degrees
    if kind in ("disc", "edge-on"):
        # Random orientations: cos i uniform. Where edge-on discs are a class of their own,
        # discs stop at 78 degrees and edge-on ones are 80-90.
        if kind == "edge-on":
            cos_i = np.sin(np.radians(10.0)) * ud()
        else:
            cos_i = 0.2 + 0.8 * ud() if edge_on_apart else ud()
        prof = galsim.InclinedExponential(
            inclination=np.arccos(cos_i) * galsim.radians,
            half_light_radius=0.4 + 1.2 * ud(),
            scale_h_over_r=0.1,
            flux=flux,
        )
    elif kind == "spheroid":
        prof = galsim.DeVaucouleurs(half_light_radius=0.3 + 0.9 * ud(), flux=flux)
        prof = prof.shear(q=0.6 + 0.4 * ud(), beta=0 * galsim.degrees)
    elif kind == "clumpy":
        hlr = 0.6 + 1.0 * ud()
        knots = galsim.RandomKnots(npoints=5 + int(36 * ud()), half_light_radius=hlr, rng=gd)
        knots = knots.withFlux(0.7 * flux)
        prof = knots + galsim.Exponential(half_light_radius=hlr, flux=0.3 * flux)
    else:
        raise ValueError(kind)
    return prof.rotate(angle)


def simulate(
    per_class: int, seed: int = 0, classes: Sequence[str] = CLASSES
) -> tuple[np.ndarray, np.ndarray]:
    """``(stamps (n, 64, 64) float32, labels (n,) int)``: ``per_class`` of each of ``classes``
    (labels index into it)."""
    import galsim

    apart = "edge-on" in classes
    stamps, labels = [], []
    for label, kind in enumerate(classes):
        for i in range(per_class):
            rng = galsim.BaseDeviate(seed * 1_000_003 + label * 10_007 + i + 1)
            ud, gd = galsim.UniformDeviate(rng), rng
            psf = galsim.Kolmogorov(fwhm=0.6 + 0.4 * ud())
            image = galsim.ImageF(SIDE, SIDE, scale=SCALE)
            if kind != "blank":
                # Total fluxes log-uniform: S/N from a few tens (faint) to a few thousand.
                flux = float(10 ** (2.4 + 1.6 * ud()))
                if kind == "star":
                    prof = galsim.DeltaFunction(flux=flux)
                elif kind == "merger":
                    ratio = 1.0 + 3.0 * ud()
                    a, b = ("disc", "spheroid")[int(2 * ud())], ("disc", "spheroid")[int(2 * ud())]
                    sep, theta = 0.6 + 1.4 * ud(), 2 * np.pi * ud()
                    dx, dy = sep * np.cos(theta) / 2, sep * np.sin(theta) / 2
                    one = _galaxy(a, flux * ratio / (1 + ratio), ud, gd, edge_on_apart=apart)
                    two = _galaxy(b, flux / (1 + ratio), ud, gd, edge_on_apart=apart)
                    prof = one.shift(dx, dy) + two.shift(-dx, -dy)
                else:
                    prof = _galaxy(kind, flux, ud, gd, edge_on_apart=apart)
                offset = (ud() - 0.5, ud() - 0.5)
                galsim.Convolve(prof, psf).drawImage(image, offset=offset, method="auto")
            image.addNoise(galsim.GaussianNoise(rng, sigma=1.0))
            stamps.append(image.array.astype(np.float32))
            labels.append(label)
    return np.stack(stamps), np.asarray(labels)


# ------------------------------------------------------------------------------ HDF windows
def hdf_windows(per_class: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(windows (n, 3, 64, 64), labels, image)`` of the real HDF: 1 = centred on a detected source,
    0 = blank sky (no segmented pixel in the window)."""
    from astropy.convolution import convolve
    from photutils.segmentation import detect_sources, make_2dgaussian_kernel
    from skimage import data

    hdf = np.moveaxis(data.hubble_deep_field().astype(np.float32), -1, 0)  # (3, 872, 1000)
    lum = hdf.mean(axis=0)
    sky = np.median(lum)
    rms = 1.4826 * np.median(np.abs(lum - sky))
    smooth = convolve(lum - sky, make_2dgaussian_kernel(3.0, size=5))
    segm = detect_sources(smooth, 3.0 * rms, 20)  # npixels, positional across photutils versions
    h, w = lum.shape
    half = SIDE // 2
    sources = []
    for y, x in (
        np.asarray(
            [[s.bbox.iymin + s.bbox.iymax, s.bbox.ixmin + s.bbox.ixmax] for s in segm.segments]
        )
        // 2
    ):
        if half <= y <= h - half and half <= x <= w - half:
            sources.append((y - half, x - half))
    occupied = segm.data > 0
    rng = np.random.default_rng(seed)
    blanks, tries = [], 0
    while len(blanks) < len(sources) and tries < 200_000:
        tries += 1
        y, x = int(rng.integers(0, h - SIDE)), int(rng.integers(0, w - SIDE))
        if not occupied[y : y + SIDE, x : x + SIDE].any():
            blanks.append((y, x))
    keep = min(per_class, len(sources), len(blanks))
    picks = [sources[i] for i in rng.choice(len(sources), keep, replace=False)]
    picks += blanks[:keep]
    windows = np.stack([hdf[:, y : y + SIDE, x : x + SIDE] for y, x in picks])
    return windows, np.repeat([1, 0], keep), hdf


# ------------------------------------------------------------------------------ fingerprints
def pca_scale(recipe: str) -> bool:
    """Whether ``elodin reduce`` would standardise this recipe's features (``|pca-scale=`` or
    the ``analysis.reduce.scale`` setting)."""
    from pipeline import config
    from pipeline.analysis.reduce import scales_features

    name, overrides = _parse(recipe)
    setting = overrides.get("pca-scale", config.get("analysis.reduce.scale"))
    return scales_features(
        setting,
        features="pixels" if name == "pixels" else "fingerprint",
        model=None if name == "pixels" else name,
    )


def _parse(recipe: str) -> tuple[str, dict]:
    name, _, rest = recipe.partition("|")
    overrides = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        try:
            overrides[key] = float(value)
        except ValueError:
            overrides[key] = value
    return name, overrides


def stretched(raw: np.ndarray, overrides: dict, image_sample: np.ndarray) -> np.ndarray:
    """Raw (n, bands, h, w) to model input through :func:`pipeline.preprocess.stretch_cutouts`."""
    from pipeline.preprocess import image_limits_for, preprocess_settings, stretch_cutouts

    settings = preprocess_settings(overrides)
    limits = image_limits_for(image_sample, overrides) if settings["scope"] == "image" else None
    rgb, _ = stretch_cutouts(raw, config=overrides, image_limits=limits)
    return rgb


def features(
    recipe: str, raw: np.ndarray, image_sample, *, threads: int
) -> tuple[np.ndarray, float]:
    """``(features, cutouts per second of the model alone)`` of one recipe."""
    from pipeline.models import get_session, resolve
    from pipeline.models.export import ensure_onnx

    name, overrides = _parse(recipe)
    overrides.pop("pca-scale", None)
    rgb = stretched(raw, overrides, image_sample)
    if name == "pixels":
        # One channel is enough: one band was replicated to RGB (three for the HDF).
        return rgb[:, : (3 if raw.shape[1] == 3 else 1)].reshape(len(rgb), -1), float("nan")
    session = get_session(ensure_onnx(resolve(name)), threads=threads)
    session.infer(rgb[:8])  # warm-up: allocations and kernel choice
    start = time.perf_counter()
    out = session.infer_batched(rgb, 64)
    return out.features, len(rgb) / (time.perf_counter() - start)


def scores(
    feats: np.ndarray, labels: np.ndarray, *, seed: int = 0, scale: bool = False
) -> tuple[float, float]:
    """``(k-NN balanced accuracy, k-means ARI)`` on the first PCA_COMPONENTS components (of the
    standardised features with ``scale``, as ``elodin reduce`` standardises)."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA
    from sklearn.metrics import adjusted_rand_score, balanced_accuracy_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.neighbors import KNeighborsClassifier

    from pipeline.analysis.reduce import feature_scale

    x = np.asarray(feats, np.float64)
    if scale:
        mean = x.mean(axis=0)
        x = (x - mean) / feature_scale(x.var(axis=0, ddof=1), mean, len(x))
    x = PCA(min(PCA_COMPONENTS, *feats.shape), random_state=seed).fit_transform(x)
    folds = StratifiedKFold(5, shuffle=True, random_state=seed)
    knn = KNeighborsClassifier(min(KNN_K, len(x) * 4 // 5 - 1))
    predicted = cross_val_predict(knn, x, labels, cv=folds)
    bacc = balanced_accuracy_score(labels, predicted)
    groups = KMeans(len(np.unique(labels)), n_init=10, random_state=seed).fit_predict(x)
    return float(bacc), float(adjusted_rand_score(labels, groups))


def probe(feats: np.ndarray, labels: np.ndarray, *, seed: int = 0) -> float:
    """Balanced accuracy of a supervised linear classifier on the features, 5-fold
    cross-validated: what they hold, beside what a distance on them finds."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.asarray(feats, np.float64)
    folds = StratifiedKFold(5, shuffle=True, random_state=seed)
    n_components = min(100, len(x) * 4 // 5 - 1, x.shape[1])
    linear = make_pipeline(
        StandardScaler(),
        PCA(n_components, random_state=seed),
        LogisticRegression(C=0.1, max_iter=2000),
    )
    return float(balanced_accuracy_score(labels, cross_val_predict(linear, x, labels, cv=folds)))


def run(
    recipes: Sequence[str],
    per_class: int,
    hdf_per_class: int,
    threads: int,
    classes: Sequence[str] = CLASSES,
    *,
    seed: int = 0,
) -> list[dict]:
    """Every recipe on the simulated classes and the HDF, one row each."""
    from tqdm import tqdm

    start = time.perf_counter()
    raw, labels = simulate(per_class, seed, classes=classes)
    print(f"# simulated {len(raw)} stamps in {time.perf_counter() - start:.1f} s", flush=True)
    sim = raw[:, None]
    # The stamps are one survey image: its limits are measured on a sample of all its pixels.
    sim_sample = raw.reshape(1, -1)[:, :: max(1, raw.size // 200_000)]
    windows, hdf_labels, hdf = hdf_windows(hdf_per_class)
    hdf_sample = hdf.reshape(3, -1)[:, ::7]
    print(f"# HDF: {len(windows)} windows (sources and blank sky, half each)", flush=True)
    rows = []
    for recipe in tqdm(recipes, desc="recipes", unit="recipe"):
        feats, rate = features(recipe, sim, sim_sample, threads=threads)
        scale = pca_scale(recipe)
        bacc, ari = scores(feats, labels, scale=scale)
        hdf_feats, _ = features(recipe, windows, hdf_sample, threads=threads)
        hdf_bacc, _ = scores(hdf_feats, hdf_labels, scale=scale)
        rows.append(
            {
                "recipe": recipe,
                "dim": feats.shape[1],
                "scale": scale,
                "bacc": bacc,
                "ari": ari,
                "probe": probe(feats, labels),
                "hdf": hdf_bacc,
                "rate": rate,
            }
        )
        tqdm.write(_row(rows[-1]))
    return rows


def adapted_row(
    epochs: int,
    per_class: int,
    hdf_per_class: int,
    threads: int,
    classes: Sequence[str] = CLASSES,
    *,
    method: str = "head",
    base: str | None = None,
    seed: int = 0,
) -> dict:
    """Adapt ``base`` (default: :data:`ADAPT_BASES` of ``method``) on the benchmark's own
    unlabelled stamps with ``elodin models adapt``'s code, then score it like a recipe.

    The stamps are laid out as one FITS mosaic, which the default sliding 64 x 64 windows cut
    back into exactly the stamps.
    """
    import tempfile

    import dask.config
    from astropy.io import fits

    from pipeline.models import resolve
    from pipeline.models.adapt import adapt
    from pipeline.models.export import ensure_onnx

    base = base or ADAPT_BASES[method]
    raw, labels = simulate(per_class, seed, classes=classes)
    cols = int(np.ceil(np.sqrt(len(raw))))
    rows = int(np.ceil(len(raw) / cols))
    mosaic = np.zeros((rows * SIDE, cols * SIDE), np.float32)
    rng = np.random.default_rng(1)
    mosaic[:] = rng.normal(size=mosaic.shape)  # unused grid cells: sky noise
    for i, stamp in enumerate(raw):
        r, c = divmod(i, cols)
        mosaic[r * SIDE : (r + 1) * SIDE, c * SIDE : (c + 1) * SIDE] = stamp
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "stamps.fits"
        fits.PrimaryHDU(mosaic).writeto(path)
        with dask.config.set(
            {"elodin.cache-dir": tmp, "elodin.model.adapt.max-cutouts": len(raw) + cols}
        ):
            # The base exported before the clock starts: adapting does not time an export.
            ensure_onnx(resolve(base))
            start = time.perf_counter()
            adapt(base, [str(path)], "bench-adapted", method=method, epochs=epochs)
            took = time.perf_counter() - start
            recipe = "bench-adapted"
            sim_sample = raw.reshape(1, -1)[:, :: max(1, raw.size // 200_000)]
            feats, rate = features(recipe, raw[:, None], sim_sample, threads=threads)
            scale = pca_scale(recipe)  # a user model: as `reduce` would on its store
            bacc, ari = scores(feats, labels, scale=scale)
            linear = probe(feats, labels)
            windows, hdf_labels, hdf = hdf_windows(hdf_per_class)
            hdf_feats, _ = features(recipe, windows, hdf.reshape(3, -1)[:, ::7], threads=threads)
            hdf_bacc, _ = scores(hdf_feats, hdf_labels, scale=scale)
    short = base.replace("efficientnet-", "")
    name = f"adapted {short}, {method} {epochs} ep ({took / 60:.1f} min)"
    return {
        "recipe": name,
        "dim": feats.shape[1],
        "scale": scale,
        "bacc": bacc,
        "ari": ari,
        "probe": linear,
        "hdf": hdf_bacc,
        "rate": rate,
    }


def _row(r: dict) -> str:
    rate = "-" if np.isnan(r["rate"]) else f"{r['rate']:.0f}"
    return (
        f"{r['recipe']:<48} {r['dim']:>5} {'yes' if r['scale'] else 'no':>4} {r['bacc']:>6.3f} {r['ari']:>6.3f} "
        f"{r['probe']:>6.3f} {r['hdf']:>6.3f} {rate:>9}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="40 stamps per class, fewer recipes")
    ap.add_argument("--per-class", type=int, default=None, help="stamps per class (default 150)")
    ap.add_argument("--hdf-per-class", type=int, default=None, help="HDF windows per class")
    ap.add_argument("--recipes", nargs="+", default=None)
    ap.add_argument(
        "--classes",
        choices=sorted(CLASS_SETS),
        default="issue",
        help="issue: the five classes of the issue (default); hard: seven, with edge-on discs "
        "and mergers",
    )
    ap.add_argument(
        "--seed",
        type=int,
        default=0,
        help="another draw of the stamps (0: the one whose figures are in the docs)",
    )
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument(
        "--adapt",
        type=int,
        default=0,
        metavar="EPOCHS",
        help="also adapt a base on the unlabelled stamps for EPOCHS and score it",
    )
    ap.add_argument("--adapt-method", choices=sorted(ADAPT_BASES), default="head")
    ap.add_argument(
        "--adapt-base",
        nargs="+",
        default=None,
        help="bases to adapt, a row each (default: by method, ADAPT_BASES)",
    )
    args = ap.parse_args()
    per_class = args.per_class or (40 if args.quick else 150)
    hdf_per_class = args.hdf_per_class or (60 if args.quick else 150)
    recipes = args.recipes or (QUICK_RECIPES if args.quick else FULL_RECIPES)
    from pipeline.models.runtime import default_threads

    threads = args.threads or default_threads()
    classes = CLASS_SETS[args.classes]
    load = os.getloadavg()[0]
    print(
        f"# {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, {platform.machine()}, "
        f"{threads} threads, load average {load:.1f} on {os.cpu_count()} cores"
    )
    print(
        f"# {args.classes}: {', '.join(classes)} x {per_class} stamps (seed {args.seed}); k-NN (k={KNN_K}) "
        f"balanced accuracy, 5-fold CV, and k-means ARI on {PCA_COMPONENTS} PCA components "
        "(std: of the standardised features, as `elodin reduce` would); probe: a supervised "
        "linear classifier's balanced accuracy; HDF source vs blank"
    )
    print(
        f"{'recipe':<48} {'dim':>5} {'std':>4} {'b-acc':>6} {'ARI':>6} {'probe':>6} {'HDF':>6} "
        f"{'cutouts/s':>9}"
    )
    start = time.perf_counter()
    rows = (
        run(recipes, per_class, hdf_per_class, threads, classes, seed=args.seed)
        if recipes != ["none"]
        else []
    )
    for base in (args.adapt_base or [ADAPT_BASES[args.adapt_method]]) if args.adapt else []:
        rows.append(
            adapted_row(
                args.adapt,
                per_class,
                hdf_per_class,
                threads,
                classes,
                method=args.adapt_method,
                base=base,
                seed=args.seed,
            )
        )
        print(_row(rows[-1]), flush=True)
    print(f"# {time.perf_counter() - start:.0f} s; load average now {os.getloadavg()[0]:.1f}")
    base = next((r for r in rows if r["recipe"] == "pixels"), None)
    if base is not None:
        best = max(
            (r for r in rows if not r["recipe"].startswith("pixels")),
            key=lambda r: r["bacc"],
            default=None,
        )
        if best is not None:
            print(
                f"# best: {best['recipe']}: b-acc {best['bacc'] - base['bacc']:+.3f}, "
                f"ARI {best['ari'] - base['ari']:+.3f} against pixels"
            )


if __name__ == "__main__":
    main()
