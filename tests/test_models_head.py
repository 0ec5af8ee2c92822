"""The invariant head of ``elodin models adapt --method head``: its statistics, fit, views and
ONNX graph, each against a direct computation."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from pipeline.models import head


def _views(rng, n=300, signal=3, nuisance=5, views=4):
    """Features whose first ``signal`` dimensions tell cutouts apart and stay put across a
    cutout's views, and whose next ``nuisance`` ones spread cutouts as much but move as much
    between views of one cutout."""
    truth = rng.normal(size=(n, signal))
    dims = signal + nuisance
    out = []
    for _ in range(views):
        f = np.zeros((n, dims))
        f[:, :signal] = truth + 0.05 * rng.normal(size=(n, signal))
        f[:, signal:] = 3 * rng.normal(size=(n, nuisance))
        out.append(f)
    return np.stack(out), truth


def test_view_stats_equal_the_direct_covariances(rng):
    views, _ = _views(rng, n=50, views=3)
    stats = head.ViewStats(50, views.shape[2])
    for f in views:
        stats.add(f)
    mean, between, within = stats.covariances()
    per = views.mean(axis=0)
    np.testing.assert_allclose(mean, views.mean(axis=(0, 1)))
    np.testing.assert_allclose(between, np.cov(per.T, bias=True), atol=1e-12)
    spread = (views - per).reshape(-1, views.shape[2])
    np.testing.assert_allclose(within, spread.T @ spread / len(spread), atol=1e-12)
    with pytest.raises(ValueError, match="expected"):
        stats.add(views[0][:, :2])


def test_view_stats_resume_from_a_checkpoint(rng, tmp_path):
    views, _ = _views(rng, n=40, views=3)
    whole = head.ViewStats(40, views.shape[2])
    for f in views:
        whole.add(f)
    part = head.ViewStats(40, views.shape[2])
    part.add(views[0])
    part.save(tmp_path / "c.npz", {"base": "b"})
    again, meta = head.ViewStats.load(tmp_path / "c.npz")
    assert meta == {"base": "b"} and again.views == 1
    for f in views[1:]:
        again.add(f)
    for a, b in zip(whole.covariances(), again.covariances(), strict=True):
        np.testing.assert_allclose(a, b)
    from pipeline.errors import ModelError

    # Not a checkpoint, or one cut short (a disk filling up): one line naming it.
    whole_bytes = (tmp_path / "c.npz").read_bytes()
    for i, text in enumerate([b"not a checkpoint", whole_bytes[: len(whole_bytes) // 2]]):
        (tmp_path / f"bad{i}.npz").write_bytes(text)
        with pytest.raises(ModelError, match=f"bad{i}.npz: not a readable adapt checkpoint"):
            head.ViewStats.load(tmp_path / f"bad{i}.npz")


def test_the_head_keeps_what_views_agree_on(rng):
    views, truth = _views(rng)
    stats = head.ViewStats(views.shape[1], views.shape[2])
    for f in views:
        stats.add(f)
    mean, projection = head.fit_head(stats, dim=3, ridge=1e-3)
    assert projection.shape == (8, 3)
    # The kept directions lie in the signal's dimensions, not the nuisance's...
    weight = np.abs(projection)
    assert weight[3:].max() < 0.05 * weight[:3].max()
    # ...and carry the signal: a linear map of the head's output gives it back.
    z = (views[0] - mean) @ projection
    fit, *_ = np.linalg.lstsq(np.c_[z, np.ones(len(z))], truth, rcond=None)
    residual = truth - np.c_[z, np.ones(len(z))] @ fit
    assert residual.std() < 0.1 * truth.std()
    # Unit spread of a cutout's views along each kept direction (the ridge included).
    _, _, within = stats.covariances()
    within += 1e-3 * np.trace(within) / len(within) * np.eye(len(within))
    np.testing.assert_allclose(np.diag(projection.T @ within @ projection), 1, rtol=1e-6)
    # The same data give the same head, signs included.
    np.testing.assert_array_equal(head.fit_head(stats, dim=3, ridge=1e-3)[1], projection)


def test_the_head_keeps_no_more_directions_than_cutouts_spread_in(rng):
    from pipeline.errors import InputError

    views, _ = _views(rng, n=5)
    stats = head.ViewStats(5, views.shape[2])
    for f in views:
        stats.add(f)
    origin, projection = head.fit_head(stats, dim=64, ridge=0.1)
    assert projection.shape == (8, 4)  # 5 cutouts spread in 4 directions at most
    np.testing.assert_allclose(origin, views[0].mean(axis=0))  # centred on the cutouts as they are
    # Views that never differ from their cutout leave nothing to fit: one line, no traceback.
    same = head.ViewStats(5, 8)
    for _ in range(3):
        same.add(views[0])
    with pytest.raises(InputError, match="views of the cutouts do not differ"):
        head.fit_head(same, dim=4, ridge=0.1)


def test_augment_moves_scales_and_adds_noise_about_the_sky(rng):
    raw = rng.normal(10.0, 1.0, size=(64, 2, 32, 32)).astype(np.float32)
    raw[:, :, 16, 16] += 500.0  # a point source in the middle, in both bands
    raw[0, :, 0, 0] = np.nan  # a masked pixel
    views = head.augment(raw, np.random.default_rng(1))
    assert views.shape == raw.shape and views.dtype == np.float32
    np.testing.assert_array_equal(views, head.augment(raw, np.random.default_rng(1)))
    # The sky stays where it was (10); the source moves by at most SHIFT pixels and its flux
    # above the sky changes within FLUX (blurred views spread it; summed over a box it stays).
    assert np.abs(np.nanmedian(views, axis=(2, 3)) - 10.0).max() < 0.5
    box = views[:, :, 16 - 6 : 17 + 6, 16 - 6 : 17 + 6] - 10.0
    flux = box.sum(axis=(2, 3)) / 500.0
    assert flux.min() > head.FLUX[0] * 0.8 and flux.max() < head.FLUX[1] * 1.2
    assert flux.max() / flux.min() > 2  # the fluxes do vary
    peaks = [np.unravel_index(np.argmax(v[0]), v[0].shape) for v in views[1:]]
    assert max(max(abs(y - 16), abs(x - 16)) for y, x in peaks) <= head.SHIFT
    assert len(set(peaks)) > 1
    # Fresh noise of about the cutout's own level on top: the sky's spread grows.
    sky = views[:, :, :8, 20:]
    assert 1.2 < np.nanstd(sky) < 2.0 * head.NOISE + 0.5
    # The masked pixel stays masked, moved with its cutout; a band masked whole stays so.
    assert np.isnan(views[0]).sum() == 2 and not np.isnan(views[1:]).any()
    raw[1, 1] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        masked = head.augment(raw[:2], np.random.default_rng(2))
    assert np.isnan(masked[1, 1]).all() and np.isfinite(masked[1, 0]).all()


def test_append_head_projects_the_features_and_keeps_the_rest(tmp_path, model_cache, rng):
    import onnx
    import onnxruntime as ort

    from pipeline.models import resolve
    from pipeline.models.export import ORIENTATIONS_METADATA, ensure_onnx

    base = ensure_onnx(resolve("efficientnet-lite0:native:rot4"))
    mean = rng.normal(size=1280).astype(np.float32)
    projection = rng.normal(size=(1280, 7)).astype(np.float32)
    out = tmp_path / "head.onnx"
    head.append_head(base, mean, projection, out)
    batch = rng.random((3, 3, 64, 64), dtype=np.float32)

    def run(path):
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        return dict(zip(names, sess.run(None, {"input": batch}), strict=True))

    before, after = run(base), run(out)
    np.testing.assert_allclose(
        after["features"], (before["features"] - mean) @ projection, rtol=1e-4, atol=1e-3
    )
    for name in ("logits", "top_class", "top_prob"):
        np.testing.assert_array_equal(after[name], before[name])
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta[ORIENTATIONS_METADATA] == "4"
