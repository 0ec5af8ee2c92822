"""Property-based fuzzing of what users hand in: config files, catalogs and numbers.

A config file is accepted or refused with a ConfigError; a catalog is read into a table (and
placed on an image) or refused with a CatalogError; a number (a cutout size, stride, tile size,
HDU, preprocessing parameter) is taken or refused with one line. Never any other exception:
those would reach the user as a traceback. Examples per test and the seed come from the
Hypothesis profile (tests/conftest.py: ``ci`` by default, ``HYPOTHESIS_PROFILE=deep`` for more).
"""

from __future__ import annotations

import copy
import functools
import tempfile
from pathlib import Path

import dask.config
import numpy as np
import pytest
import yaml
from astropy.io import fits
from astropy.wcs import WCS
from hypothesis import event, example, given
from hypothesis import strategies as st

from pipeline import config
from pipeline.catalog import catalog_to_windows, read_catalog
from pipeline.errors import CatalogError, ConfigError

# Unusual ECSV datatypes and unknown units are what astropy warns about while reading them.
pytestmark = pytest.mark.filterwarnings("ignore::astropy.utils.exceptions.AstropyWarning")
WORK = Path(tempfile.mkdtemp(prefix="elodin-fuzz-"))


def _restoring_config(fn):
    """load_file changes dask.config in place: every example starts from the same settings."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        saved = copy.deepcopy(dask.config.config.get("elodin"))
        try:
            return fn(*args, **kwargs)
        finally:
            dask.config.config["elodin"] = saved

    return wrapper


# ----------------------------------------------------------------------------------- configs
def _paths(node, prefix=()):
    for key, value in node.items():
        yield (*prefix, key)
        if isinstance(value, dict):
            yield from _paths(value, (*prefix, key))


def _default(path):
    node = DEFAULTS
    for key in path:
        node = node[key]
    return node


DEFAULTS = config._read_defaults()["elodin"]
KNOWN = sorted(_paths(DEFAULTS))
LEAVES = [p for p in KNOWN if not isinstance(_default(p), dict)]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


def _like(default):
    """Values of the default's own type (in range or not): what a user means to write."""
    if isinstance(default, bool):
        return st.booleans()
    if isinstance(default, int):
        return st.integers(-3, 5000)
    if isinstance(default, float):
        return st.floats(-1, 1e3, allow_nan=False)
    if isinstance(default, str):
        return st.one_of(st.just(default), st.text(max_size=8))
    if isinstance(default, list):
        return st.lists(st.text(max_size=6), max_size=3)
    return values


@st.composite
def config_documents(draw):
    """A mapping of known keys (some misspelt, some with `_`) to values of their own type
    (most of the time) or of any type."""
    doc: dict = {}
    for path in draw(st.lists(st.sampled_from(KNOWN), max_size=6)):
        default = _default(path)
        fitting = not isinstance(default, dict) and draw(st.integers(0, 2)) > 0
        value = draw(_like(default) if fitting else values)
        if draw(st.booleans()):
            path = (*path[:-1], path[-1].replace("-", "_"))
        if draw(st.integers(0, 9)) == 0:
            path = (*path[:-1], path[-1] + draw(st.text(min_size=1, max_size=3)))
        node = doc
        for key in path[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                break
            node = child
        else:
            node[path[-1]] = value
    return {"elodin": doc} if draw(st.booleans()) else doc


def _load(text: str | bytes):
    path = WORK / "fuzz.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        body = config.load_file(path)
    except ConfigError as e:
        assert str(path) in str(e) and "\n" not in str(e)
        event("refused")
        return None
    event("accepted")
    return body


def _settings_after_load():
    """What a run reads next: every setting of the fingerprint stage, checked."""
    from pipeline.fingerprint import fingerprint_settings

    try:
        fingerprint_settings()
    except ConfigError as e:
        assert "\n" not in str(e)


@given(doc=config_documents())
@_restoring_config
def test_config_mappings_are_accepted_or_refused_with_one_line(doc):
    try:
        text = yaml.safe_dump(doc, allow_unicode=True)
    except yaml.YAMLError:
        return
    if _load(text) is not None:
        _settings_after_load()


@given(doc=values)
@_restoring_config
def test_any_yaml_value_at_the_top(doc):
    if _load(yaml.safe_dump(doc, allow_unicode=True)) is not None:
        _settings_after_load()


@given(raw=st.one_of(st.binary(max_size=200), st.text(max_size=200)))
@_restoring_config
def test_arbitrary_bytes_and_text(raw):
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogatepass")
    _load(raw)


@given(path=st.sampled_from(LEAVES), value=values)
def test_wrong_types_for_known_keys(path, value):
    node = _default(path)
    doc: dict = {}
    target = doc
    for key in path[:-1]:
        target = target.setdefault(key, {})
    target[path[-1]] = value
    try:
        config.validate({"elodin": doc}, source="fuzz.yaml")
    except ConfigError as e:
        assert "fuzz.yaml" in str(e)
        return
    # Accepted: numbers and booleans where the defaults have them.
    if isinstance(node, bool) and value is not None:
        assert isinstance(value, bool)
    elif isinstance(node, int | float) and not isinstance(node, bool) and value is not None:
        assert isinstance(value, int | float) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------- catalogs
@functools.cache
def _image():
    from pipeline.sources import open_sources

    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, 2.0]
    w.wcs.crpix = [32, 32]
    w.wcs.cdelt = [-1 / 3600, 1 / 3600]
    path = WORK / "image.fits"
    fits.PrimaryHDU(np.zeros((64, 64), np.float32), header=w.to_header()).writeto(
        path, overwrite=True
    )
    return open_sources([str(path)])


NAMES = ["ra", "dec", "RA", "DEC", "x", "y", "X_IMAGE", "image", "size", "flux", "ra_deg"]
PAIRS = [("ra", "dec"), ("RA", "DEC"), ("ra_deg", "dec"), ("x", "y"), ("X_IMAGE", "y")] * 3 + [
    ("ra",),
    ("x", "dec"),
]
cells = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-100, 100).map(str),
    st.sampled_from(["", "nan", "inf", "-inf", "north", "1e400", "0x10", '"1,2"', "image"]),
    st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=6),
)
# Mostly values that could be right (on or near the 64 x 64 image), so that most catalogs get
# past reading and are placed; the rest anything at all.
PLAUSIBLE = {
    "ra": st.floats(149.991, 150.009),
    "ra_deg": st.floats(149.991, 150.009),
    "dec": st.floats(1.991, 2.009),
    "x": st.floats(-5, 68),
    "y": st.floats(-5, 68),
    "x_image": st.floats(-5, 68),
    "size": st.floats(-2, 40),
    "flux": st.floats(0, 1e4),
    "image": st.sampled_from(["image", "image.fits", "other"]),
}


@st.composite
def _columns(draw) -> list[str]:
    names = list(draw(st.sampled_from(PAIRS)))
    extras = draw(st.lists(st.one_of(st.sampled_from(NAMES), st.text(max_size=5)), max_size=2))
    names += [e for e in extras if e not in names]
    return draw(st.permutations(names))


def _cell(draw, name: str) -> str:
    plausible = PLAUSIBLE.get(name.lower())
    if plausible is not None and draw(st.integers(0, 19)) < 19:
        value = draw(plausible)
        return value if isinstance(value, str) else repr(value)
    return draw(cells)


@st.composite
def csv_texts(draw):
    names = draw(_columns())
    lines = [",".join(names)]
    for _ in range(draw(st.integers(0, 5))):
        row = [_cell(draw, n) for n in names]
        ragged = draw(st.integers(0, 49))
        if ragged == 0:
            row = row[:-1]
        elif ragged == 1:
            row.append(draw(cells))
        lines.append(",".join(row))
    return "\n".join(lines) + draw(st.sampled_from(["\n", "", "\n\n"])), draw(_size_of(names))


@st.composite
def ecsv_texts(draw):
    names = draw(_columns())
    types = [
        draw(st.sampled_from(["float64"] * 12 + ["int64", "string", "bool", "float32", "complex"]))
        for _ in names
    ]
    units = [
        draw(st.sampled_from([None] * 3 + ["deg", "hourangle", "arcsec", "pix", "m", "foo"]))
        for _ in names
    ]
    header = ["# %ECSV 1.0", "# ---", "# datatype:"]
    for name, dtype, unit in zip(names, types, units, strict=True):
        header.append(
            f"# - {{name: '{name}', datatype: {dtype}" + (f", unit: {unit}" if unit else "") + "}"
        )
    if draw(st.booleans()):
        header.append("# schema: astropy-2.0")
    rows = [
        " ".join(_cell(draw, n).replace(" ", "") or '""' for n in names)
        for _ in range(draw(st.integers(0, 4)))
    ]
    text = "\n".join([*header, " ".join(f'"{n}"' for n in names), *rows]) + "\n"
    return text, draw(_size_of(names))


def _size_of(names):
    """The size column asked for: none, one of the table's, or one it does not have."""
    return st.one_of(st.none(), st.none(), st.sampled_from(names), st.just("size"))


def _read_and_place(text: str, size_column: str | None = None, *, suffix: str):
    path = WORK / f"cat{suffix}"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    cfg = {"size-column": size_column} if size_column else None
    try:
        table = read_catalog(path, config=cfg)
    except CatalogError as e:
        assert str(path) in str(e) and "\n" not in str(e)
        event("refused when read: " + str(e).split(": ", 1)[1][:30])
        return
    info = table.meta["elodin"]
    for name in (info["lon"], info["lat"]):
        assert table[name].dtype == np.float64 and np.isfinite(table[name]).all()
    try:
        plans, report = catalog_to_windows(table, _image(), size=8, tile_size=32, config=cfg)
    except CatalogError as e:
        assert str(path) in str(e) and "\n" not in str(e)
        event("refused when placed")
        return
    event("placed" if report.n_placed else "read, no rows")
    assert report.n_placed + report.n_outside == len(table)
    assert sum(p.n_windows for p in plans) == report.n_placed


@given(case=csv_texts())
def test_csv_catalogs_are_read_or_refused_with_one_line(case):
    _read_and_place(*case, suffix=".csv")


# Found by fuzzing: a size column of 9.2e18 pixels wrapped around to a negative int64 side.
HUGE_SIZE_ECSV = """# %ECSV 1.0
# ---
# datatype:
# - {name: 'x', datatype: float64}
# - {name: 'y', datatype: float64}
# - {name: 'size', datatype: float64}
"x" "y" "size"
10.0 10.0 9.2e18
"""


@given(case=ecsv_texts())
@example(case=(HUGE_SIZE_ECSV, "size"))
@example(case=(HUGE_SIZE_ECSV.replace("9.2e18", "1e300"), "size"))
def test_ecsv_catalogs_are_read_or_refused_with_one_line(case):
    _read_and_place(*case, suffix=".ecsv")


def test_the_checks_see_both_outcomes():
    """A good catalog is placed, a bad one refused; a good config accepted, a bad refused."""
    (WORK / "good.csv").write_text("ra,dec\n150.0,2.0\n150.001,2.001\n")
    _, report = catalog_to_windows(read_catalog(WORK / "good.csv"), _image(), size=8)
    assert report.n_placed == 2
    (WORK / "bad.csv").write_text("ra,dec\n150.0,north\n")
    try:
        read_catalog(WORK / "bad.csv")
        raise AssertionError("a text coordinate was accepted")
    except CatalogError as e:
        assert "row 0" in str(e)
    config.validate({"elodin": {"fingerprint": {"batch-size": 8}}}, source="ok.yaml")
    try:
        config.validate({"elodin": {"fingerprint": {"batch-size": "8"}}}, source="bad.yaml")
        raise AssertionError("a string batch size was accepted")
    except ConfigError as e:
        assert "bad.yaml" in str(e) and "batch-size" in str(e)


# ----------------------------------------------------------------------------------- numbers
# What a flag, a YAML file or an ELODIN__ variable can put where an integer is wanted.
numbers = st.one_of(
    st.integers(1, 300),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
)


@given(
    size=numbers,
    stride=numbers,
    tile_size=numbers,
    edge=st.sampled_from(["shift", "pad", "drop"]),
)
@example(size=64, stride=2**70, tile_size=64, edge="shift")  # OverflowError in np.arange * stride
@example(size=2**40, stride=2**40, tile_size=64, edge="pad")  # a 2^40-pixel window planned
@example(size=8, stride=8, tile_size=2**70, edge="shift")
def test_sliding_numbers_are_planned_or_refused_with_one_line(size, stride, tile_size, edge):
    from pipeline.errors import InputError
    from pipeline.tiling import MAX_WINDOW_SIDE, plan_image

    try:
        plan = plan_image(
            (100, 120), method="sliding", size=size, stride=stride, tile_size=tile_size, edge=edge
        )
    except (ConfigError, InputError) as e:
        assert "\n" not in str(e)
        event("refused")
        return
    event("planned")
    assert plan.n_windows >= 1 and (plan.windows[:, 2:] == size).all()
    assert size <= MAX_WINDOW_SIDE


@given(
    hdu=st.one_of(
        st.integers(-(2**70), 2**70).map(str),
        st.sampled_from(["0", "-1", "+0", "1", "²", "١", "1.5", "1e3", " 0 ", "PRIMARY", "SCI"]),
        st.text(max_size=4),
    ),
    in_spec=st.booleans(),
)
@example(hdu="²", in_spec=False)  # str.isdigit() but not int(): a ValueError from --hdu
@example(hdu=str(2**70), in_spec=True)
def test_hdu_numbers_open_or_are_refused_with_one_line(hdu, in_spec):
    """``file.fits[HDU]`` and ``--hdu HDU`` (one rule for both)."""
    from pipeline.cli import _hdu
    from pipeline.errors import InputError
    from pipeline.sources import open_sources

    path = _image()[0].paths[0]
    try:
        if in_spec:
            sources = open_sources([f"{path}[{hdu}]"])
        else:
            sources = open_sources([path], hdu=_hdu(hdu))
    except InputError as e:
        assert "\n" not in str(e)
        event("refused")
        return
    event("opened")
    assert sources[0].shape[-2:] == (64, 64)


@given(
    key=st.sampled_from(["percentile", "asinh-a", "log-a", "lupton-q", "lupton-stretch"]),
    value=numbers,
)
@example(key="percentile", value=float("nan"))  # passed both bound checks, then cast to int64
@example(key="asinh-a", value=float("inf"))
def test_preprocess_numbers_are_finite_or_refused_with_one_line(key, value):
    import math

    from pipeline.preprocess import preprocess_settings

    try:
        settings = preprocess_settings({key: value})
    except ConfigError as e:
        assert str(e).startswith(f"config elodin.preprocess.{key}: ") and "\n" not in str(e)
        return
    assert math.isfinite(settings[key])
