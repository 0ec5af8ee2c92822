"""Labels set in the explorer, kept in the store, and "more like my labels".

A label is ``label(cutout)`` int8 in the store: 1 interesting, 0 not interesting, -1 none
(the fill). Each change is also appended to a small table of when it was set
(``label_log_row``, ``label_log_label``, ``label_log_time`` on dim ``label_event``; unix
seconds). Every write takes the store's writer lock for its duration, like the analysis
stages, so a label is never written while a run (fingerprint, reduce ...) holds the store; a
read-only store, or one locked by a live run, refuses the label and nothing is written.

"More like my labels" fits a logistic regression (scikit-learn) on the labelled rows in PCA
space and ranks the unlabelled valid rows by the probability of "interesting", streaming the
store's ``pca`` block by block (memory: one block and the top ``n``); it is fitted again after
every new label.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from .. import config
from ..analysis import _base
from ..errors import StoreError
from ..store import Store

__all__ = ["LABELS", "LabelRefused", "Labels"]

logger = logging.getLogger(__name__)

LABELS = {"interesting": 1, "not_interesting": 0, "none": -1}
NAMES = {v: k for k, v in LABELS.items()}


class LabelRefused(StoreError):
    """The store cannot take labels now (read-only, or a run holds its writer lock)."""


class Labels:
    """The labels of the valid rows, in memory and in the store.

    Parameters
    ----------
    store : Store
    rows : array of int
        The store's valid rows, sorted (what :attr:`values` is aligned with).
    read_only : bool
        Refuse every label (``elodin explore --read-only``).
    """

    def __init__(self, store: Store, rows: np.ndarray, *, read_only: bool = False) -> None:
        self.store = store
        self.path = store.path
        self.rows = rows
        self.read_only = read_only
        self.values = np.full(len(rows), -1, np.int8)
        if "label" in _base.names(store):
            arr = store.array("label")
            block = _base.block_rows(store, None)
            for start in range(0, store.n_rows, block):
                lo, hi = np.searchsorted(rows, [start, start + block])
                if hi > lo:
                    chunk = np.asarray(arr[start : start + block], np.int8)
                    self.values[lo:hi] = chunk[rows[lo:hi] - start]
        self.version = 0
        self._lock = threading.Lock()
        self._ranked: tuple[int, int, list[dict[str, Any]]] | None = None

    # -- reading -------------------------------------------------------------------------
    def _index(self, row: int) -> int:
        return int(np.searchsorted(self.rows, row))

    def get(self, row: int) -> str:
        return NAMES[int(self.values[self._index(row)])]

    def counts(self) -> dict[str, int]:
        return {
            "interesting": int(np.count_nonzero(self.values == 1)),
            "not_interesting": int(np.count_nonzero(self.values == 0)),
        }

    def log(self) -> list[dict[str, Any]]:
        """Every change recorded in the store, oldest first."""
        names = _base.names(self.store)
        cols = ("row", "label", "time")
        if not all(f"label_log_{c}" in names for c in cols):
            return []
        data = {c: np.asarray(self.store.array(f"label_log_{c}")[...]) for c in cols}
        n = min(len(v) for v in data.values())  # an interrupted append: the shortest column
        return [
            {
                "row": int(data["row"][i]),
                "label": NAMES.get(int(data["label"][i]), "none"),
                "time": float(data["time"][i]),
            }
            for i in range(n)
        ]

    def writable(self) -> tuple[bool, str]:
        """Whether a label could be written now, and why not (for the page)."""
        if self.read_only:
            return False, "labels are off: the explorer was started with --read-only"
        holder = Store.lock_holder(self.path)
        if holder is not None and holder.state() != "stale" and holder.pid != os.getpid():
            return (
                False,
                f"labels are not saved while another run writes to the store: {holder.describe()}",
            )
        if not os.access(self.path, os.W_OK):
            return False, f"labels are not saved: the store {self.path} is read-only"
        return True, ""

    # -- writing -------------------------------------------------------------------------
    def set(self, row: int | Sequence[int] | np.ndarray, label: str) -> dict[str, Any]:
        """Record ``label`` (a key of :data:`LABELS`) for the valid row ``row``, or for each of
        several (a selection: one write and one log entry per row, under one lock).

        Raises :class:`LabelRefused` when the store cannot take it; nothing is written then.
        """
        code = LABELS[label]
        many = not isinstance(row, int | np.integer)
        rows = np.unique(np.asarray(row, np.int64).reshape(-1))
        i = np.searchsorted(self.rows, rows)
        if (
            not len(rows)
            or (i >= len(self.rows)).any()
            or (self.rows[np.minimum(i, len(self.rows) - 1)] != rows).any()
        ):
            raise ValueError("labels are set on valid rows only")
        if self.read_only or not os.access(self.path, os.W_OK):
            # The flag, or the store's own file modes: refused before anything is tried.
            raise LabelRefused(self.writable()[1])
        with self._lock:
            try:
                lock = Store.lock(self.path, command=f"elodin explore {self.path} (label)")
            except StoreError as e:
                raise LabelRefused(f"label not saved: {e}") from None
            except OSError as e:
                raise LabelRefused(
                    f"label not saved: cannot write to {self.path} ({e.strerror or e})"
                ) from None
            try:
                st = Store.open(self.path, mode="r+")
                if "label" not in _base.names(st):
                    st.create_row_array(
                        "label",
                        dtype="int8",
                        fill=-1,
                        attrs={
                            "about": "explorer labels: 1 interesting, 0 not interesting, -1 none"
                        },
                    )
                st.write_values("label", rows, np.full(len(rows), code, np.int8))
                st.append_table(
                    "label_log",
                    {
                        "row": rows,
                        "label": np.full(len(rows), code, np.int8),
                        "time": np.full(len(rows), time.time(), np.float64),
                    },
                    dim="label_event",
                )
            except OSError as e:
                raise LabelRefused(
                    f"label not saved: cannot write to {self.path} ({e.strerror or e})"
                ) from None
            finally:
                lock.release()
            self.values[i] = code
            self.version += 1
        if many:
            logger.info("%s: %d rows labelled %s", self.path, len(rows), label)
            return {"rows": len(rows), "label": label, "counts": self.counts()}
        logger.info("%s: row %d labelled %s", self.path, row, label)
        return {"row": int(row), "label": label, "counts": self.counts()}

    # -- more like my labels -------------------------------------------------------------
    def ranked(self, n: int) -> dict[str, Any]:
        """The ``n`` unlabelled valid rows most likely "interesting" by a logistic regression
        fitted on the labelled rows in PCA space, most likely first."""
        from sklearn.linear_model import LogisticRegression

        st = self.store
        if "pca" not in _base.names(st):
            raise StoreError(f"{self.path}: no `pca` to rank in; run `elodin reduce {self.path}`")
        cached = self._ranked
        if cached is not None and cached[0] == self.version and cached[1] >= n:
            return {"results": cached[2][:n], **self.counts()}
        labelled = np.flatnonzero(self.values >= 0)
        y = self.values[labelled].astype(int)
        if len(np.unique(y)) < 2:
            raise StoreError(
                "more like my labels needs at least one cutout labelled interesting and one "
                "labelled not interesting"
            )
        pca = st.array("pca")
        x = np.asarray(pca.oindex[self.rows[labelled]], np.float64)
        model = LogisticRegression(
            C=config.get_float("explore.rank-c"), class_weight="balanced", max_iter=1000
        ).fit(x, y)
        top = _base.TopN(n, largest=True)
        done = self.rows[labelled]
        block = _base.block_rows(st, None)
        for start in range(0, st.n_rows, block):
            stop = min(st.n_rows, start + block)
            ok = np.asarray(st.array("valid")[start:stop], bool)
            ok[done[(done >= start) & (done < stop)] - start] = False
            if not ok.any():
                continue
            values = np.asarray(pca[start:stop], np.float64)[ok]
            fine = np.isfinite(values).all(axis=1)
            p = np.full(len(values), np.nan)
            if fine.any():
                p[fine] = model.predict_proba(values[fine])[:, 1]
            top.add(p, np.flatnonzero(ok) + start)
        results = [
            {"row": int(r), "score": float(s)} for r, s in zip(top.index, top.scores, strict=True)
        ]
        self._ranked = (self.version, n, results)
        return {"results": results, **self.counts()}
