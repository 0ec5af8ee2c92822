"""The explorer's HTTP API (tornado handlers served beside the Bokeh app).

``GET /api/summary``, ``GET /api/cutout/ROW.png``, ``GET /api/similar/ROW?n=9``,
``POST /api/label`` (``{"row": ..., "label": ...}``, or ``{"rows": [...], "label": ...}``
for a selection), ``GET /api/label/ROW``,
``GET /api/labels``, ``GET /api/ranked?n=``, ``GET /api/outliers?page=&n=``,
``POST /api/export`` (``{"rows": [...]}``, ``{"box": [x0, x1, y0, y1]}`` or a lasso's
``{"polygon": [[x, y], ...]}``), ``GET /api/exports/NAME`` (a catalog written by an export)
and ``GET /api/map.png?by=NAME&x0=&x1=&y0=&y1=`` (the map coloured by any of the summary's
``colour_by``, over the whole map or that box).

Every bad request is a 4xx JSON ``{"error": "..."}``. Path parameters are matched by a
catch-all and then parsed strictly (digits only, inside the store), so request text never
becomes a file path. Requests must name the server's own host (a page on another site that
rebinds a DNS name to 127.0.0.1 is refused), and POST bodies must be ``application/json``
(which a cross-site form cannot send without a CORS preflight, which this server never grants).
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tornado.web

from .. import config
from ..errors import ConfigError, ElodinError, StoreError
from .data import Explorer, RowError
from .labels import LABELS, LabelRefused

__all__ = ["Exports", "patterns"]

logger = logging.getLogger(__name__)

MAX_N = 1000
MAX_BODY = 1 << 24  # 16 MiB: a selection of ~10^6 rows as JSON


class Exports:
    """Catalogs of selections written by this server, named by the server, never by a request."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.files: dict[str, Path] = {}

    def write(self, explorer: Explorer, rows: Sequence[int], *, fmt: str = "parquet") -> dict:
        if fmt not in ("parquet", "fits", "ecsv"):
            raise ConfigError(f"format {fmt[:20]!r}: expected parquet, fits or ecsv")
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        name = f"selection-{stamp}-{len(self.files) + 1}.{fmt}"
        result = explorer.export(rows, self.directory / name)
        self.files[name] = Path(result.path)
        return {"path": result.path, "rows": result.n_rows, "url": f"/api/exports/{name}"}


def _n(handler: tornado.web.RequestHandler, name: str, default: int, *, minimum: int = 1) -> int:
    text = handler.get_query_argument(name, None)
    if text is None:
        return default
    if not (0 < len(text) <= 7 and text.isascii() and text.isdigit()):
        raise ConfigError(f"{name}={text[:20]!r}: expected a whole number")
    value = int(text)
    if not minimum <= value <= MAX_N:
        raise ConfigError(f"{name}={value}: expected {minimum}..{MAX_N}")
    return value


class ApiHandler(tornado.web.RequestHandler):
    """JSON errors, host checks and off-loop work for every API handler."""

    def initialize(
        self, explorer: Explorer, exports: Exports, hosts: set[str], renderer=None
    ) -> None:
        self.explorer = explorer
        self.exports = exports
        self.hosts = hosts
        self.renderer = renderer

    def prepare(self) -> None:
        if self.hosts and self.request.host.lower() not in self.hosts:
            raise tornado.web.HTTPError(403, reason="unknown host")

    def set_default_headers(self) -> None:
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.set_header("X-Content-Type-Options", "nosniff")

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        message = self._reason
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, tornado.web.HTTPError) and exc.log_message:
            message = exc.log_message
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(json.dumps({"error": message}))

    def fail(self, status: int, message: str) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(json.dumps({"error": " ".join(str(message).splitlines())}))

    async def run(self, fn: Callable, *args) -> None:
        """Answer with ``fn(*args)`` computed off the IO loop; user errors become 4xx JSON."""
        from tornado.ioloop import IOLoop

        try:
            result = await IOLoop.current().run_in_executor(None, fn, *args)
        except RowError as e:
            return self.fail(e.status, str(e))
        except LabelRefused as e:
            return self.fail(409, str(e))
        except ConfigError as e:
            return self.fail(400, str(e))
        except StoreError as e:
            return self.fail(409, str(e))
        except ElodinError as e:  # e.g. a source image that is gone
            return self.fail(410, str(e))
        if isinstance(result, bytes):
            self.set_header("Content-Type", "image/png")
            self.set_header("Cache-Control", "private, max-age=600")
            self.finish(result)
        else:
            self.finish(json.dumps(result))

    def json_body(self) -> dict:
        ctype = self.request.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise ConfigError("the body must be JSON (Content-Type: application/json)")
        if len(self.request.body) > MAX_BODY:
            raise ConfigError("the body is too large")
        try:
            body = json.loads(self.request.body)
        except (ValueError, UnicodeDecodeError):
            raise ConfigError("the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ConfigError("the body must be a JSON object")
        return body

    def row_field(self, body: dict) -> int:
        row = body.get("row")
        if isinstance(row, bool) or not isinstance(row, int):
            raise ConfigError(f"row {str(row)[:40]!r}: expected a row number")
        if row < 0:
            raise RowError(f"row {row}: expected a row number (0..{self.explorer.n_rows - 1})")
        return self.explorer.row(str(row))


class Summary(ApiHandler):
    async def get(self) -> None:
        await self.run(self.explorer.summary)


_PNG = re.compile(r"(\d{1,12})\.png")


class Cutout(ApiHandler):
    async def get(self, text: str) -> None:
        m = _PNG.fullmatch(text)
        if m is None:
            return self.fail(400, f"{text[:40]!r}: expected ROW.png")
        await self.run(lambda: self.explorer.cutout_png(self.explorer.row(m.group(1))))


class Similar(ApiHandler):
    async def get(self, text: str) -> None:
        try:
            row = self.explorer.row(text)
            n = _n(self, "n", config.get_int("explore.n-similar", minimum=1))
        except RowError as e:
            return self.fail(e.status, str(e))
        except ConfigError as e:
            return self.fail(400, str(e))
        await self.run(lambda: {"query": row, "results": self.explorer.similar(row, n)})


class Label(ApiHandler):
    async def get(self, text: str) -> None:
        def answer():
            row = self.explorer.row(text)
            return {"row": row, "label": self.explorer.labels.get(row)}

        await self.run(answer)

    async def post(self, text: str = "") -> None:
        if text:
            return self.fail(405, 'POST /api/label with {"row": ..., "label": ...}')
        try:
            body = self.json_body()
            row = _valid_rows(self.explorer, body) if "rows" in body else self.row_field(body)
            label = body.get("label")
            if not isinstance(label, str) or label not in LABELS:
                raise ConfigError(f"label {str(label)[:40]!r}: expected one of {', '.join(LABELS)}")
        except RowError as e:
            return self.fail(e.status, str(e))
        except ConfigError as e:
            return self.fail(400, str(e))
        await self.run(self.explorer.labels.set, row, label)


class LabelList(ApiHandler):
    async def get(self) -> None:
        labels = self.explorer.labels
        await self.run(lambda: {"counts": labels.counts(), "log": labels.log()})


class Ranked(ApiHandler):
    async def get(self) -> None:
        try:
            n = _n(self, "n", config.get_int("explore.gallery", minimum=1))
        except ConfigError as e:
            return self.fail(400, str(e))
        await self.run(self.explorer.labels.ranked, n)


class Outliers(ApiHandler):
    async def get(self) -> None:
        try:
            n = _n(self, "n", config.get_int("explore.gallery", minimum=1))
            page = _n(self, "page", 0, minimum=0)
        except ConfigError as e:
            return self.fail(400, str(e))
        await self.run(self.explorer.outliers, page, n)


class Export(ApiHandler):
    async def post(self) -> None:
        try:
            body = self.json_body()
            rows = _selection(self.explorer, body)
            fmt = body.get("format", "parquet")
            if not isinstance(fmt, str):
                raise ConfigError("format: expected parquet, fits or ecsv")
        except RowError as e:
            return self.fail(e.status, str(e))
        except ConfigError as e:
            return self.fail(400, str(e))
        await self.run(lambda: self.exports.write(self.explorer, rows, fmt=fmt))


class Download(ApiHandler):
    def get(self, name: str) -> None:
        path = self.exports.files.get(name)  # only names this server made
        if path is None or not path.exists():
            return self.fail(404, f"{name[:40]!r}: no such export")
        self.set_header("Content-Type", "application/octet-stream")
        self.set_header("Content-Disposition", f'attachment; filename="{path.name}"')
        self.finish(path.read_bytes())


class MapImage(ApiHandler):
    async def get(self) -> None:
        ex = self.explorer
        by = self.get_query_argument("by", "density")
        x0, x1, y0, y1 = ex.extent
        try:
            if by not in ex.colour_options():
                raise ConfigError(
                    f"by={by[:40]!r}: expected one of {', '.join(ex.colour_options())}"
                )
            box = [_float(self, k, d) for k, d in (("x0", x0), ("x1", x1), ("y0", y0), ("y1", y1))]
        except ConfigError as e:
            return self.fail(400, str(e))
        if self.renderer is None:
            return self.fail(404, "no map renderer in this server")
        await self.run(self.renderer.png, by, box[:2], box[2:])


def _float(handler: tornado.web.RequestHandler, name: str, default: float) -> float:
    text = handler.get_query_argument(name, None)
    if text is None:
        return float(default)
    try:
        value = float(text) if len(text) <= 32 else float("nan")
    except ValueError:
        value = float("nan")
    if not np.isfinite(value):
        raise ConfigError(f"{name}={text[:20]!r}: expected a finite number")
    return value


class NotFound(ApiHandler):
    def get(self, *args) -> None:
        self.fail(404, f"no API at {self.request.path[:80]!r}")

    post = get


def _valid_rows(explorer: Explorer, body: dict) -> np.ndarray:
    """The ``rows`` of a request, each a valid row (labels go on cutouts, not empty slots)."""
    rows = _selection(explorer, {"rows": body.get("rows")})
    at = np.searchsorted(explorer.rows, rows)
    bad = (at >= len(explorer.rows)) | (
        explorer.rows[np.minimum(at, len(explorer.rows) - 1)] != rows
    )
    if bad.any():
        raise RowError(f"row {int(rows[np.argmax(bad)])} is an empty slot (no cutout there)", 404)
    return rows


def _selection(explorer: Explorer, body: dict) -> np.ndarray:
    """Store rows of an export request: ``rows`` (valid rows), a map ``box`` or a lasso's
    ``polygon``."""
    if "polygon" in body:
        poly = body["polygon"]
        if (
            not isinstance(poly, list)
            or not 3 <= len(poly) <= 100_000
            or not all(
                isinstance(p, list)
                and len(p) == 2
                and all(isinstance(v, int | float) and not isinstance(v, bool) for v in p)
                for p in poly
            )
        ):
            raise ConfigError("polygon: expected [[x, y], ...], three or more pairs of numbers")
        xy = np.asarray(poly, np.float64)
        return explorer.in_polygon(xy[:, 0], xy[:, 1])
    if "box" in body:
        box = body["box"]
        if (
            not isinstance(box, list)
            or len(box) != 4
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in box)
            or not all(np.isfinite(box))
        ):
            raise ConfigError("box: expected [x0, x1, y0, y1], four finite numbers")
        return explorer.in_box(*(float(v) for v in box))
    rows = body.get("rows")
    if not isinstance(rows, list) or not rows:
        raise ConfigError('expected {"rows": [ROW, ...]} or {"box": [x0, x1, y0, y1]}')
    if not all(isinstance(r, int) and not isinstance(r, bool) for r in rows):
        raise ConfigError("rows: expected row numbers")
    out = np.unique(np.asarray(rows, np.int64))
    if out[0] < 0 or out[-1] >= explorer.n_rows:
        raise RowError(f"rows must lie in 0..{explorer.n_rows - 1}", 404)
    return out


def patterns(explorer: Explorer, exports: Exports, hosts: set[str], renderer=None) -> list[tuple]:
    """Tornado URL patterns of the API (for Bokeh's ``Server(extra_patterns=...)``)."""
    kw = {"explorer": explorer, "exports": exports, "hosts": hosts, "renderer": renderer}
    return [
        (r"/api/summary", Summary, kw),
        (r"/api/cutout/(.*)", Cutout, kw),
        (r"/api/similar/(.*)", Similar, kw),
        (r"/api/label", Label, kw),
        (r"/api/label/(.*)", Label, kw),
        (r"/api/labels", LabelList, kw),
        (r"/api/ranked", Ranked, kw),
        (r"/api/outliers", Outliers, kw),
        (r"/api/export", Export, kw),
        (r"/api/exports/(.*)", Download, kw),
        (r"/api/map\.png", MapImage, kw),
        (r"/api(/.*)?", NotFound, kw),
    ]
