"""The main job: cutouts of survey images -> CNN fingerprints in a Zarr store, on Dask.

The flow, as :func:`fingerprint` (``api.py``) reads::

    listing  = InputListing.of(inputs)                   # ids, sizes, mtimes: no image opened
    store    = open or create the store; refuse another model/config
    known    = compare_with_records(store, listing)      # one vectorised (path, size, mtime) check
    sources  = open and measure only the new or changed images  # batched tasks on the workers
    plan     = plan the new images (blobs: detection tasks per tile)
    segment  = save the plan, grow the store by its rows
    todo     = units of the touched segments without a done marker, made lazily
    submit one task per unit (a share of GPU=1 when asked), at most a few per worker in flight
    each task: read tile + halo -> cut -> stretch -> infer in batches -> write its chunks -> mark done

One module a job: ``settings`` (every setting resolved and checked once), ``listing`` (inputs
as a listing, compared with the store's records), ``probe`` (the new images opened and
measured on the workers), ``plan`` (windows, stretch limits, the segment record), ``submit`` (unit jobs, the task loop, cluster threads and GPUs), ``worker``
(what a task runs) and ``api`` (the flow).

Every planned window is written exactly once: rows are fixed by the saved plan, each Zarr chunk
belongs to one unit, and a unit that is run again (a lost worker, a rerun after Ctrl-C or
``kill -9``) writes the same bytes. A rerun skips units that are done; a finished store
does no inference at all.
"""

from __future__ import annotations

from ..geometry import cut_windows
from .api import FingerprintResult, fingerprint
from .listing import InputListing, compare_with_records
from .listing import _stat_files as _stat_files
from .plan import _image_limits as _image_limits
from .plan import _plan_blobs as _plan_blobs
from .plan import _plan_digest as _plan_digest
from .plan import _plan_sources as _plan_sources
from .plan import _record_segment as _record_segment
from .plan import image_limits, plan_sources
from .settings import METHODS, CutoutSettings, FingerprintSettings, fingerprint_settings
from .submit import _run_jobs as _run_jobs
from .submit import _segment_jobs as _segment_jobs
from .submit import _session_threads as _session_threads
from .submit import gpu_share
from .worker import ModelRef, TileJob, UnitJob, run_unit
from .worker import _prefetch as _prefetch
from .worker import _prepared_batches as _prepared_batches
from .worker import _session_for as _session_for
from .worker import _unit_task as _unit_task

# The ``from .m import _x as _x`` lines re-export private names that benchmarks and tests
# import from here; they are not part of the API.
# The public home of fingerprint() is this package, as before the split into modules.
fingerprint.__module__ = __name__

__all__ = [
    "METHODS",
    "CutoutSettings",
    "FingerprintResult",
    "FingerprintSettings",
    "InputListing",
    "ModelRef",
    "TileJob",
    "UnitJob",
    "compare_with_records",
    "cut_windows",
    "fingerprint",
    "fingerprint_settings",
    "gpu_share",
    "image_limits",
    "plan_sources",
    "run_unit",
]
