"""What an astronomer looks at: the embedding map with thumbnails, cluster galleries, mosaic
overlays, similarity and outlier sheets, and one ``index.html`` tying them together.

``make_report(store, out_dir)`` writes PNG figures, ``report.json`` (what each figure shows)
and ``index.html`` (interactive Bokeh map, inline, opens from disk with no server).
"""

from __future__ import annotations

from .build import Report, build_report, make_report

__all__ = ["Report", "build_report", "make_report"]
