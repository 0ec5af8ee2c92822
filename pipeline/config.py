"""Configuration: packaged defaults registered with dask.config, plus typed accessors.

The defaults live in ``elodin.yaml`` beside this module, one commented file, registered under
the ``elodin`` key of :mod:`dask.config` at import (like dask-jobqueue does), without writing
anything into the user's home. ``ELODIN__SECTION__KEY=value`` environment variables override
them with dask's own parsing rules; :func:`load_file` applies a user YAML on top.
"""

from __future__ import annotations

import ast
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import dask.config
import numpy as np
import yaml

from .errors import ConfigError

__all__ = [
    "DEFAULTS_PATH",
    "ENV_PREFIX",
    "INT_LIMIT",
    "cache_dir",
    "collect_env",
    "get",
    "get_choice",
    "get_float",
    "get_int",
    "load_file",
    "validate",
]

logger = logging.getLogger(__name__)

DEFAULTS_PATH = Path(__file__).with_name("elodin.yaml")
ENV_PREFIX = "ELODIN__"


def _read_defaults() -> dict:
    with open(DEFAULTS_PATH) as f:
        return yaml.safe_load(f)


def _parse_env_value(value: str) -> Any:
    # Same rule as dask.config.collect_env: Python literals where they parse, strings otherwise.
    try:
        return ast.literal_eval(value)
    except (SyntaxError, ValueError):
        lowered = value.strip().lower()
        if lowered in {"true", "false"}:
            return lowered == "true"
        if lowered in {"null", "none"}:
            return None
        return value


def collect_env(env: Mapping[str, str] | None = None) -> dict:
    """Turn ``ELODIN__A__B_C=1`` variables into ``{"elodin": {"a": {"b-c": 1}}}``."""
    env = os.environ if env is None else env
    out: dict = {}
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        parts = [p.lower().replace("_", "-") for p in name[len(ENV_PREFIX) :].split("__") if p]
        if not parts:
            continue
        node = out.setdefault("elodin", {})
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = _parse_env_value(value)
    return out


def _show(key: Any) -> str:
    """A key as the message shows it: quoted when it is not plain text (so a key holding a
    newline cannot break the one-line message)."""
    text = str(key)
    return (
        text if isinstance(key, str) and text.isprintable() and text.strip() == text else repr(key)
    )


def _unknown_keys(user: Mapping, defaults: Mapping, prefix: str) -> list[str]:
    bad = []
    for key, value in user.items():
        canon = str(key).replace("_", "-")
        if canon not in defaults:
            bad.append(f"{prefix}{_show(key)}")
        elif isinstance(defaults[canon], Mapping) and isinstance(value, Mapping):
            bad += _unknown_keys(value, defaults[canon], f"{prefix}{key}.")
        elif isinstance(defaults[canon], Mapping) and not isinstance(value, Mapping):
            bad.append(f"{prefix}{key} (expected a mapping)")
    return bad


# Keys whose default is a list but which also take one string.
_STRING_OR_LIST = {"elodin.run.inputs"}


def _type_error(value: Any, default: Any, key: str) -> str | None:
    """Why ``value`` cannot stand for ``default``'s type (None: it can).

    Only types that cannot be meant otherwise are checked: numbers, booleans, lists. Strings
    and null defaults take several forms (``providers: auto`` or a list, ``memory-limit: auto``
    or a number); their values are checked where they are used.
    """
    if value is None or default is None:
        return None
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "true or false"
    if isinstance(default, int):
        ok = isinstance(value, int | float) and not isinstance(value, bool) and value == int(value)
        return None if ok else "an integer"
    if isinstance(default, float):
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return None if ok else "a number"
    if isinstance(default, list):
        ok = isinstance(value, list) or (isinstance(value, str) and key in _STRING_OR_LIST)
        return None if ok else "a list"
    return None


def _wrong_types(user: Mapping, defaults: Mapping, prefix: str) -> list[str]:
    bad = []
    for key, value in user.items():
        canon = str(key).replace("_", "-")
        if canon not in defaults:
            continue
        default = defaults[canon]
        if isinstance(default, Mapping) and isinstance(value, Mapping):
            bad += _wrong_types(value, default, f"{prefix}{key}.")
            continue
        try:
            wanted = _type_error(value, default, f"{prefix}{canon}")
        except (OverflowError, ValueError):  # inf, nan where an integer is wanted
            wanted = "an integer"
        if wanted:
            bad.append(f"{prefix}{key} must be {wanted}, got {value!r}"[:200])
    return bad


def validate(user: Mapping, *, source: str) -> None:
    """Refuse keys that Elodin does not know and values of the wrong type, naming the file
    and the key.

    A typo such as ``batch_sise`` would otherwise be silently ignored and a survey run with
    the default instead of the intended value.
    """
    if not isinstance(user, Mapping):
        raise ConfigError(f"{source}: expected a YAML mapping at the top level")
    body = user.get("elodin", user)
    if not isinstance(body, Mapping):
        raise ConfigError(f"{source}: 'elodin' must be a mapping")
    defaults = _read_defaults()["elodin"]
    bad = _unknown_keys(body, defaults, "elodin.")
    if bad:
        raise ConfigError(f"{source}: unknown configuration key(s): {', '.join(sorted(bad))}")
    wrong = _wrong_types(body, defaults, "elodin.")
    if wrong:
        raise ConfigError(f"{source}: {'; '.join(wrong)}")


def load_file(path: str | os.PathLike) -> dict:
    """Read a user YAML (with or without a top-level ``elodin:`` key) and apply it.

    Returns the ``elodin`` mapping that was read. Only safe YAML loading is used.
    """
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read config file ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not a text (UTF-8) file") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        where = f" line {line + 1}" if line is not None else ""
        # Safe loading refuses tags that would build Python objects (!!python/object/apply...).
        refused = isinstance(e, yaml.constructor.ConstructorError)
        why = " (a tag that would build an object; only plain YAML is read)" if refused else ""
        raise ConfigError(f"{p}:{where} not valid YAML{why}") from None
    validate(data, source=str(p))
    body = data.get("elodin", data) if isinstance(data, Mapping) else {}
    dask.config.update(dask.config.config, {"elodin": body}, priority="new")
    # Precedence is defaults < user YAML < ELODIN__ variables < flags: re-apply the variables.
    env = collect_env()
    if env:
        dask.config.update(dask.config.config, env, priority="new")
    return body


def get(key: str, default: Any = ..., *, override: Any = None) -> Any:
    """``dask.config.get("elodin." + key)``, with an explicit value taking precedence.

    ``override`` is how flags win over config: ``get("fingerprint.batch-size", override=args.batch_size)``.
    """
    if override is not None:
        return override
    full = f"elodin.{key}"
    if default is ...:
        return dask.config.get(full)
    return dask.config.get(full, default)


# Past this no integer setting means anything (a tile, a batch, a sample of 2^31 rows), and
# well below it the int64 arithmetic of planning cannot overflow.
INT_LIMIT = 2**31 - 1


def _plain_number(value: Any) -> bool:
    """A real number a user can mean: int or float (numpy's too), not a bool."""
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(
        value, bool | np.bool_
    )


def get_int(
    key: str,
    *,
    override: Any = None,
    minimum: int | None = None,
    maximum: int | None = INT_LIMIT,
) -> int:
    """An integer setting, checked, with the key named when it is wrong.

    Floats with an integral value (``64.0``, ``1e3``) are taken; NaN, infinities, fractions,
    bools, strings and anything beyond ``maximum`` (default :data:`INT_LIMIT`) are refused.
    """
    value = get(key, override=override)
    if not _plain_number(value) or not math.isfinite(value) or int(value) != value:
        raise ConfigError(f"config elodin.{key}: expected an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"config elodin.{key}: must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"config elodin.{key}: must be <= {maximum}, got {value}")
    return int(value)


def get_float(key: str, *, override: Any = None) -> float:
    """A finite number setting (NaN and infinities are refused), with the key named."""
    value = get(key, override=override)
    if not _plain_number(value) or not math.isfinite(value):
        raise ConfigError(f"config elodin.{key}: expected a finite number, got {value!r}")
    return float(value)


def get_choice(key: str, choices: tuple[str, ...], *, override: Any = None) -> str:
    value = get(key, override=override)
    if value not in choices:
        raise ConfigError(f"config elodin.{key}: {value!r} is not one of {', '.join(choices)}")
    return value


def cache_dir() -> Path:
    """Directory for exported models: config ``cache-dir`` or the user's cache dir."""
    configured = get("cache-dir", None)
    if configured:
        return Path(os.path.expanduser(str(configured)))
    import platformdirs

    return Path(platformdirs.user_cache_dir("elodin")) / "models"


def _register() -> None:
    defaults = _read_defaults()
    dask.config.update_defaults(defaults)
    env = collect_env()
    if env:
        dask.config.update(dask.config.config, env, priority="new")


_register()
