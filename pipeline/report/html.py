"""``index.html``: one page that opens from disk and ties the figures together."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["render_index"]


def render_index(path: Path, context: Mapping[str, Any]) -> Path:
    """Render the packaged template with ``context`` to ``path`` (links stay relative)."""
    import importlib.resources

    import jinja2

    text = (
        importlib.resources.files("pipeline.report")
        .joinpath("templates/index.html.j2")
        .read_text(encoding="utf-8")
    )
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    html = env.from_string(text).render(**context)
    Path(path).write_text(html, encoding="utf-8")
    return Path(path)
