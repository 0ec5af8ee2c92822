"""The one look of a progress bar: tqdm on stderr, as wide as the terminal, off on request.

Long steps (opening new images, writing their records, fingerprinting, building an index)
each show one; ``--no-progress`` (``progress=False``) turns them all off.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["bar"]


def bar(total: int, *, desc: str, unit: str, enabled: bool = True) -> Any:
    """A ``tqdm`` bar of ``total`` ``unit``\\ s named ``desc`` on stderr (a no-op when not
    ``enabled``); use it as a context manager or close it."""
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        unit=unit,
        disable=not enabled,
        file=sys.stderr,
        dynamic_ncols=True,
        desc=desc,
    )
