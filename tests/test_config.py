"""Configuration: packaged defaults in dask.config, user files and ELODIN__ variables."""

from __future__ import annotations

import os
import subprocess
import sys

import dask.config
import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from pipeline import config
from pipeline.errors import ConfigError


def test_defaults_are_registered_under_elodin():
    assert dask.config.get("elodin.model.name") == "efficientnet-lite0:native:stages:zoom3:rot4"
    assert config.get("fingerprint.batch-size") == 64
    assert config.get("fingerprint.batch_size") == 64  # dask normalises - and _


def test_flag_overrides_config():
    assert config.get("fingerprint.batch-size", override=7) == 7


def test_environment_variables_override_defaults():
    env = {
        **os.environ,
        "ELODIN__FINGERPRINT__BATCH_SIZE": "128",
        "ELODIN__MODEL__NAME": "efficientnet-lite2",
    }
    code = "from pipeline import config; print(config.get('fingerprint.batch-size'), config.get('model.name'))"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["128", "efficientnet-lite2"]


def test_collect_env_parses_literals():
    env = {"ELODIN__A__B_C": "[1, 2]", "ELODIN__X": "true", "ELODIN__Y": "null", "OTHER": "1"}
    assert config.collect_env(env) == {"elodin": {"a": {"b-c": [1, 2]}, "x": True, "y": None}}


def test_user_file_applies_and_unknown_keys_are_refused(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("elodin:\n  fingerprint:\n    batch-size: 32\n")
    with dask.config.set({}):
        config.load_file(good)
        assert config.get("fingerprint.batch-size") == 32
    bad = tmp_path / "bad.yaml"
    bad.write_text("elodin:\n  fingerprint:\n    batch_sise: 32\n")
    with pytest.raises(
        ConfigError,
        match=r"bad.yaml: unknown configuration key\(s\): elodin.fingerprint.batch_sise",
    ):
        config.load_file(bad)


def test_unsafe_yaml_is_not_loaded(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("elodin: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="evil.yaml"):
        config.load_file(evil)


def test_typed_accessors_name_the_key():
    with dask.config.set({"elodin.fingerprint.batch-size": "many"}):
        with pytest.raises(ConfigError, match="elodin.fingerprint.batch-size: expected an integer"):
            config.get_int("fingerprint.batch-size")
    with pytest.raises(ConfigError, match="not one of"):
        config.get_choice("cutouts.edge", ("a", "b"))


def test_environment_beats_a_user_file(tmp_path, monkeypatch):
    f = tmp_path / "user.yaml"
    f.write_text("elodin:\n  fingerprint:\n    batch-size: 32\n")
    monkeypatch.setenv("ELODIN__FINGERPRINT__BATCH_SIZE", "8")
    with dask.config.set({}):
        config.load_file(f)
        assert config.get("fingerprint.batch-size") == 8


def test_public_api_is_re_exported_lazily():
    import subprocess
    import sys

    code = (
        "import sys, pipeline; assert 'pipeline.analysis' not in sys.modules; "
        "from pipeline import fingerprint, reduce, Store, connect, make_report, run; "
        "print(fingerprint.__module__, reduce.__module__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["pipeline.fingerprint", "pipeline.analysis.reduce"]


# ------------------------------------------------------------------- numbers users write
NOT_INTEGERS = [1e30, float("inf"), float("-inf"), float("nan"), True, "3", 2**70, 64.5, [64]]


@pytest.mark.parametrize("value", NOT_INTEGERS, ids=repr)
def test_get_int_refuses_what_is_no_sane_integer(value):
    """inf and nan raised OverflowError / ValueError (a traceback); 1e30 and 2**70 passed and
    overflowed int64 later."""
    with pytest.raises(ConfigError) as e:
        config.get_int("cutouts.size", override=value, minimum=1)
    assert str(e.value).startswith("config elodin.cutouts.size: ") and "\n" not in str(e.value)


@pytest.mark.parametrize("value", [64, 64.0, 1e3, np.int64(64), np.float32(64), config.INT_LIMIT])
def test_get_int_takes_integral_numbers_of_any_kind(value):
    got = config.get_int("cutouts.size", override=value, minimum=1)
    assert type(got) is int and got == int(value)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -np.inf, True, "0.5", None])
def test_get_float_refuses_non_finite_values(value):
    with dask.config.set({"elodin.cutouts.blob-scale": value}):
        with pytest.raises(ConfigError, match=r"elodin.cutouts.blob-scale: expected a finite"):
            config.get_float("cutouts.blob-scale")


@given(
    value=st.one_of(
        st.integers(-(2**80), 2**80),
        st.floats(allow_nan=True, allow_infinity=True),
        st.booleans(),
        st.text(max_size=5),
        st.none(),
    )
)
@example(value=9.2e18)
@example(value=float(2**63))
def test_get_int_returns_a_bounded_int_or_one_line(value):
    with dask.config.set({"elodin.tiling.tile-size": value}):
        try:
            got = config.get_int("tiling.tile-size", minimum=1)
        except ConfigError as e:
            assert str(e).startswith("config elodin.tiling.tile-size: ") and "\n" not in str(e)
            return
    assert type(got) is int and 1 <= got <= config.INT_LIMIT and got == value


def test_a_huge_size_flag_is_one_line_and_writes_nothing(tmp_path, capsys):
    from pipeline.cli import main
    from pipeline.store import Store
    from pipeline.testing import synthetic_mosaic

    image = synthetic_mosaic(tmp_path / "f.fits", shape=(64, 64))
    out = tmp_path / "out.zarr"
    code = main(["fingerprint", str(image), "-o", str(out), "--size", str(10**20), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == f"elodin: error: config elodin.cutouts.size: must be <= 2147483647, got {10**20}"
    assert not Store.exists(out)


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ({"cutouts": {"stride": 0}}, "config elodin.cutouts.stride: must be >= 1, got 0"),
        ({"cutouts": {"stride": True}}, "config elodin.cutouts.stride: "),
        ({"cutouts": {"stride": 2**70}}, "config elodin.cutouts.stride: must be <= "),
    ],
)
def test_a_bad_stride_setting_is_one_line_and_writes_nothing(tmp_path, capsys, setting, expected):
    # A stride of 0 used to be taken as null (the cutout size): a typo ran the wrong plan.
    import dask.config

    from pipeline.cli import main
    from pipeline.store import Store
    from pipeline.testing import synthetic_mosaic

    image = synthetic_mosaic(tmp_path / "f.fits", shape=(64, 64))
    out = tmp_path / "out.zarr"
    with dask.config.set({"elodin": {**dask.config.get("elodin"), **_merged(setting)}}):
        code = main(["fingerprint", str(image), "-o", str(out), "--size", "32", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith(f"elodin: error: {expected}") and "\n" not in err
    assert not Store.exists(out)


def _merged(setting: dict) -> dict:
    import copy

    import dask.config

    merged = copy.deepcopy(dask.config.get("elodin"))
    for section, values in setting.items():
        merged[section] = {**merged[section], **values}
    return merged


@pytest.mark.parametrize(
    ("stage", "key", "value"),
    [
        ("reduce", "analysis.reduce.variance", "most"),
        ("cluster", "analysis.seed", -1),
        ("outliers", "analysis.seed", -1),
    ],
)
def test_bad_analysis_numbers_are_one_line_and_change_nothing(tmp_path, capsys, stage, key, value):
    # Each reached numpy or scikit-learn as a ValueError traceback before.
    from analysis_store import build_store, store_digest

    from pipeline.cli import main

    rng = np.random.default_rng(0)
    st, _ = build_store(tmp_path / "s.zarr", rng.normal(size=(60, 8)).astype(np.float32))
    store = st.path
    if stage != "reduce":
        assert main(["reduce", str(store), "--components", "3"]) == 0
    before = store_digest(store)
    capsys.readouterr()
    with dask.config.set({f"elodin.{key}": value}):
        code = main([stage, str(store)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith(f"elodin: error: config elodin.{key}: ") and "\n" not in err
    assert store_digest(store) == before
