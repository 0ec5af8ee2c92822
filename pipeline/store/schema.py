"""What a fingerprint store holds: its schema version, variables and coordinates."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["COORDS", "REQUIRED_VARIABLES", "SCHEMA_VERSION"]

SCHEMA_VERSION = 2
# Schema 1 kept every image's record in the root attrs (segments[*].images / inputs, retired);
# `elodin upgrade STORE` moves them into the images table.
REQUIRED_VARIABLES = ("fingerprint", "top_class", "top_prob", "valid", "masked_fraction")
COORDS = ("image", "x", "y", "width", "height", "ra", "dec")
# dtype and fill of every per-row array the fingerprint stage writes
_ROW_ARRAYS: dict[str, tuple[str, Any]] = {
    "valid": ("bool", False),
    "masked_fraction": ("float32", np.nan),
    "x": ("float64", np.nan),
    "y": ("float64", np.nan),
    "width": ("int32", 0),
    "height": ("int32", 0),
    "ra": ("float64", np.nan),
    "dec": ("float64", np.nan),
}
