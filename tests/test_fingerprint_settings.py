"""The run's settings as one frozen object: resolved once, recorded, read back."""

from __future__ import annotations

import dataclasses

import dask.config
import pytest

from pipeline.errors import ConfigError
from pipeline.fingerprint import CutoutSettings, FingerprintSettings, fingerprint_settings


@pytest.mark.parametrize(
    "flags",
    [{}, {"method": "blobs"}, {"method": "catalog", "size": 48}, {"stride": 32, "edge": "pad"}],
)
def test_settings_round_trip_through_the_store_attrs(flags):
    s = FingerprintSettings.from_config(**flags)
    assert FingerprintSettings.from_attrs(s.to_attrs(), **flags) == s
    # One name per idea: the cutout side is `size` from the flag to the store.
    assert s.to_attrs()["cutouts"]["size"] == s.cutouts.size
    assert fingerprint_settings(**flags) == s.as_dict()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.topk = 3  # type: ignore[misc]


def test_only_sliding_records_stride_and_edge_and_only_blobs_the_detection_options():
    sliding = FingerprintSettings.from_config(method="sliding", size=32)
    assert (sliding.cutouts.stride, sliding.cutouts.edge) == (32, "shift")
    assert sliding.cutouts.blobs == ()
    full = FingerprintSettings.from_config(method="full")
    assert (full.cutouts.stride, full.cutouts.edge) == (None, None)
    blobs = FingerprintSettings.from_config(method="blobs").cutouts
    assert dict(blobs.blobs)["max-size"] == 128
    assert CutoutSettings.from_attrs(blobs.to_attrs()) == blobs


def test_a_bad_setting_is_refused_when_resolved():
    with dask.config.set({"elodin.fingerprint.gpu-units": 0}), pytest.raises(ConfigError):
        FingerprintSettings.from_config()
