"""Model cards, export and runtime: the real pretrained EfficientNet-Lite through ONNX Runtime."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import skimage.data
import skimage.transform
from onnx import TensorProto, helper

from pipeline.errors import ModelError
from pipeline.models import get_session, resolve
from pipeline.models.export import EXPORT_VERSION, GRAPH_TOPK, ensure_onnx, torch_module
from pipeline.models.recorded import parse_record, record_name, recorded_model
from pipeline.models.runtime import Session, topk
from pipeline.testing import TINY_CARD as CARD
from pipeline.testing import tiny_onnx as _tiny_onnx

CAT_CLASSES = range(281, 286)  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat


def _chelsea(side: int | None = None) -> np.ndarray:
    img = skimage.data.chelsea().astype(np.float32) / 255.0
    if side:
        img = skimage.transform.resize(img, (side, side), anti_aliasing=True).astype(np.float32)
    return np.ascontiguousarray(img.transpose(2, 0, 1)[None])


@pytest.mark.parametrize("name", ["efficientnet-lite0", "efficientnet-lite0:native"])
def test_onnx_matches_pytorch(name, model_cache, rng):
    import torch

    card = resolve(name)
    path = ensure_onnx(card, cache=model_cache)
    batch = rng.random((3, 3, 64, 80), dtype=np.float32)
    with torch.no_grad():
        t_feat, t_logits = torch_module(card)(torch.from_numpy(batch))
    out = get_session(path, threads=2).infer(batch)
    assert out.features.shape == (3, 1280)
    assert out.logits.shape == (3, 1000)
    assert np.abs(out.features - t_feat.numpy()).max() <= 1e-4
    assert np.abs(out.logits - t_logits.numpy()).max() <= 1e-4


def test_pretrained_weights_recognise_a_cat(lite0_onnx):
    out = get_session(lite0_onnx, threads=2).infer(_chelsea())
    assert out.top_class[0, 0] in CAT_CLASSES
    assert out.top_class.shape == (1, 20)
    assert np.all(np.diff(out.top_prob[0]) <= 0)


@pytest.mark.parametrize("arch", ["efficientnet-lite1", "efficientnet-lite2"])
def test_larger_lite_models_export_and_recognise_a_cat(arch, model_cache):
    path = ensure_onnx(resolve(arch), cache=model_cache)
    out = get_session(path, threads=2).infer(_chelsea(256))
    assert out.features.shape == (1, 1280)
    assert out.top_class[0, 0] in CAT_CLASSES


def test_any_input_size_from_32(lite0_onnx, lite0_native_onnx, rng):
    for path in (lite0_onnx, lite0_native_onnx):
        sess = get_session(path, threads=2)
        for h, w in [(32, 32), (48, 96), (224, 224)]:
            out = sess.infer(rng.random((2, 3, h, w), dtype=np.float32))
            assert out.features.shape == (2, 1280) and np.isfinite(out.features).all()


def test_export_is_cached_and_atomic(model_cache):
    card = resolve("efficientnet-lite0")
    path = ensure_onnx(card, cache=model_cache)
    before = path.stat().st_mtime_ns
    again = ensure_onnx(card, cache=model_cache)
    assert again == path and path.stat().st_mtime_ns == before
    assert not list(model_cache.glob(".*.tmp")), "no temp files are left behind"
    meta = path.with_suffix(".json").read_text()
    from pipeline.models.zoo import sha256_file

    assert sha256_file(path) in meta


def test_corrupted_cache_is_exported_again(tmp_path):
    card = resolve("efficientnet-lite0")
    path = ensure_onnx(card, cache=tmp_path)
    path.write_bytes(b"truncated")
    again = ensure_onnx(card, cache=tmp_path)
    assert onnx.load(str(again)).graph.output[0].name == "features"


def test_sessions_are_cached_per_process_and_never_pickled(lite0_onnx):
    a = get_session(lite0_onnx, threads=1)
    assert get_session(lite0_onnx, threads=1) is a
    assert get_session(lite0_onnx, threads=2) is not a
    with pytest.raises(TypeError, match="never pickled"):
        pickle.dumps(a)


def test_topk_matches_full_sort(rng):
    logits = rng.normal(size=(5, 1000)).astype(np.float32)
    cls, prob = topk(logits, 7)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    np.testing.assert_array_equal(cls, np.argsort(-p, axis=1)[:, :7])
    np.testing.assert_allclose(prob, np.sort(p, axis=1)[:, ::-1][:, :7], rtol=1e-6)


def test_wrong_rank_or_channels_is_one_clear_error(lite0_onnx, rng):
    sess = get_session(lite0_onnx, threads=1)
    with pytest.raises(ModelError, match="rank 4"):
        sess.infer(rng.random((3, 64, 64), dtype=np.float32))
    with pytest.raises(ModelError, match="3 channels"):
        sess.infer(rng.random((1, 1, 64, 64), dtype=np.float32))
    with pytest.raises(ModelError, match=">= 32"):
        sess.infer(rng.random((1, 3, 16, 16), dtype=np.float32))


def test_unknown_provider_is_refused(lite0_onnx):
    with pytest.raises(ModelError, match="not offered"):
        Session(lite0_onnx, providers=["NoSuchExecutionProvider"])


# ------------------------------------------------------------------------------- user models
def test_user_onnx_with_card_is_wrapped_to_the_contract(tmp_path, rng):
    import onnxruntime as ort

    _tiny_onnx(tmp_path / "tiny.onnx")
    (tmp_path / "tiny.yaml").write_text(CARD)
    card = resolve(tmp_path / "tiny.onnx")
    assert card.name == "tiny" and not card.builtin
    wrapped = ensure_onnx(card, cache=tmp_path / "cache")
    batch = rng.random((2, 3, 40, 50), dtype=np.float32)
    out = get_session(wrapped, threads=1, topk=3).infer(batch)
    # The same model, run by hand on the resized and normalised input, gives the same features.
    import torch

    x = torch.nn.functional.interpolate(
        torch.from_numpy(batch), size=(224, 224), mode="bilinear", align_corners=False
    )
    x = ((x - 0.5) / 0.25).numpy()
    raw = ort.InferenceSession(str(tmp_path / "tiny.onnx"), providers=["CPUExecutionProvider"])
    feat, scores = raw.run(["pool", "scores"], {"data": x})
    np.testing.assert_allclose(out.features, feat, atol=1e-4)
    np.testing.assert_allclose(out.logits, scores, atol=1e-4)
    assert out.top_class.shape == (2, 3)


# ------------------------------------------------------------------ the file on its own
def _plain_run(path: Path, batch: np.ndarray) -> dict[str, np.ndarray]:
    """Run an exported file as a user's own script would: ONNX Runtime, ``input`` only."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input"]
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, {"input": batch}), strict=True))


def _exported(kind: str, cache: Path, work: Path) -> Path:
    if kind.startswith("user"):
        # opset 13 is the oldest a user model may have (Shape has no start/end there)
        _tiny_onnx(work / "tiny.onnx", opset=13 if kind == "user-opset13" else 17)
        (work / "tiny.yaml").write_text(CARD)
        return ensure_onnx(resolve(work / "tiny.onnx"), cache=cache)
    if kind == "fp16":
        pytest.importorskip("onnxconverter_common")
        return ensure_onnx(resolve("efficientnet-lite0"), cache=cache, precision="fp16")
    return ensure_onnx(resolve(kind), cache=cache)


@pytest.mark.parametrize(
    "kind", ["efficientnet-lite0", "efficientnet-lite0:native", "fp16", "user", "user-opset13"]
)
def test_exported_file_runs_on_input_alone(kind, model_cache, tmp_path, rng):
    path = _exported(kind, model_cache, tmp_path)
    batch = rng.random((3, 3, 64, 72), dtype=np.float32)
    got = _plain_run(path, batch)
    assert {"features", "logits", "top_prob", "top_class"} <= set(got)
    ours = Session(path, threads=1, topk=5).infer(batch)
    np.testing.assert_allclose(got["features"], ours.features, rtol=1e-5, atol=1e-6)
    # The graph ranks GRAPH_TOPK classes (the tiny model has 10); a Session keeps its k.
    classes = got["logits"].shape[1]
    assert got["top_class"].shape == (3, min(GRAPH_TOPK, classes))
    np.testing.assert_array_equal(got["top_class"][:, :5], ours.top_class)
    # The most likely classes, descending (compared by probability: near-ties may swap; the
    # fp16 variant hands top_prob out through a float16 Identity, three digits).
    _, want = topk(got["logits"], GRAPH_TOPK)
    rtol = 5e-3 if kind == "fp16" else 1e-4
    np.testing.assert_allclose(got["top_prob"], want, rtol=rtol, atol=1e-7)
    p = np.exp(got["logits"] - got["logits"].max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    picked = np.take_along_axis(p, got["top_class"].astype(np.int64), axis=1)
    np.testing.assert_allclose(picked, got["top_prob"], rtol=rtol, atol=1e-7)


def test_topk_beyond_what_the_graph_ranks_comes_from_the_logits(lite0_onnx, rng):
    batch = rng.random((2, 3, 64, 64), dtype=np.float32)
    k = GRAPH_TOPK + 50
    for io_binding in (False, True):
        out = Session(lite0_onnx, threads=1, topk=k, io_binding=io_binding).infer(batch)
        assert out.top_class.shape == (2, k)
        np.testing.assert_array_equal(out.top_class, topk(out.logits, k)[0])


def test_session_still_runs_files_that_take_k(tmp_path, rng):
    """Files of export version 3 (graph input ``k``) may still be named by an older store."""
    _tiny_onnx(tmp_path / "tiny.onnx")
    (tmp_path / "tiny.yaml").write_text(CARD)
    model = onnx.load(str(ensure_onnx(resolve(tmp_path / "tiny.onnx"), cache=tmp_path / "c")))
    inits = model.graph.initializer
    inits.remove(next(t for t in inits if t.name == "_topk_k"))
    for node in model.graph.node:
        node.input[:] = ["k" if n == "_topk_k" else n for n in node.input]
    model.graph.input.append(helper.make_tensor_value_info("k", TensorProto.INT64, [1]))
    del model.metadata_props[:]
    old = tmp_path / "old.onnx"
    onnx.save(model, str(old))
    batch = rng.random((2, 3, 40, 40), dtype=np.float32)
    for io_binding in (False, True):
        out = Session(old, threads=1, topk=3, io_binding=io_binding).infer(batch)
        np.testing.assert_array_equal(out.top_class, topk(out.logits, 3)[0])


def test_cached_file_of_an_older_export_version_is_redone(tmp_path):
    import json

    from pipeline.models.zoo import sha256_file

    _tiny_onnx(tmp_path / "tiny.onnx")
    (tmp_path / "tiny.yaml").write_text(CARD)
    card = resolve(tmp_path / "tiny.onnx")
    path = ensure_onnx(card, cache=tmp_path / "cache")
    # An intact file of the previous version: its sha256 matches its sidecar.
    path.write_bytes((tmp_path / "tiny.onnx").read_bytes())
    path.with_suffix(".json").write_text(
        json.dumps({"sha256": sha256_file(path), "export_version": EXPORT_VERSION - 1})
    )
    again = ensure_onnx(card, cache=tmp_path / "cache")
    assert again == path
    assert _plain_run(again, np.zeros((1, 3, 32, 32), np.float32))["features"].shape == (1, 8)
    assert json.loads(path.with_suffix(".json").read_text())["export_version"] == EXPORT_VERSION


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (
            lambda d: (
                (d / "m.onnx").write_bytes(pickle.dumps({"not": "a model"})),
                (d / "m.yaml").write_text(CARD),
            ),
            "not a valid ONNX model",
        ),
        (
            lambda d: (
                _tiny_onnx(d / "m.onnx")
                and (d / "m.yaml").write_text(CARD.replace("features: pool", "features: nope"))
            ),
            "no output named 'nope'",
        ),
        (
            lambda d: (
                _tiny_onnx(d / "m.onnx")
                and (d / "m.yaml").write_text("input: data\nresolution: 224\n")
            ),
            "missing key",
        ),
        (lambda d: _tiny_onnx(d / "m.onnx", rank=3) and (d / "m.yaml").write_text(CARD), "rank 3"),
        (
            lambda d: _tiny_onnx(d / "m.onnx", channels_in=1) and (d / "m.yaml").write_text(CARD),
            "1 channels",
        ),
        (lambda d: _tiny_onnx(d / "m.onnx"), "no model card"),
        (
            lambda d: (
                _tiny_onnx(d / "m.onnx")
                and (d / "m.yaml").write_text(CARD + 'sha256: "' + "0" * 64 + '"\n')
            ),
            "does not match",
        ),
    ],
    ids=[
        "pickle-posing-as-onnx",
        "missing-output",
        "card-missing-keys",
        "input-rank-3",
        "one-channel",
        "no-card",
        "sha-mismatch",
    ],
)
def test_bad_user_models_are_one_clear_error(tmp_path, setup, message):
    setup(tmp_path)
    with pytest.raises(ModelError, match=message) as err:
        card = resolve(tmp_path / "m.onnx")
        ensure_onnx(card, cache=tmp_path / "cache")
    assert "\n" not in str(err.value)
    assert "m.onnx" in str(err.value) or "m.yaml" in str(err.value)


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(
        ModelError, match="efficientnet-lite0, efficientnet-lite1, efficientnet-lite2"
    ):
        resolve("resnet-9000")


# ------------------------------------------------------------------ a store's recorded model
@pytest.mark.parametrize(
    ("name", "precision"),
    [("efficientnet-lite0", "fp32"), ("efficientnet-lite0:native", "fp16"), ("my@model", "fp32")],
)
def test_recorded_name_round_trips(name, precision):
    assert parse_record(record_name(name, precision)) == (name, precision)


def test_recorded_model_finds_the_file_with_the_stores_sha(model_cache, tmp_path):
    from pipeline.models.zoo import sha256_file

    pytest.importorskip("onnxconverter_common")
    fp16 = ensure_onnx(resolve("efficientnet-lite0"), cache=model_cache, precision="fp16")
    got = recorded_model(
        {"model": "efficientnet-lite0@fp16", "model_sha256": sha256_file(fp16)}, where="s.zarr"
    )
    assert (got.path, got.precision, got.card.name) == (fp16, "fp16", "efficientnet-lite0")
    # A user model is found by its sha256 alone: the store knows only its card's name.
    _tiny_onnx(tmp_path / "tiny.onnx")
    (tmp_path / "tiny.yaml").write_text(CARD)
    wrapped = ensure_onnx(resolve(tmp_path / "tiny.onnx"), cache=model_cache)
    got = recorded_model({"model": "tiny", "model_sha256": sha256_file(wrapped)}, where="s.zarr")
    assert (got.path, got.precision, got.card) == (wrapped, "fp32", None)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("tiny", "user model 'tiny' .* not in the model cache .*elodin models export"),
        ("tiny@fp16", "not in the model cache .*model.precision fp16"),
        (
            "efficientnet-lite0",
            "made with an export of efficientnet-lite0 with sha256 000000000000",
        ),
    ],
)
def test_recorded_model_not_here_is_one_clear_line(model, message, lite0_onnx):
    with pytest.raises(ModelError, match=message) as err:
        recorded_model({"model": model, "model_sha256": "0" * 64}, where="s.zarr")
    assert str(err.value).startswith("s.zarr: ") and "\n" not in str(err.value)


# ------------------------------------------------------------------------------------- CLI
def _elodin(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


def test_cli_models_list_export_info(lite0_onnx):
    listed = _elodin("models", "list")
    assert listed.returncode == 0
    assert all(f"efficientnet-lite{i}" in listed.stdout for i in range(3))
    exported = _elodin("models", "export", "efficientnet-lite0")
    assert exported.returncode == 0, exported.stderr
    assert Path(exported.stdout.strip().splitlines()[-1]) == lite0_onnx
    info = _elodin("models", "info", "efficientnet-lite0")
    assert "1280" in info.stdout and "sha256" in info.stdout


@pytest.mark.parametrize(
    "args",
    [["models", "info", "no-such-model"], ["models", "export", "/nonexistent/model.onnx"]],
)
def test_cli_bad_model_is_one_line_without_traceback(args):
    result = _elodin(*args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("elodin: error:")


# ------------------------------------------------------------------ variants: :multi, :rot4/:rot8
def _dihedral(x: np.ndarray) -> list[np.ndarray]:
    """The 8 rotations and mirror images of a (N, C, H, W) batch, numpy's own."""
    turned = [np.rot90(x, k, axes=(2, 3)) for k in range(4)]
    return [np.ascontiguousarray(t) for t in turned + [t[..., ::-1] for t in turned]]


@pytest.mark.parametrize(
    "name, canonical, dim, views",
    [
        ("efficientnet-lite0:rot8", "efficientnet-lite0:rot8", 1280, 8),
        ("efficientnet-lite0:rot8:native", "efficientnet-lite0:native:rot8", 1280, 8),
        ("efficientnet-lite0:multi:128", "efficientnet-lite0:128:multi", 2048, 1),
        ("efficientnet-lite0:rot4:multi:native", "efficientnet-lite0:native:multi:rot4", 2048, 4),
        ("efficientnet-lite2:multi", "efficientnet-lite2:multi", 2120, 1),
        ("efficientnet-lite0:rot4:zoom3:native", "efficientnet-lite0:native:zoom3:rot4", 3840, 4),
        ("efficientnet-lite0:zoom2:multi", "efficientnet-lite0:multi:zoom2", 4096, 1),
        (
            "efficientnet-lite0:rot4:zoom3:stages:native",
            "efficientnet-lite0:native:stages:zoom3:rot4",
            2304,
            4,
        ),
        ("efficientnet-lite2:stages", "efficientnet-lite2:stages", 840, 1),
    ],
)
def test_variant_names_are_canonical(name, canonical, dim, views):
    card = resolve(name)
    assert (card.name, card.feature_dim, card.orientations) == (canonical, dim, views)
    # `reduce` standardises the features of several depths of the network by default.
    assert card.pooled_stages == (":multi" in canonical or ":stages" in canonical)
    assert resolve(canonical) == card
    assert card.cache_stem != resolve("efficientnet-lite0").cache_stem


@pytest.mark.parametrize(
    "name, message",
    [
        ("efficientnet-lite0:rot3", r"'rot3' is not a resolution .* or a variant"),
        ("efficientnet-lite0:rot4:rot8", "given twice"),
        ("efficientnet-lite0:multi:multi", "given twice"),
        ("efficientnet-lite0:zoom2:zoom3", "'zoom3' given twice or with another zoom"),
        ("efficientnet-lite0:zoom4", r"'zoom4' is not a resolution .* or a variant"),
        ("efficientnet-lite0:multi:stages", "'stages' given twice or with another multi or stages"),
        ("efficientnet-lite0:native:128", "'128' is not a resolution"),
    ],
)
def test_bad_variant_is_one_clear_error(name, message):
    with pytest.raises(ModelError, match=message):
        resolve(name)


def test_invariance_setting_names_the_variant(tmp_path):
    from pipeline.errors import ConfigError
    from pipeline.models.zoo import with_invariance

    assert with_invariance("efficientnet-lite0", "none") == "efficientnet-lite0"
    assert with_invariance("efficientnet-lite0:native", 8) == "efficientnet-lite0:native:rot8"
    assert with_invariance("efficientnet-lite0:rot4", "4") == "efficientnet-lite0:rot4"
    assert with_invariance("efficientnet-lite0:rot4", "none") == "efficientnet-lite0:rot4"
    with pytest.raises(ModelError, match="rot4 disagrees with model.invariance 8"):
        with_invariance("efficientnet-lite0:rot4", 8)
    with pytest.raises(ConfigError, match="model.invariance: '2' is not one of none, 4, 8"):
        with_invariance("efficientnet-lite0", "2")
    with pytest.raises(ModelError, match="needs a built-in model"):
        with_invariance(str(tmp_path / "mine.onnx"), 8)


def test_rot8_features_are_equal_for_every_rotation_and_flip(model_cache):
    import onnxruntime as ort

    path = ensure_onnx(resolve("efficientnet-lite0:native:rot8"), cache=model_cache)
    # A plain session fed only `input`: the file keeps the contract of every export.
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input"]
    cat = _chelsea(64)
    views = _dihedral(np.concatenate([cat, cat[:, ::-1].copy()]))  # two different cutouts
    feats = [sess.run(["features", "logits"], {"input": v}) for v in views]
    for f, lg in feats[1:]:
        np.testing.assert_allclose(f, feats[0][0], atol=1e-4, rtol=0)
        np.testing.assert_allclose(lg, feats[0][1], atol=1e-4, rtol=0)
    assert np.abs(feats[0][0][0] - feats[0][0][1]).max() > 1e-2  # not one constant vector
    # The plain model is not invariant: the test would fail without the rotations.
    plain = get_session(ensure_onnx(resolve("efficientnet-lite0:native"), cache=model_cache))
    assert np.abs(plain.infer(views[1]).features - plain.infer(views[0]).features).max() > 1e-2


def test_rot4_is_invariant_to_rotations_only(model_cache):
    sess = get_session(ensure_onnx(resolve("efficientnet-lite0:native:rot4"), cache=model_cache))
    assert sess.orientations == 4
    views = _dihedral(_chelsea(64))
    base = sess.infer(views[0]).features
    for v in views[1:4]:
        np.testing.assert_allclose(sess.infer(v).features, base, atol=1e-4, rtol=0)
    assert np.abs(sess.infer(views[4]).features - base).max() > 1e-3


def test_rotation_models_refuse_non_square_cutouts(model_cache, rng):
    sess = get_session(ensure_onnx(resolve("efficientnet-lite0:native:rot4"), cache=model_cache))
    with pytest.raises(ModelError, match="needs square cutouts, got 64 x 80"):
        sess.infer(rng.random((2, 3, 64, 80), dtype=np.float32))


def test_multi_scale_features_have_the_documented_length(model_cache, lite0_native_onnx):
    import onnxruntime as ort

    card = resolve("efficientnet-lite0:native:multi")
    path = ensure_onnx(card, cache=model_cache)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input"]
    cat = _chelsea(64)
    feats, logits, top = sess.run(["features", "logits", "top_class"], {"input": cat})
    # Documented (docs/fingerprints.md): 24 + 40 + 80 + 112 + 192 + 320 stage widths + 1280.
    assert feats.shape == (1, 2048) == (1, card.feature_dim)
    # The head, last, is the plain model's fingerprint; the logits are the plain model's.
    plain = get_session(lite0_native_onnx).infer(cat)
    np.testing.assert_allclose(feats[:, -1280:], plain.features, atol=1e-4)
    np.testing.assert_allclose(logits, plain.logits, atol=1e-4)
    assert top.shape == (1, GRAPH_TOPK)


def test_stages_are_the_multi_scale_features_without_the_head(model_cache):
    cat = _chelsea(64)
    multi = get_session(ensure_onnx(resolve("efficientnet-lite0:native:multi"), cache=model_cache))
    card = resolve("efficientnet-lite0:native:stages")
    stages = get_session(ensure_onnx(card, cache=model_cache)).infer(cat)
    # Documented (docs/fingerprints.md): 24 + 40 + 80 + 112 + 192 + 320 = 768.
    assert stages.features.shape == (1, 768) == (1, card.feature_dim)
    whole = multi.infer(cat)
    np.testing.assert_allclose(stages.features, whole.features[:, :768], atol=1e-4)
    np.testing.assert_allclose(stages.logits, whole.logits, atol=1e-4)  # still the head's


def test_zoom_features_are_the_cutout_then_its_centre_seen_closer(model_cache, lite0_native_onnx):
    import torch

    card = resolve("efficientnet-lite0:native:zoom3")
    sess = get_session(ensure_onnx(card, cache=model_cache))
    plain = get_session(lite0_native_onnx)
    cat = _chelsea(64)
    out = sess.infer(cat)
    # Documented (docs/fingerprints.md): three times the plain length, the cutout's first.
    assert out.features.shape == (1, 3 * 1280) == (1, card.feature_dim)
    whole = plain.infer(cat)
    np.testing.assert_allclose(out.features[:, :1280], whole.features, atol=1e-4)
    np.testing.assert_allclose(out.logits, whole.logits, atol=1e-4)  # the cutout's classes
    for z, (lo, hi) in enumerate([(16, 48), (24, 40)], start=1):
        closer = torch.nn.functional.interpolate(
            torch.from_numpy(cat[:, :, lo:hi, lo:hi].copy()),
            size=(64, 64),
            mode="bilinear",
            align_corners=True,
        ).numpy()
        np.testing.assert_allclose(
            out.features[:, z * 1280 : (z + 1) * 1280], plain.infer(closer).features, atol=1e-4
        )
    # Any side >= 32, odd or not square: the centre is cut from the cutout's own size.
    for shape in [(2, 3, 45, 45), (2, 3, 64, 80)]:
        assert sess.infer(np.random.default_rng(0).random(shape, np.float32)).features.shape == (
            2,
            3840,
        )


@pytest.mark.parametrize("side", [45, 50])
def test_zoom_centre_is_centred_so_rotations_stay_exact(model_cache, side):
    # 45 - 45 // 2 and 50 - 50 // 4 are odd: a centre cut at // 2 offsets would sit half a
    # pixel off, and rotating the cutout would not rotate it.
    sess = get_session(
        ensure_onnx(resolve("efficientnet-lite0:native:zoom3:rot4"), cache=model_cache)
    )
    cat = _chelsea(side)
    base = sess.infer(cat).features
    for v in _dihedral(cat)[1:4]:
        np.testing.assert_allclose(sess.infer(v).features, base, atol=1e-4, rtol=0)


def test_zoom_with_rot8_is_still_invariant(model_cache):
    sess = get_session(
        ensure_onnx(resolve("efficientnet-lite0:native:zoom2:rot8"), cache=model_cache)
    )
    cat = _chelsea(64)
    views = _dihedral(np.concatenate([cat, cat[:, ::-1].copy()]))
    base = sess.infer(views[0]).features
    assert base.shape == (2, 2560)
    for v in views[1:]:
        np.testing.assert_allclose(sess.infer(v).features, base, atol=1e-4, rtol=0)
