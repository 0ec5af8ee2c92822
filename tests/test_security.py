"""Security rules of docs/threat-model.md, checked on the package's source so a regression fails.

The package never deserialises with pickle, never loads YAML with a loader that builds objects,
loads PyTorch weights only with ``weights_only=True``, never evaluates strings, and never hands a
command line to a shell. The checks walk the syntax tree (not a text grep, so comments and
strings cannot hide or fake a call); each rule is first shown to catch what it is for.
"""

from __future__ import annotations

import ast
import warnings
from pathlib import Path

import numpy as np
import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"

PICKLERS = {"pickle", "cPickle", "cloudpickle", "dill", "shelve", "marshal", "joblib"}
SUBPROCESS = {"run", "Popen", "call", "check_call", "check_output"}
SHELL_ALWAYS = {("os", "system"), ("os", "popen"), ("subprocess", "getoutput")}
SHELL_ALWAYS |= {("subprocess", "getstatusoutput"), ("os", "execl"), ("os", "spawnl")}
SAFE_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _kw(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def violations(source: str, filename: str = "<src>") -> list[str]:
    """Every breach of the rules in ``source``, as ``file:line: what``."""
    out = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names]
            mods = [node.module or ""] if isinstance(node, ast.ImportFrom) else names
            for m in mods:
                if m.split(".")[0] in PICKLERS:
                    out.append(f"{where}: imports {m} (no pickle-family deserialisation)")
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        parts = tuple(name.split("."))
        if name in ("eval", "exec"):
            out.append(f"{where}: {name}() of a string")
        if parts[-2:] in SHELL_ALWAYS:
            out.append(f"{where}: {name}() runs a shell")
        if len(parts) >= 2 and parts[-2] == "subprocess" and parts[-1] in SUBPROCESS:
            if _is_true(_kw(node, "shell")):
                out.append(f"{where}: {name}(shell=True)")
            if node.args and isinstance(node.args[0], ast.Constant | ast.JoinedStr | ast.BinOp):
                out.append(f"{where}: {name}() given one command string, not an argument list")
        if parts[-1] in ("load", "load_all", "full_load", "unsafe_load", "full_load_all"):
            if parts[0] == "yaml":
                loader = _kw(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
                if parts[-1] in ("full_load", "unsafe_load", "full_load_all") or not (
                    loader is not None and _dotted(loader).split(".")[-1] in SAFE_LOADERS
                ):
                    out.append(f"{where}: {name}() without a safe loader (use yaml.safe_load)")
            if parts[0] == "torch" and not _is_true(_kw(node, "weights_only")):
                out.append(f"{where}: torch.load() without weights_only=True")
        if parts[0] in PICKLERS and parts[-1] in ("load", "loads", "Unpickler", "open"):
            out.append(f"{where}: {name}() deserialises with pickle")
        if parts[-1] == "read_pickle":
            out.append(f"{where}: {name}() deserialises with pickle")
        if _is_true(_kw(node, "allow_pickle")):
            out.append(f"{where}: {name}(allow_pickle=True)")
    return out


BAD = {
    "yaml.load(text)": "safe loader",
    "yaml.load(text, Loader=yaml.Loader)": "safe loader",
    "yaml.load(text, yaml.FullLoader)": "safe loader",
    "yaml.unsafe_load(text)": "safe loader",
    "import pickle": "pickle",
    "from cloudpickle import loads": "pickle",
    "joblib.load(path)": "pickle",
    "pd.read_pickle(path)": "pickle",
    "np.load(path, allow_pickle=True)": "allow_pickle",
    "torch.load(path)": "weights_only",
    "torch.load(path, weights_only=False)": "weights_only",
    "subprocess.run(cmd, shell=True)": "shell=True",
    "subprocess.check_output(f'sbatch {script}')": "command string",
    "os.system('ls ' + name)": "shell",
    "os.popen(name)": "shell",
    "eval(text)": "eval",
}
GOOD = [
    "yaml.safe_load(text)",
    "yaml.load(text, Loader=yaml.SafeLoader)",
    "torch.load(path, map_location='cpu', weights_only=True)",
    "subprocess.run(['sbatch', '--test-only', script], capture_output=True)",
    "json.loads(text)",
    "np.load(path)",
    "net.eval()",
]


@pytest.mark.parametrize("snippet", sorted(BAD))
def test_each_rule_catches_what_it_is_for(snippet):
    found = violations(snippet)
    assert len(found) == 1 and BAD[snippet] in found[0], found


@pytest.mark.parametrize("snippet", GOOD)
def test_the_rules_leave_safe_calls_alone(snippet):
    assert violations(snippet) == []


def test_the_package_keeps_the_rules():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20
    found = [v for f in files for v in violations(f.read_text(), str(f.relative_to(PACKAGE)))]
    assert not found, "\n".join(found)


def test_torch_weights_are_loaded_as_tensors_only():
    """The one place weights are read (the built-in export) asks for tensors only."""
    text = (PACKAGE / "models" / "export.py").read_text()
    calls = [
        n
        for n in ast.walk(ast.parse(text))
        if isinstance(n, ast.Call) and _dotted(n.func) == "torch.load"
    ]
    assert calls and all(_is_true(_kw(c, "weights_only")) for c in calls)


def test_a_store_holds_no_pickled_objects(tmp_path):
    """Every array of a store is numbers, booleans or strings, with standard codecs: opening a
    store someone else wrote never unpickles anything."""
    import zarr

    from pipeline.store import Store, pack_units

    st = Store.create(tmp_path / "s.zarr", feature_dim=4, topk=2, chunk_rows=4, attrs={"m": 1})
    st.append_segment(
        images=["a"],
        layout=pack_units(np.array([0, 5]), chunk_rows=4),
        plan_digest="d",
        inputs={"a": {"files": []}},
    )
    st.write_rows(0, {"image": np.array(["a"] * 8, dtype=object), "valid": np.ones(8, bool)})

    class Plan:
        images = ("a",)
        n_tiles = 0
        windows = np.zeros((5, 4), np.int64)
        tile_start = np.array([0, 5])
        grid = None  # windows listed, not a formula

    st.save_plan(0, Plan())
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    with warnings.catch_warnings():  # done/ and locks/ hold plain files, not Zarr nodes
        warnings.simplefilter("ignore")
        members = list(group.members(max_depth=None))
    arrays = [a for _, a in members if isinstance(a, zarr.Array)]
    assert len(arrays) > 10
    for arr in arrays:
        dtype = arr.metadata.data_type.to_json(zarr_format=3)
        assert dtype in ("bool", "string") or dtype.startswith(("int", "uint", "float")), (
            arr.path,
            dtype,
        )
        codecs = [c.to_dict()["name"] for c in arr.metadata.codecs]
        assert not any("pickle" in c or "json" in c for c in codecs), (arr.path, codecs)
