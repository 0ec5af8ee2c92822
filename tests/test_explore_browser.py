"""The explorer's page in a real Chromium (Debian's, through Playwright), served by the real
``elodin explore`` process: it loads without console errors, the map renders and re-renders
on zoom, hovering a point shows its thumbnail, a click shows the cutout and its neighbours, a
label set in the page (button and key) survives a restart, and a box selection exports
exactly the rows inside the box."""

from __future__ import annotations

import os

import numpy as np
import pytest
from explore_store import ExplorerProcess, http

from pipeline.store import Store

CHROMIUM = next(
    (p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser") if os.access(p, os.X_OK)),
    None,
)
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (run .ci/install-browser.sh)"),
]

# The map's view, its canvas position and the screen position of every drawn point.
_MAP_JS = """() => {
  const doc = Bokeh.documents[0];
  const root = Object.values(Bokeh.index)[0];
  const v = root.owner.get_one(doc.get_model_by_name('map'));
  const r = v.canvas_view.el.getBoundingClientRect();
  const d = doc.get_model_by_name('map-points').data;
  const img = doc.get_model_by_name('map-image').data;
  const pix = img.image[0];
  let drawn = 0;
  for (let i = 0; i < pix.length; i++) if (pix[i] >>> 24) drawn++;
  return {
    left: r.left, top: r.top, drawn: drawn, dw: img.dw[0], size: pix.length,
    frame: [v.frame.bbox.left, v.frame.bbox.top, v.frame.bbox.width, v.frame.bbox.height],
    points: Array.from(d.row).map((row, i) =>
      [r.left + v.frame.x_scale.compute(d.px[i]), r.top + v.frame.y_scale.compute(d.py[i]), Number(row)]),
  };
}"""
_INVERT_JS = """([sx, sy]) => {
  const doc = Bokeh.documents[0];
  const v = Object.values(Bokeh.index)[0].owner.get_one(doc.get_model_by_name('map'));
  const r = v.canvas_view.el.getBoundingClientRect();
  return [v.frame.x_scale.invert(sx - r.left), v.frame.y_scale.invert(sy - r.top)];
}"""


@pytest.fixture(scope="module")
def store(explorer_store):
    return explorer_store


@pytest.fixture
def fresh(explorer_copy):
    return explorer_copy


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        try:
            yield b
        finally:
            b.close()


class Page:
    """A page of the explorer that records console errors and failed requests."""

    def __init__(self, browser, url: str) -> None:
        self.problems: list[str] = []
        self.page = browser.new_page(viewport={"width": 1400, "height": 1300})
        self.page.on(
            "console",
            lambda m: self.problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None,
        )  # fmt: skip
        self.page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        self.page.on("requestfailed", lambda r: self.problems.append(f"failed {r.url}"))
        self.page.on(
            "response",
            lambda r: self.problems.append(f"{r.status} {r.url}") if r.status >= 400 else None,
        )  # fmt: skip
        self.page.goto(url)
        self.page.wait_for_function(
            "() => window.Bokeh && Object.keys(Bokeh.index).length > 0 && "
            "Bokeh.documents[0].get_model_by_name('map-points').data.row.length > 0",
            timeout=60000,
        )

    def map(self) -> dict:
        return self.page.evaluate(_MAP_JS)

    def click_row(self, index: int = 0) -> int:
        x, y, row = self.map()["points"][index]
        self.page.mouse.click(x, y)
        self.page.locator(f'.elodin-details [data-row="{row}"]').wait_for(timeout=30000)
        return row

    def images_loaded(self, selector: str) -> list[bool]:
        return self.page.locator(selector).evaluate_all(
            "imgs => imgs.map(i => i.complete && i.naturalWidth > 0)"
        )

    def select(self, tool: str, fractions) -> np.ndarray:
        """Drag ``tool`` (``box-select``, ``lasso-select``) through ``fractions`` of the map's
        frame (a box: two corners; a lasso: its vertices, closed back to the first); returns
        the drag's points in data coordinates."""
        p = self.page
        p.evaluate(f"() => {{ Bokeh.documents[0].get_model_by_name('{tool}').active = true; }}")
        m = self.map()
        left, top, w, h = m["frame"]
        screen = [(m["left"] + left + fx * w, m["top"] + top + fy * h) for fx, fy in fractions]
        path = screen[1:] + (screen[:1] if len(screen) > 2 else [])
        p.mouse.move(*screen[0])
        p.mouse.down()
        for pt in path:
            p.mouse.move(*pt, steps=8 if len(screen) == 2 else 6)
        p.mouse.up()
        return np.array([p.evaluate(_INVERT_JS, list(pt)) for pt in screen])

    def selection_gallery(self, rows: np.ndarray) -> list[int]:
        """Open the Selection tab, wait for its count to be ``len(rows)``; the rows shown."""
        p = self.page
        p.get_by_text("Selection", exact=True).click()
        p.locator(f'.elodin-selection .selection-count[data-count="{len(rows)}"]').wait_for(
            timeout=30000
        )
        shown = p.locator('.elodin-selection .gallery[data-kind="selection"] figure')
        return [int(r) for r in shown.evaluate_all("fs => fs.map(f => f.dataset.row)")]

    def close(self) -> None:
        self.page.close()


def test_page_map_hover_click_and_neighbours(browser, fresh, tmp_path):
    from pipeline.analysis import similar

    with ExplorerProcess(fresh) as server:
        page = Page(browser, server.url)
        p = page.page
        m = page.map()
        assert m["size"] > 0 and m["drawn"] > 0  # the datashader image has pixels
        assert len(m["points"]) == http(server.url + "api/summary")[2]["rows"]
        # Hover a point: the tooltip shows its thumbnail from the cutout API.
        x, y, row = m["points"][5]
        p.mouse.move(x, y)
        tip = p.locator(".bk-Tooltip img")
        tip.first.wait_for(timeout=15000)
        assert tip.first.get_attribute("src") == f"/api/cutout/{row}.png"
        tip.first.evaluate(
            "img => img.complete && img.naturalWidth > 0 ? true : "
            "new Promise(ok => img.addEventListener('load', () => ok(true)))"
        )
        # Click: the cutout, its facts and the gallery of its neighbours.
        row = page.click_row(7)
        details = p.locator(".elodin-details")
        assert f"/api/cutout/{row}.png" in details.locator("img").get_attribute("src")
        text = details.locator("table").inner_text()
        assert "RA, Dec" in text and "cluster" in text and "outlier score" in text
        gallery = p.locator('.elodin-neighbours .gallery[data-kind="neighbours"] figure')
        gallery.first.wait_for(timeout=30000)
        want = similar(fresh, cutout=row, n=9)
        rows = [int(r) for r in gallery.evaluate_all("fs => fs.map(f => f.dataset.row)")]
        assert rows == list(want["index"])
        _wait_images(page, ".elodin-neighbours img", 9)
        # Zoom (mouse wheel over the map): the server renders the new view.
        left, top, w, h = m["frame"]
        p.mouse.move(m["left"] + left + w / 2, m["top"] + top + h / 2)
        p.mouse.wheel(0, -600)
        p.wait_for_function(
            f"() => Bokeh.documents[0].get_model_by_name('map-image').data.dw[0] < {m['dw']} * 0.9",
            timeout=30000,
        )
        # Colour by outlier score: the legend says so once the server has re-rendered.
        p.locator("select.bk-input").first.select_option("outlier_score")
        p.locator(".elodin-legend").get_by_text("mean outlier score").wait_for(timeout=30000)
        p.screenshot(path=str(tmp_path / "explorer.png"))
        page.close()
    assert page.problems == []


def _wait_images(page: Page, selector: str, n: int) -> None:
    """Every image under ``selector`` (at least ``n``) has loaded (its load event, if not yet)."""
    imgs = page.page.locator(selector)
    assert imgs.count() >= n
    for i in range(imgs.count()):
        img = imgs.nth(i)
        img.scroll_into_view_if_needed()
        assert img.evaluate(
            "img => img.complete ? img.naturalWidth > 0 : new Promise(ok => {"
            " img.addEventListener('load', () => ok(img.naturalWidth > 0));"
            " img.addEventListener('error', () => ok(false)); })"
        )


def test_a_label_set_in_the_page_survives_a_restart(browser, fresh):
    with ExplorerProcess(fresh) as server:
        page = Page(browser, server.url)
        row = page.click_row(3)
        page.page.locator(".elodin-label-interesting button").click()
        page.page.locator(".elodin-status .saved").wait_for(timeout=30000)
        page.page.locator(f'.elodin-details [data-row="{row}"][data-label="interesting"]').wait_for(
            timeout=30000
        )
        # A key labels the picked cutout too.
        other = page.click_row(11)
        page.page.keyboard.press("n")
        page.page.locator(
            f'.elodin-details [data-row="{other}"][data-label="not_interesting"]'
        ).wait_for(timeout=30000)
        page.close()
    assert page.problems == []
    labels = Store.open(fresh).array("label")[...]
    assert labels[row] == 1 and labels[other] == 0
    with ExplorerProcess(fresh) as server:  # a new process reads them back
        page = Page(browser, server.url)
        assert page.click_row(3) == row
        page.page.locator(f'.elodin-details [data-row="{row}"][data-label="interesting"]').wait_for(
            timeout=30000
        )
        page.close()
    assert page.problems == []


def test_a_locked_store_refuses_labels_in_the_page(browser, fresh):
    import subprocess
    import sys

    from explore_store import ROOT

    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; from pipeline.store import Store; l = Store.lock(sys.argv[1]); "
         "print('locked', flush=True); sys.stdin.read()", str(fresh)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        with ExplorerProcess(fresh) as server:
            page = Page(browser, server.url)
            page.click_row(2)
            page.page.locator(".elodin-label-interesting button").click()
            refused = page.page.locator(".elodin-status .refused")
            refused.wait_for(timeout=30000)
            assert "another run is writing" in refused.inner_text()
            page.close()
    finally:
        holder.communicate("")
    assert "label" not in {p.name for p in fresh.iterdir()}


def test_a_box_selection_exports_the_rows_inside(browser, fresh):
    from astropy.table import Table

    with ExplorerProcess(fresh) as server:
        page = Page(browser, server.url)
        p = page.page
        (x0, y0), (x1, y1) = page.select("box-select", [(0.05, 0.1), (0.35, 0.95)])
        st = Store.open(fresh)
        valid = np.flatnonzero(st.array("valid")[...])
        e = st.array("embedding")[...][valid]
        inside = valid[
            (e[:, 0] >= min(x0, x1)) & (e[:, 0] <= max(x0, x1))
            & (e[:, 1] >= min(y0, y1)) & (e[:, 1] <= max(y0, y1))
        ]  # fmt: skip
        assert 5 < len(inside) < len(valid)
        assert page.selection_gallery(inside) == inside[:24].tolist()
        p.locator(".elodin-export button").click()
        done = p.locator(".elodin-export-status .exported")
        done.wait_for(timeout=60000)
        path = done.get_attribute("data-path")
        assert int(done.get_attribute("data-rows")) == len(inside)
        page.close()
    assert page.problems == []
    assert Table.read(path)["index"].tolist() == inside.tolist()


def test_a_lasso_selection_is_labelled_and_the_map_coloured_by_a_variable(browser, fresh):
    """Lasso on the map -> the selection gallery -> one button labels every row in it; the
    colour menu offers every numeric per-cutout variable (here ``ra``)."""
    from matplotlib.path import Path as MplPath

    with ExplorerProcess(fresh) as server:
        page = Page(browser, server.url)
        p = page.page
        poly = page.select("lasso-select", [(0.06, 0.9), (0.55, 0.93), (0.45, 0.5), (0.1, 0.15)])
        st = Store.open(fresh)
        valid = np.flatnonzero(st.array("valid")[...])
        e = st.array("embedding")[...][valid].astype(np.float64)
        inside = valid[MplPath(poly).contains_points(e)]
        assert 5 < len(inside) < len(valid)
        assert page.selection_gallery(inside) == inside[:24].tolist()
        p.locator(".elodin-select-label-interesting button").click()
        p.locator(
            f'.elodin-select-status .saved[data-rows="{len(inside)}"][data-label="interesting"]'
        ).wait_for(timeout=30000)
        # Colour by a plain per-cutout variable, chosen in the page.
        p.locator("select.bk-input").first.select_option("ra")
        p.locator(".elodin-legend").get_by_text("mean ra per pixel").wait_for(timeout=30000)
        page.close()
    assert page.problems == []
    labels = Store.open(fresh).array("label")[...]
    assert (labels[inside] == 1).all() and (np.delete(labels, inside) == -1).all()
