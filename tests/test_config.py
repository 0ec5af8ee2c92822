"""Configuration: packaged defaults in dask.config, user files and ELODIN__ variables."""

from __future__ import annotations

import os
import subprocess
import sys

import dask.config
import pytest

from pipeline import config
from pipeline.errors import ConfigError


def test_defaults_are_registered_under_elodin():
    assert dask.config.get("elodin.model.name") == "efficientnet-lite0"
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
