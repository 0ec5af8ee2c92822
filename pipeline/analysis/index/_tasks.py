"""What the index's block tasks share: bounded waves of tasks and the progress bar."""

from __future__ import annotations

import os

from .. import _base


def _waves(run: _base.Runner, tasks: list, *, size: int):
    """Compute ``tasks`` a few at a time (bounded client memory), in order."""
    for i in range(0, len(tasks), size):
        yield from run.compute(*tasks[i : i + size])


def _in_flight(run: _base.Runner) -> int:
    if run.client is not None:
        try:
            return 2 * max(1, len(run.client.scheduler_info(n_workers=-1)["workers"])) + 2
        except (TypeError, KeyError):
            return 8
    return 2 * (os.cpu_count() or 1)


def _bar(total: int, desc: str, progress: bool):
    from ...progress import bar

    return bar(total, desc=desc, unit="row", enabled=progress)
