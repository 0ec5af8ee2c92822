"""Turn cards into ONNX files the workers run.

Built-in models are exported once with PyTorch (only here: workers never import torch) and
cached in the user's cache dir; user models are wrapped once so that every ONNX file Elodin runs
has the same contract:

- input ``input``: float32 NCHW RGB in [0, 1], dynamic batch, any H, W >= 32;
- resize to the card's resolution (unless ``native``) and mean/std normalisation inside the graph,
  so the host sends small cutouts and the accelerator does the rest;
- outputs ``features`` (N, D), the pooled penultimate layer, and ``logits`` (N, 1000), plus
  ``top_prob`` and ``top_class`` (N, :data:`GRAPH_TOPK`), the most likely classes, descending.

``input`` is the only input: the file runs as it is in any ONNX runtime.

Built-in variants change what ``features`` holds (docs/fingerprints.md): ``:multi`` concatenates
the globally pooled outputs of the network's stages 2-7 with the pooled head, ``:stages`` the
stages alone (the logits still come from the head); ``:rot4`` /
``:rot8`` expand the batch in the graph to the 4 rotations (and their 4 mirror images) of each
cutout and return the mean features and logits of each cutout's views, so the fingerprint does
not depend on the orientation and the accelerator runs the views as one batch. The number of
views is recorded in the file's metadata under :data:`ORIENTATIONS_METADATA`. ``:zoom2`` /
``:zoom3`` add to the batch the central half (and quarter) of each cutout resized to its size
and lay the features of the cutout and its zooms side by side; the logits stay the cutout's.

Files are written atomically (temp file in the cache dir, then :func:`os.replace`) with a JSON
sidecar recording their sha256, so a killed export never leaves a half-written model and a
second export reuses the cache.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import warnings
from pathlib import Path

from .. import config
from ..errors import ModelError
from .zoo import ModelCard, builtin_weights, sha256_file

__all__ = [
    "EXPORT_VERSION",
    "GRAPH_TOPK",
    "OPSET",
    "ORIENTATIONS_METADATA",
    "TOPK_METADATA",
    "ensure_onnx",
    "load_onnx_checked",
    "pretrained_network",
    "torch_module",
]

logger = logging.getLogger(__name__)

OPSET = 17
# Bumped whenever the exported graph changes, so stale cached files are exported again.
EXPORT_VERSION = 4
# Classes the graph itself ranks (softmax + TopK with a constant k), recorded in the file's
# metadata under TOPK_METADATA; a Session asked for more ranks the logits itself.
GRAPH_TOPK = 100
TOPK_METADATA = "elodin_topk"
# Views averaged per cutout (:rot4 / :rot8 variants; absent: 1). Inputs must then be square.
ORIENTATIONS_METADATA = "elodin_orientations"


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def _cached(path: Path) -> bool:
    meta = _sidecar(path)
    if not (path.is_file() and meta.is_file()):
        return False
    try:
        recorded = json.loads(meta.read_text())["sha256"]
    except (OSError, ValueError, KeyError):
        return False
    if json.loads(meta.read_text()).get("export_version") != EXPORT_VERSION:
        return False
    return recorded == sha256_file(path)


def _atomic_write(path: Path, write) -> str:
    """Call ``write(tmp_path)``, then move the result into place; returns its sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        digest = sha256_file(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    meta_tmp = _sidecar(path).with_suffix(".json.tmp")
    meta_tmp.write_text(
        json.dumps(
            {"sha256": digest, "file": path.name, "export_version": EXPORT_VERSION}, indent=1
        )
    )
    os.replace(meta_tmp, _sidecar(path))
    return digest


def ensure_onnx(
    card: ModelCard, *, force: bool = False, cache: Path | None = None, precision: str = "fp32"
) -> Path:
    """Path of the ONNX file to run for ``card``, exporting or wrapping it on first use.

    ``precision="fp16"`` gives a float16 variant of the same graph (float32 inputs and outputs
    kept), converted once from the float32 file and cached beside it.
    """
    if precision not in ("fp32", "fp16"):
        raise ModelError(f"model precision must be fp32 or fp16, got {precision!r}")
    fp32 = _ensure_fp32(card, force=force, cache=cache)
    if precision == "fp32":
        return fp32
    target = fp32.with_name(fp32.stem + "-fp16.onnx")
    if force or not _cached(target):
        _atomic_write(target, lambda tmp: _convert_fp16(fp32, tmp))
    return target


def _ensure_fp32(card: ModelCard, *, force: bool, cache: Path | None) -> Path:
    cache = Path(cache) if cache is not None else config.cache_dir()
    if card.builtin:
        target = cache / f"{card.cache_stem}.onnx"
        if force or not _cached(target):
            logger.info("exporting %s to %s", card.name, target)
            _atomic_write(target, lambda tmp: _export_builtin(card, tmp))
        return target
    assert card.path is not None
    source = load_onnx_checked(card)
    digest = sha256_file(card.path)
    target = cache / "user" / f"{card.path.stem}-{digest[:16]}-{card.resolution}.onnx"
    if force or not _cached(target):
        _atomic_write(target, lambda tmp: _wrap_user_model(card, source, tmp))
    return target


# ----------------------------------------------------------------------------- built-in export
def pretrained_network(card: ModelCard):
    """The built-in's ImageNet-pretrained PyTorch network (EfficientNet-Lite), in eval mode."""
    try:
        import torch
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise ModelError(
            f"{card.name}: exporting a built-in model needs PyTorch "
            "(pip install 'elodin-pipeline[export]'); workers only need the exported ONNX file"
        ) from None

    weights = builtin_weights(card.arch)
    net = EfficientNet.from_name(card.arch, num_classes=1000)
    # Only tensors are loaded: never unpickle arbitrary objects from a weights file.
    state = torch.load(weights, map_location="cpu", weights_only=True)
    net.load_state_dict(state)
    return net.eval()


def torch_module(card: ModelCard, net=None):
    """The PyTorch module whose export is the ONNX graph (used by tests to compare outputs).

    ``net`` replaces the pretrained network (``elodin models adapt`` trains one).
    """
    net = pretrained_network(card) if net is None else net
    import torch

    # Last block of each stage (where the width changes), from the second stage on: the
    # feature maps pooled by the multi-scale variant, finest first.
    widths = [b._block_args.output_filters for b in net._blocks]
    stage_ends = [
        i for i in range(1, len(widths)) if i == len(widths) - 1 or widths[i] != widths[i + 1]
    ]
    views, zooms = card.orientations, card.zooms

    def orientations(x):
        # The 4 rotations by 90 degrees, then the same mirrored: the dihedral group D4.
        # (torch.rot90 has no ONNX export; a quarter turn is a mirror then a transpose.)
        turned = [x]
        for _ in range(3):
            turned.append(torch.flip(turned[-1], dims=(3,)).transpose(2, 3))
        if views == 8:
            turned += [torch.flip(t, dims=(3,)) for t in turned]
        return torch.cat(turned[:views], dim=0)

    def zoomed(x):
        # Zoom z: the central 1/2^z of each side, resized to the cutout's size, so a source
        # a few pixels wide at the centre fills what the network sees. (n, ...) -> (zooms * n, ...)
        # Corners on corners: the centre's edge pixels are not smeared into a border (on the
        # quality benchmark as good or better on 5 of 6 recipe-draws, within its spread).
        h, w = x.shape[2], x.shape[3]
        out = [x]
        for z in range(1, zooms):
            # A centre as many pixels short of the side on each edge: a rotation of the cutout
            # is then a rotation of its centre (a 45 px side: 23, not 22, at zoom 1).
            ch, cw = h // 2**z, w // 2**z
            ch, cw = ch + (h - ch) % 2, cw + (w - cw) % 2
            top, left = (h - ch) // 2, (w - cw) // 2
            centre = x[:, :, top : top + ch, left : left + cw]
            out.append(
                torch.nn.functional.interpolate(
                    centre, size=(h, w), mode="bilinear", align_corners=True
                )
            )
        return torch.cat(out, dim=0)

    def pooled(x):
        """(features, head features): the head alone, every stage then the head (multi), or
        every stage alone (stages)."""
        if not (card.multi or card.stages):
            # The plain graph exactly as before the variants (stores record its sha256).
            head = net.extract_features(x).mean(dim=(2, 3))
            return head, head
        x = net._swish(net._bn0(net._conv_stem(x)))
        parts = []
        for i, block in enumerate(net._blocks):
            x = block(x)
            if i in stage_ends:
                parts.append(x.mean(dim=(2, 3)))
        head = net._swish(net._bn1(net._conv_head(x))).mean(dim=(2, 3))
        return torch.cat(parts if card.stages else [*parts, head], dim=1), head

    class Wrapped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net
            self.register_buffer("mean", torch.tensor(card.mean).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(card.std).view(1, 3, 1, 1))

        def forward(self, x):
            if zooms > 1:
                n = x.shape[0]  # the cutouts, before their zooms join the batch
                x = zoomed(x)
            if card.resolution != "native":
                r = int(card.resolution)
                x = torch.nn.functional.interpolate(
                    x, size=(r, r), mode="bilinear", align_corners=False
                )
            x = (x - self.mean) / self.std
            if views == 1 and zooms == 1:
                features, head = pooled(x)
                return features, self.net._fc(head)
            if zooms == 1:
                # Traced as before the zooms existed: stores record each file's sha256.
                n = x.shape[0]
                features, head = pooled(orientations(x))
                logits = self.net._fc(head)
                # (views * n, D) -> (views, n, D): view v of cutout i is row v * n + i.
                return (
                    features.reshape(views, n, -1).mean(dim=0),
                    logits.reshape(views, n, -1).mean(dim=0),
                )
            features, head = pooled(orientations(x) if views > 1 else x)
            logits = self.net._fc(head)
            # Row v * zooms * n + z * n + i is view v of zoom z of cutout i: the views are
            # averaged, the zooms' features laid side by side, the logits the whole cutout's.
            features = features.reshape(views, zooms, n, -1).mean(dim=0)
            logits = logits.reshape(views, zooms, n, -1).mean(dim=0)[0]
            return features.transpose(0, 1).reshape(n, -1), logits

    return Wrapped().eval()


def torch_export(module, example, out: Path) -> None:
    """Export a PyTorch module returning ``(features, logits)`` to ONNX with Elodin's contract:
    input ``input`` (dynamic batch, height and width), outputs ``features`` and ``logits``."""
    import torch

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (example,),
            str(out),
            input_names=["input"],
            output_names=["features", "logits"],
            dynamic_axes={
                "input": {0: "batch", 2: "height", 3: "width"},
                "features": {0: "batch"},
                "logits": {0: "batch"},
            },
            opset_version=OPSET,
            dynamo=False,
        )


def _export_builtin(card: ModelCard, out: Path) -> None:
    import torch

    module = torch_module(card)
    side = card.native_resolution if card.resolution == "native" else 64
    example = torch.rand(2, 3, side, side)
    torch_export(module, example, out)
    import onnx

    model = onnx.load(str(out))
    _add_topk(model)
    if card.orientations > 1:
        entry = model.metadata_props.add()
        entry.key, entry.value = ORIENTATIONS_METADATA, str(card.orientations)
    onnx.save(model, str(out))


def _add_topk(model) -> None:
    """Append softmax + top-k to a contract graph: outputs ``top_prob`` and ``top_class``.

    The graph ranks a constant :data:`GRAPH_TOPK` classes (fewer when the model has fewer), so
    the file runs on ``input`` alone in any runtime; :class:`~pipeline.models.runtime.Session`
    keeps the first ``model.topk`` columns (TopK sorts them). A graph input ``k`` (export
    version 3) broke every plain ``InferenceSession``; an initializer doubling as an optional
    input would make ONNX Runtime warn on every load that it cannot constant-fold it. With IO
    binding on a GPU only the features and the top-k leave the device, not the 1000 logits.
    """
    from onnx import TensorProto, helper

    model.graph.initializer.append(
        helper.make_tensor("_topk_k", TensorProto.INT64, [1], [GRAPH_TOPK])
    )
    # Shape + Slice, not Shape(start=, end=) (opset 15): user models may be opset 13.
    for name, value in (("_topk_one", 1), ("_topk_two", 2)):
        model.graph.initializer.append(helper.make_tensor(name, TensorProto.INT64, [1], [value]))
    model.graph.node.extend(
        [
            helper.make_node("Softmax", ["logits"], ["_probs"], axis=1),
            # k never above the number of classes (a user model may have fewer than 1000)
            helper.make_node("Shape", ["logits"], ["_logits_shape"]),
            helper.make_node("Slice", ["_logits_shape", "_topk_one", "_topk_two"], ["_n_classes"]),
            helper.make_node("Min", ["_topk_k", "_n_classes"], ["_k"]),
            helper.make_node(
                "TopK", ["_probs", "_k"], ["top_prob", "_top_index"], axis=1, largest=1, sorted=1
            ),
            helper.make_node("Cast", ["_top_index"], ["top_class"], to=TensorProto.INT32),
        ]
    )
    model.graph.output.extend(
        [
            helper.make_tensor_value_info("top_prob", TensorProto.FLOAT, ["batch", "topk"]),
            helper.make_tensor_value_info("top_class", TensorProto.INT32, ["batch", "topk"]),
        ]
    )
    # Set, not added: a graph that already ranks (a built-in with an adapted head) keeps one key.
    kept = [p for p in model.metadata_props if p.key != TOPK_METADATA]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    entry = model.metadata_props.add()
    entry.key, entry.value = TOPK_METADATA, str(GRAPH_TOPK)


def _convert_fp16(src: Path, out: Path) -> None:
    """float16 weights and activations, float32 at the edges (onnxconverter-common)."""
    import onnx
    from onnx import helper

    try:
        from onnxconverter_common import float16
    except ImportError:
        raise ModelError(
            "fp16 models need onnxconverter-common (pip install 'elodin-pipeline[fp16]')"
        ) from None
    model = onnx.load(str(src))
    # A graph output that other nodes also read (features -> the classifier) confuses the
    # converter's casts at the edges; give every output its own Identity first.
    outputs = {o.name for o in model.graph.output}
    for node in model.graph.node:
        node.output[:] = [f"{n}__int" if n in outputs else n for n in node.output]
        node.input[:] = [f"{n}__int" if n in outputs else n for n in node.input]
    model.graph.node.extend(
        helper.make_node("Identity", [f"{n}__int"], [n]) for n in sorted(outputs)
    )
    # The converter names the casts it adds after their nodes: unnamed nodes would collide.
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"
    # Softmax/TopK stay in float32: probabilities near 0 and ties are where fp16 rounds badly.
    with warnings.catch_warnings():
        # "number ... will be truncated": tiny weights rounding to fp16's range, expected.
        warnings.simplefilter("ignore", UserWarning)
        converted = float16.convert_float_to_float16(
            model, keep_io_types=True, op_block_list=["Softmax", "TopK"]
        )
    onnx.save(converted, str(out))


# ------------------------------------------------------------------------------- user models
def load_onnx_checked(card: ModelCard):
    """Load a user ONNX file and check it against its card (sha256, input, outputs)."""
    import onnx

    path = card.path
    if path is None or not path.is_file():
        raise ModelError(f"{path}: model file not found")
    if card.sha256:
        actual = sha256_file(path)
        if actual != card.sha256:
            raise ModelError(
                f"{path}: sha256 {actual[:12]}... does not match the card's {card.sha256[:12]}..."
            )
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as e:  # onnx raises DecodeError, ValidationError, ... for non-ONNX bytes
        raise ModelError(f"{path}: not a valid ONNX model ({type(e).__name__})") from None
    inputs = {i.name: i for i in model.graph.input}
    if card.input_name not in inputs:
        raise ModelError(
            f"{path}: has no input named {card.input_name!r} (inputs: {', '.join(inputs) or 'none'})"
        )
    dims = inputs[card.input_name].type.tensor_type.shape.dim
    if len(dims) != 4:
        raise ModelError(
            f"{path}: input {card.input_name!r} has rank {len(dims)}, expected 4 (N, C, H, W)"
        )
    if dims[1].HasField("dim_value") and dims[1].dim_value != 3:
        raise ModelError(
            f"{path}: input {card.input_name!r} has {dims[1].dim_value} channels, expected 3 (RGB)"
        )
    outputs = {o.name: o for o in model.graph.output}
    for wanted in (card.features_output, card.logits_output):
        if wanted and wanted not in outputs:
            raise ModelError(
                f"{path}: has no output named {wanted!r} (outputs: {', '.join(outputs)})"
            )
    return model


def _wrap_user_model(card: ModelCard, model, out: Path) -> None:
    import onnx
    from onnx import TensorProto, compose, helper

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:
        raise ModelError(f"{card.path}: ONNX opset {opset} is too old; re-export with opset >= 13")
    nodes, inits = [], []

    def const(name, values, dims, dtype=TensorProto.FLOAT):
        inits.append(helper.make_tensor(name, dtype, dims, values))
        return name

    x = "input"
    if card.resolution != "native":
        r = int(card.resolution)
        nodes += [
            helper.make_node("Shape", [x], ["_pre_shape"]),
            helper.make_node(
                "Slice",
                [
                    "_pre_shape",
                    const("_pre_s0", [0], [1], TensorProto.INT64),
                    const("_pre_s2", [2], [1], TensorProto.INT64),
                ],
                ["_pre_nc"],
            ),
            helper.make_node(
                "Concat",
                ["_pre_nc", const("_pre_hw", [r, r], [2], TensorProto.INT64)],
                ["_pre_sizes"],
                axis=0,
            ),
            helper.make_node(
                "Resize",
                [x, "", "", "_pre_sizes"],
                ["_pre_resized"],
                mode="linear",
                coordinate_transformation_mode="pytorch_half_pixel",
            ),
        ]
        x = "_pre_resized"
    nodes += [
        helper.make_node(
            "Sub", [x, const("_pre_mean", list(card.mean), [1, 3, 1, 1])], ["_pre_centred"]
        ),
        helper.make_node(
            "Div", ["_pre_centred", const("_pre_std", list(card.std), [1, 3, 1, 1])], ["_pre_out"]
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "elodin_preprocess",
        [
            helper.make_tensor_value_info(
                "input", TensorProto.FLOAT, ["batch", 3, "height", "width"]
            )
        ],
        [helper.make_tensor_value_info("_pre_out", TensorProto.FLOAT, ["batch", 3, None, None])],
        initializer=inits,
    )
    pre = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    pre.ir_version = model.ir_version
    # A user graph whose own tensors are called `features`, `logits`, ... (an adapted model's
    # are) goes under a prefix, or the contract's outputs would duplicate them. Only then: the
    # wrapped file of any other model stays byte for byte what stores recorded.
    names = {o for n in model.graph.node for o in n.output} | {
        i.name for i in model.graph.initializer
    }
    prefix = "user/" if names & {"features", "logits", "top_prob", "top_class"} else ""
    if prefix:
        model = compose.add_prefix(model, prefix)
    feat_name = prefix + card.features_output
    logit_name = prefix + card.logits_output if card.logits_output else None
    keep = [feat_name] + ([logit_name] if logit_name else [])
    merged = compose.merge_models(
        pre, model, io_map=[("_pre_out", prefix + card.input_name)], outputs=keep
    )

    # Rename the outputs to the contract's names, pooling a feature map (N, C, h, w) to (N, C).
    out_nodes, out_vis = [], []
    feat = next(o for o in merged.graph.output if o.name == feat_name)
    rank = len(feat.type.tensor_type.shape.dim)
    if rank == 4:
        out_nodes.append(helper.make_node("GlobalAveragePool", [feat.name], ["_post_pool"]))
        out_nodes.append(helper.make_node("Flatten", ["_post_pool"], ["features"], axis=1))
    elif rank == 2:
        out_nodes.append(helper.make_node("Identity", [feat.name], ["features"]))
    else:
        raise ModelError(
            f"{card.path}: output {card.features_output!r} has rank {rank}, expected 2 (N, D) or 4 (N, C, h, w)"
        )
    out_vis.append(helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", None]))
    if card.logits_output:
        out_nodes.append(helper.make_node("Identity", [logit_name], ["logits"]))
        out_vis.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", None]))
    merged.graph.node.extend(out_nodes)
    del merged.graph.output[:]
    merged.graph.output.extend(out_vis)
    if card.logits_output:
        _add_topk(merged)
    onnx.save(merged, str(out))
