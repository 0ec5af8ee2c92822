"""Similarity at survey scale: a FAISS index of the store's vectors, kept inside the store.

:class:`NeighborIndex` is a scikit-learn-like wrapper (``fit`` / ``kneighbors`` / ``save`` /
``load``) around one FAISS index; :func:`build_index` makes it for a store and
:func:`neighbors` writes the k-NN graph of every valid row with it.

Kinds
    ``flat`` (exact scan, 4 d bytes per vector), ``hnsw`` (graph, exact vectors),
    ``ivf`` (inverted lists of exact vectors), ``ivfpq`` (inverted lists of PQ codes, the
    candidates re-ranked exactly against the full vectors: FAISS's ``IVF..,PQ..,RFlat``, with an
    HNSW coarse quantiser when the lists are many) and ``auto``: ``flat`` below
    ``analysis.index.auto-threshold`` rows (about 10^6, where one exact scan still takes tens
    of milliseconds), ``ivfpq`` above.

Metrics
    ``l2`` and ``cosine`` (the vectors normalised, FAISS's L2 on them; ``1 - cos = |a - b|^2 / 2``),
    the same distances :func:`pipeline.analysis.similar` computes.

Modules
    :mod:`.estimator` (:class:`NeighborIndex` and the FAISS helpers), :mod:`.persist` (the
    chunked, checksummed bytes in the store: save, load, the IVF-PQ part alone), :mod:`.status`
    (whether the saved index covers the store, from a few attrs), :mod:`.build`
    (:func:`build_index`: train on a sample, add the rows by block tasks, extend) and
    :mod:`.graph` (:func:`neighbors`: the k-NN graph of every row). Each module's docstring
    says more.

Hooks
    ``_BYTE_CHUNK``, ``_read_checked`` and ``load_index`` are looked up on this package at call
    time (:func:`.persist._package`), so replacing them here reaches every module.
"""

from __future__ import annotations

# The names beyond __all__ are re-exported (``as``) for the stages that read the index's
# arrays and for the hooks above.
from .build import SPACES, IndexResult, build_index
from .estimator import _CACHE as _CACHE
from .estimator import KINDS, METRICS, NeighborIndex
from .graph import GRAPH_DIST_VAR as GRAPH_DIST_VAR
from .graph import GRAPH_VAR as GRAPH_VAR
from .graph import NeighborsResult, graph_for, neighbors
from .persist import _BYTE_CHUNK as _BYTE_CHUNK
from .persist import BASE_VAR as BASE_VAR
from .persist import IDS_VAR as IDS_VAR
from .persist import INDEX_VAR as INDEX_VAR
from .persist import _read_checked as _read_checked
from .persist import load_base as load_base
from .persist import load_index
from .status import data_state, index_status
from .status import usable_index as usable_index

__all__ = [
    "KINDS",
    "METRICS",
    "SPACES",
    "IndexResult",
    "NeighborIndex",
    "NeighborsResult",
    "build_index",
    "data_state",
    "graph_for",
    "index_status",
    "load_index",
    "neighbors",
]
