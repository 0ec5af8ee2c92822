"""``elodin explore``: an interactive explorer of a store, a Bokeh server in the browser.

The map of every valid row (datashader renders the viewport), cutouts read on demand,
neighbours, outliers, selections exported as catalogs, labels kept in the store and
"more like my labels". Modules: ``server`` (the process), ``app`` (the page), ``api`` (HTTP),
``data`` (what is held in memory), ``labels``, ``render``.
"""

from .server import explore

__all__ = ["explore"]
