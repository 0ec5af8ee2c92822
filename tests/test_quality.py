"""Fingerprint quality: the invariance setting end to end, and the morphology benchmark's parts."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import dask.config
import numpy as np
import pytest

from pipeline.errors import StoreError
from pipeline.fingerprint import fingerprint
from pipeline.store import Store
from pipeline.testing import store_digest, synthetic_mosaic

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "method": "sliding",
    "size": 64,
    "stride": 64,
    "tile_size": 256,
    "chunk_rows": 16,
    "model": "efficientnet-lite0:native",
}


def _bench():
    spec = importlib.util.spec_from_file_location(
        "bench_quality", ROOT / "benchmarks" / "bench_quality.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_quality"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def client():
    from pipeline.testing import local_compute

    with local_compute(n_workers=1) as c:
        yield c


def test_invariance_is_recorded_and_a_store_refuses_another(tmp_path, client, model_cache):
    from pipeline.models import get_session, resolve
    from pipeline.models.export import ensure_onnx
    from pipeline.preprocess import image_limits_for, stretch_cutouts
    from pipeline.sources import open_sources

    mosaic = synthetic_mosaic(tmp_path / "field.fits", shape=(192, 192), seed=4, n_sources=6)
    out = tmp_path / "rot8.zarr"
    with dask.config.set({"elodin.model.invariance": 8}):
        fingerprint([mosaic], out, client=client, progress=False, **SETTINGS)
    store = Store.open(out)
    assert store.attrs["model"] == "efficientnet-lite0:native:rot8"
    # The stored rows are the invariant model's: a cutout's fingerprint is that of its rotation.
    ds = store.dataset().load()
    row = int(np.flatnonzero(ds.valid.values)[4])
    x0, y0 = int(ds.x.values[row] - 31.5), int(ds.y.values[row] - 31.5)
    from astropy.io import fits

    cut = fits.getdata(mosaic).astype(np.float32)[y0 : y0 + 64, x0 : x0 + 64]
    src = open_sources([mosaic])[0]
    rgb, _ = stretch_cutouts(np.rot90(cut)[None, None].copy(), image_limits=image_limits_for(src))
    sess = get_session(ensure_onnx(resolve("efficientnet-lite0:native:rot8"), cache=model_cache))
    np.testing.assert_allclose(ds.fingerprint.values[row], sess.infer(rgb).features[0], atol=1e-4)

    before = store_digest(out)
    other = synthetic_mosaic(tmp_path / "other.fits", shape=(192, 192), seed=5, n_sources=6)
    with pytest.raises(StoreError, match="made with model"):
        fingerprint([other], out, client=client, progress=False, **SETTINGS)  # invariance none
    with (
        dask.config.set({"elodin.model.invariance": 4}),
        pytest.raises(StoreError, match="made with model"),
    ):
        fingerprint([other], out, client=client, progress=False, **SETTINGS)
    assert store_digest(out) == before


def test_simulated_classes_look_like_their_class():
    bench = _bench()
    stamps, labels = bench.simulate(4, seed=1)
    assert stamps.shape == (4 * len(bench.CLASSES), 64, 64) and stamps.dtype == np.float32
    assert np.bincount(labels).tolist() == [4] * len(bench.CLASSES)
    total = stamps.sum(axis=(1, 2))
    blank = labels == bench.CLASSES.index("blank")
    # Blank sky is unit Gaussian noise (its sum over 64^2 pixels has sigma 64); every other
    # stamp holds a source's flux (log-uniform from 250) above it.
    assert np.allclose(stamps[blank].std(axis=(1, 2)), 1.0, atol=0.05)
    assert np.abs(total[blank]).max() < 3 * 64 and total[~blank].min() > 2 * 64
    # Same seed, same stamps: the benchmark's figures are reproducible.
    np.testing.assert_array_equal(bench.simulate(4, seed=1)[0], stamps)
    # The default set is the five; the hard one adds edge-on discs and mergers, and its
    # stamps of the classes both sets share are those of the earlier seven-class benchmark.
    assert bench.CLASSES == ("star", "disc", "spheroid", "clumpy", "blank")
    hard = bench.CLASS_SETS["hard"]
    hard_stamps, hard_labels = bench.simulate(2, seed=1, classes=hard)
    assert np.bincount(hard_labels).tolist() == [2] * 7
    star = bench.CLASSES.index("star")
    np.testing.assert_array_equal(hard_stamps[hard_labels == 0], stamps[labels == star][:2])


def test_scores_rank_separable_above_random(rng):
    bench = _bench()
    labels = np.repeat(np.arange(3), 30)
    separable = rng.normal(size=(90, 30)) + 8.0 * np.eye(3, 30)[labels]
    good = bench.scores(separable, labels)
    bad = bench.scores(rng.normal(size=(90, 30)), labels)
    assert good[0] > 0.95 and good[1] > 0.9
    assert bad[0] < 0.6 and bad[1] < 0.2
    # The supervised probe: near 1 where a linear boundary exists, near chance where none does.
    assert (
        bench.probe(separable, labels) > 0.95
        and bench.probe(rng.normal(size=(90, 30)), labels) < 0.6
    )


def test_benchmark_runs_through_the_real_model(model_cache, capsys):
    bench = _bench()
    rows = bench.run(
        ["pixels", "efficientnet-lite0:native"], per_class=6, hdf_per_class=10, threads=1
    )
    assert [r["recipe"] for r in rows] == ["pixels", "efficientnet-lite0:native"]
    assert rows[0]["dim"] == 64 * 64 and rows[1]["dim"] == 1280
    for r in rows:
        assert 0.0 <= r["bacc"] <= 1.0 and -1.0 <= r["ari"] <= 1.0 and 0.0 <= r["hdf"] <= 1.0
    assert rows[1]["rate"] > 0


def test_benchmark_adapted_head_groups_better_than_its_base(model_cache):
    # The benchmark's --adapt path on a small set: the stamps as a FITS mosaic, `models adapt`
    # (method head), the exported model through the user-model path. The head is fitted on the
    # same unlabelled stamps; its k-NN balanced accuracy must beat the frozen base's.
    bench = _bench()
    base = "efficientnet-lite0:native"
    plain = bench.run([base], per_class=30, hdf_per_class=10, threads=2)[0]
    adapted = bench.adapted_row(3, 30, 10, 2, base=base)
    assert adapted["dim"] == 64 and adapted["recipe"].startswith("adapted lite0:native, head 3")
    assert adapted["bacc"] > plain["bacc"] + 0.02, (adapted, plain)


# ------------------------------------------------------------------------ elodin models adapt
def _cli(*args: str, cache: Path):
    import os
    import subprocess

    env = {**os.environ, "ELODIN__CACHE_DIR": str(cache)}
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, env=env
    )


@pytest.fixture(scope="module")
def field(tmp_path_factory) -> Path:
    # 256^2 in 64-pixel windows at stride 16: 13 x 13 = 169 training cutouts.
    return synthetic_mosaic(
        tmp_path_factory.mktemp("adapt") / "field.fits", shape=(256, 256), seed=7, n_sources=12
    )


def test_adapt_trains_exports_and_fingerprints_like_a_builtin(field, tmp_path, client, model_cache):
    import onnxruntime as ort
    import torch

    from pipeline.models import get_session, resolve
    from pipeline.models.adapt import adapt
    from pipeline.models.export import ensure_onnx

    cache = tmp_path / "cache"

    def simsiam(epochs: int) -> Path:
        with dask.config.set({"elodin.cutouts.stride": 16, "elodin.model.adapt.batch-size": 32}):
            return adapt(
                "efficientnet-lite0:native",
                [str(field)],
                "mine",
                method="simsiam",
                epochs=epochs,
                cache=cache,
                progress=False,
            )

    card_path = simsiam(1)
    assert card_path == cache / "adapted" / "mine.yaml"
    assert torch.load(card_path.with_suffix(".ckpt"), weights_only=True)["epoch"] == 1
    with dask.config.set({"elodin.cache-dir": str(cache)}):
        card = resolve("mine")  # by its name, from the model cache
        assert (card.name, card.builtin, card.resolution) == ("mine", False, "native")
        path = ensure_onnx(card)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input"]
    rng = np.random.default_rng(0)
    batch = rng.random((4, 3, 64, 64), dtype=np.float32)
    feats = sess.run(["features"], {"input": batch})[0]
    base = get_session(ensure_onnx(resolve("efficientnet-lite0:native"), cache=model_cache))
    assert feats.shape == (4, 1280)
    assert np.abs(feats - base.infer(batch).features).max() > 1e-3  # the weights were trained

    # Run again with more epochs: it resumes after the finished one.
    simsiam(2)
    assert torch.load(card_path.with_suffix(".ckpt"), weights_only=True)["epoch"] == 2

    # A store made with it records it and refuses appends with another model.
    out = tmp_path / "mine.zarr"
    with dask.config.set({"elodin.cache-dir": str(cache)}):
        fingerprint([field], out, client=client, progress=False, **{**SETTINGS, "model": "mine"})
        assert Store.open(out).attrs["model"] == "mine"
        before = store_digest(out)
        with pytest.raises(StoreError, match="made with model"):
            fingerprint([field], out, client=client, progress=False, **SETTINGS)
    assert store_digest(out) == before


def test_adapt_trainer_freezes_the_backbone_bn_and_early_blocks():
    import torch

    from pipeline.models import resolve
    from pipeline.models.adapt import Trainer, train_settings
    from pipeline.models.export import pretrained_network

    card = resolve("efficientnet-lite0:native")
    net = pretrained_network(card)
    trainer = Trainer(card, net, train_settings(tune_blocks=2, freeze_bn=True))
    trainer.train_mode()
    norms = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms and not any(m.training for m in norms)  # ImageNet statistics kept
    assert trainer.projector.training and trainer.predictor.training
    last = len(net._blocks)
    tuned = {n for n, p in net.named_parameters() if p.requires_grad}
    allowed = (f"_blocks.{last - 2}.", f"_blocks.{last - 1}.", "_conv_head.", "_bn1.")
    assert tuned and all(n.startswith(allowed) for n in tuned)
    heads, backbone = trainer.optimiser.param_groups
    assert backbone["base_lr"] == pytest.approx(heads["base_lr"] * 0.01)  # the default factor


def test_adapt_refuses_a_checkpoint_made_with_other_settings(field, tmp_path):
    import torch

    from pipeline.errors import ModelError
    from pipeline.models import resolve
    from pipeline.models.adapt import adapt

    cache = tmp_path / "cache"
    (cache / "adapted").mkdir(parents=True)
    name = resolve("efficientnet-lite0:native").name
    ckpt = {"base": name, "epoch": 1, "settings": {"lr": 1.0}}
    torch.save(ckpt, cache / "adapted" / "mine.ckpt")
    with dask.config.set({"elodin.cutouts.stride": 16}):
        with pytest.raises(ModelError, match="other model.adapt settings"):
            adapt(
                name, [str(field)], "mine", method="simsiam", epochs=1, cache=cache, progress=False
            )
    assert not (cache / "adapted" / "mine.onnx").exists()
    # A checkpoint that is not one: one line, left as it is.
    (cache / "adapted" / "mine.ckpt").write_bytes(b"half a checkpoint")
    with dask.config.set({"elodin.cutouts.stride": 16}):
        with pytest.raises(ModelError, match="mine.ckpt: not a readable adapt checkpoint"):
            adapt(
                name, [str(field)], "mine", method="simsiam", epochs=1, cache=cache, progress=False
            )
    assert (cache / "adapted" / "mine.ckpt").read_bytes() == b"half a checkpoint"
    # Nor does the other method take over a name with a SimSiam checkpoint.
    with pytest.raises(ModelError, match="made by the other adapt method"):
        adapt(name, [str(field)], "mine", method="head", cache=cache, progress=False)
    assert not (cache / "adapted" / "mine.head.npz").exists()


def test_adapt_head_exports_a_model_that_fingerprints_like_a_builtin(
    field, tmp_path, client, model_cache
):
    from pipeline.errors import ModelError
    from pipeline.models import get_session, resolve
    from pipeline.models.adapt import adapt
    from pipeline.models.export import ensure_onnx
    from pipeline.models.head import ViewStats
    from pipeline.models.zoo import sha256_file

    cache = tmp_path / "cache"
    base = "efficientnet-lite0:native:rot4"  # a variant: the head keeps the encoder as it is
    with dask.config.set({"elodin.cutouts.stride": 16, "elodin.model.adapt.head-dim": 16}):
        card_path = adapt(base, [str(field)], "inv", epochs=2, cache=cache, progress=False)
    checkpoint = card_path.with_suffix(".head.npz")
    assert ViewStats.load(checkpoint)[0].views == 3  # as they are, then two augmented views
    with dask.config.set({"elodin.cache-dir": str(cache)}):
        card = resolve("inv")
        assert (card.name, card.builtin, card.feature_dim) == ("inv", False, 16)
        session = get_session(ensure_onnx(card))
    # The wrapped file is valid ONNX (one top-k key, not the base's and the wrapper's) and runs
    # the base's graph, rotations included, then the head.
    import onnx

    onnx.checker.check_model(onnx.load(str(ensure_onnx(card, cache=model_cache))))
    assert session.orientations == 4
    rng = np.random.default_rng(0)
    batch = rng.random((4, 3, 64, 64), dtype=np.float32)
    feats = session.infer(batch).features
    assert feats.shape == (4, 16) and np.isfinite(feats).all()
    rotated = session.infer(np.rot90(batch, 1, axes=(2, 3)).copy()).features
    np.testing.assert_allclose(rotated, feats, atol=1e-3 * np.abs(feats).max())
    with pytest.raises(ModelError, match="square cutouts"):
        session.infer(batch[:, :, :, :48])
    top = get_session(ensure_onnx(resolve(base), cache=model_cache)).infer(batch)
    np.testing.assert_array_equal(session.infer(batch).top_class, top.top_class)

    # Again with more epochs: it resumes after the views it has; again as it is: the same
    # model, byte for byte (the fit is deterministic).
    with dask.config.set({"elodin.cutouts.stride": 16, "elodin.model.adapt.head-dim": 16}):
        adapt(base, [str(field)], "inv", epochs=3, cache=cache, progress=False)
        assert ViewStats.load(checkpoint)[0].views == 4
        digest = sha256_file(card_path.with_suffix(".onnx"))
        adapt(base, [str(field)], "inv", epochs=3, cache=cache, progress=False)
        assert sha256_file(card_path.with_suffix(".onnx")) == digest
        # Other cutouts, or the same ones stretched otherwise, under the same name: refused,
        # the checkpoint kept (its views are never mixed with other ones).
        for other in ({"elodin.cutouts.stride": 24}, {"elodin.preprocess.asinh-a": 0.5}):
            with dask.config.set(other):
                with pytest.raises(ModelError, match="made from other cutouts or settings"):
                    adapt(base, [str(field)], "inv", epochs=3, cache=cache, progress=False)
        assert ViewStats.load(checkpoint)[0].views == 4
        # Without its checkpoint, the name is not adapted again into another model (stores
        # made with it record its sha256): refused, the model's files as they were.
        kept = checkpoint.with_suffix(".kept")
        checkpoint.rename(kept)
        with pytest.raises(ModelError, match="exists and its checkpoint .* is gone"):
            adapt(base, [str(field)], "inv", epochs=3, cache=cache, progress=False)
        assert sha256_file(card_path.with_suffix(".onnx")) == digest
        kept.rename(checkpoint)
        # Nor does SimSiam take over the name.
        with pytest.raises(ModelError, match="made by the other adapt method"):
            adapt(
                "efficientnet-lite0:native",
                [str(field)],
                "inv",
                method="simsiam",
                cache=cache,
                progress=False,
            )

    # A store made with it records it and refuses appends with another model.
    out = tmp_path / "inv.zarr"
    with dask.config.set({"elodin.cache-dir": str(cache)}):
        fingerprint([field], out, client=client, progress=False, **{**SETTINGS, "model": "inv"})
        store = Store.open(out)
        assert store.attrs["model"] == "inv"
        assert store.dataset()["fingerprint"].shape[1] == 16
        before = store_digest(out)
        with pytest.raises(StoreError, match="made with model"):
            fingerprint([field], out, client=client, progress=False, **SETTINGS)
    assert store_digest(out) == before


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"ridge": 0}, "model.adapt.ridge: must be > 0"),
        ({"head-dim": 0}, "model.adapt.head-dim: must be >= 1"),
        ({"method": "byol"}, "'byol' is not one of head, simsiam"),
        ({"max-cutouts": 10}, r"max-cutouts \(10\) is below min-cutouts \(64\)"),
    ],
)
def test_adapt_head_settings_are_checked_before_anything_is_written(
    setting, message, field, tmp_path
):
    from pipeline.errors import ConfigError
    from pipeline.models.adapt import adapt

    cache = tmp_path / "cache"
    with dask.config.set({f"elodin.model.adapt.{k}": v for k, v in setting.items()}):
        with pytest.raises(ConfigError, match=message):
            adapt("efficientnet-lite0:native", [str(field)], "x", cache=cache, progress=False)
    assert not cache.exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["no-such-model", "{field}", "--name", "x"], "unknown model 'no-such-model'"),
        (
            ["efficientnet-lite0:rot8", "{field}", "--name", "x", "--method", "simsiam"],
            "method simsiam adapts a plain built-in",
        ),
        (
            ["efficientnet-lite0:native:zoom2", "{field}", "--name", "x", "--method", "simsiam"],
            "method simsiam adapts a plain built-in",
        ),
        (
            ["efficientnet-lite0:native:stages", "{field}", "--name", "x", "--method", "simsiam"],
            "method simsiam adapts a plain built-in",
        ),
        (
            ["efficientnet-lite0", "{field}", "--name", "x", "--method", "byol"],
            "--method 'byol': use",
        ),
        (["efficientnet-lite0", "{field}", "--name", "x", "--epochs", "0"], "--epochs must be"),
        (["efficientnet-lite0", "{field}", "--name", "a/b"], "--name 'a/b': use letters"),
        (
            ["efficientnet-lite0", "{small}", "--name", "x"],
            "1 cutout(s) with these cutout settings",
        ),
    ],
)
def test_adapt_bad_input_is_one_line(args, message, field, tmp_path):
    small = synthetic_mosaic(tmp_path / "small.fits", shape=(64, 64), seed=2, n_sources=1)
    cache = tmp_path / "cache"
    argv = [a.format(field=field, small=small) for a in args]
    result = _cli("models", "adapt", *argv, cache=cache)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("elodin: error:") and message in lines[0]
    assert not (cache / "adapted").exists()  # nothing written
