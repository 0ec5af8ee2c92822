"""``elodin run CONFIG.yaml [--incremental]``: every stage from one file, and scheduled reprocessing.

A run config is an ordinary Elodin settings file whose ``elodin.run`` section says what to read
(``inputs``, optional ``catalog``) and where to write (``store``, ``export``, ``report``).

``--incremental`` is what a survey team schedules (scrontab, a Kubernetes CronJob):

1. inputs new since the last run, or changed (size or mtime differ from the store's record),
   are fingerprinted; a changed image's old rows are retired (``valid`` set to False) first;
2. the analysis is brought up to date by a documented policy (``run.refit-fraction``):
   - rows added since the models were last fitted < ``refit-fraction`` x rows they were fitted
     on: the models stay; each is restored from the store with the settings its stage
     recorded (``load_pca``, ``load_kmeans``, ``load_embedding``, ``load_outliers``), and only
     the new rows are projected with the stored PCA, assigned to the nearest stored cluster
     centre, placed in the embedding at the mean position of their nearest rows of the map's
     fitted sample (its ``n_neighbors``), and scored as outliers against the reference set
     ``outliers`` drew (its ``k``, size and seed);
   - otherwise every analysis stage is fitted again (the PCA from its saved sums, so old rows'
     fingerprints are not read again for the moments);
3. export and report are written again when anything changed.

A run with nothing new does no work at all and says so.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from . import config
from .errors import ConfigError

__all__ = ["RunResult", "run"]

logger = logging.getLogger(__name__)

STAGES = (
    "fingerprint",
    "reduce",
    "cluster",
    "embed",
    "outliers",
    "index",
    "neighbors",
    "export",
    "report",
)
ANALYSIS = ("reduce", "cluster", "embed", "outliers")


@dataclasses.dataclass
class RunResult:
    lines: list[str]
    work_done: bool


def _settings(path: str) -> dict:
    rs = dict(config.get("run"))
    if not rs.get("store"):
        raise ConfigError(f"{path}: elodin.run.store is not set (where the fingerprints go)")
    inputs = rs.get("inputs") or []
    if isinstance(inputs, str):
        inputs = [inputs]
    stages = list(rs.get("stages") or [])
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ConfigError(
            f"{path}: elodin.run.stages has unknown stage(s) {', '.join(unknown)}; known: {', '.join(STAGES)}"
        )
    if "fingerprint" in stages and not inputs:
        raise ConfigError(f"{path}: elodin.run.inputs is empty")
    store = str(rs["store"])
    stem = store.rstrip("/")
    stem = stem[: -len(".zarr")] if stem.endswith(".zarr") else stem
    fraction = rs.get("refit-fraction", 0.25)
    if (
        isinstance(fraction, bool)
        or not isinstance(fraction, int | float)
        or not 0 <= fraction <= 1
    ):
        raise ConfigError(
            f"{path}: elodin.run.refit-fraction must be a number in [0, 1], got {fraction!r}"
        )
    return {
        "inputs": [str(i) for i in inputs],
        "store": store,
        "catalog": rs.get("catalog"),
        "stages": stages,
        "export": str(rs.get("export") or f"{stem}.parquet"),
        "report": str(rs.get("report") or f"{stem}-report"),
        "refit_fraction": float(fraction),
    }


def run(
    config_path: str | os.PathLike,
    *,
    incremental: bool = False,
    scheduler: str | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> RunResult:
    """Run the stages of ``config_path``; see the module docstring for ``incremental``."""
    from .compute import connect
    from .fingerprint import fingerprint
    from .store import Store

    config.load_file(config_path)
    rs = _settings(str(config_path))
    stages = rs["stages"]
    if "fingerprint" in stages:
        from .fingerprint import fingerprint_settings

        fingerprint_settings()  # a bad setting is one line before the lock, workers or store
    if "reduce" in stages:
        from .analysis import reduce_settings

        reduce_settings()
    lines: list[str] = []
    # Every stage writes to the store: the whole run holds its writer lock (fingerprint() takes
    # it again inside, which a holder may), so a second run cannot refit models under this one.
    with (
        Store.lock(rs["store"], command=f"elodin run {config_path}"),
        connect(scheduler, workers=workers, quiet=not progress) as client,
    ):
        added = False
        if "fingerprint" in stages:
            result = fingerprint(
                rs["inputs"],
                rs["store"],
                catalog=rs["catalog"],
                client=client,
                progress=progress,
                replace_changed=incremental,
            )
            lines.append(str(result))
            added = result.units_run > 0 or result.retired > 0
        store = Store.open(rs["store"], mode="r+")
        state = store.attrs.get("runner") or {}
        fitted_rows = int(state.get("fitted_rows", 0))
        covered = int(state.get("segments", 0))
        new_rows = _valid_rows_after(store, covered)
        analysis_wanted = [s for s in ANALYSIS if s in stages]
        if incremental and not added and new_rows == 0 and state and _outputs_exist(rs, stages):
            lines.append(f"{rs['store']}: nothing new since the last run; no work done")
            return RunResult(lines, False)
        if analysis_wanted:
            if (
                incremental
                and state
                and fitted_rows
                and new_rows < rs["refit_fraction"] * fitted_rows
                and not _retired_since(store, state)
            ):
                start = (
                    store.segments[covered].row_start
                    if covered < len(store.segments)
                    else store.n_rows
                )
                absorbed = absorb_rows(store, start, store.n_rows)
                lines.append(
                    f"absorbed {absorbed} new row(s) into the fitted models ({new_rows} < {rs['refit_fraction']:.0%} of {fitted_rows})"
                )
            else:
                lines += _fit_all(rs["store"], analysis_wanted, client)
            store = Store.open(rs["store"], mode="r+")
            if (
                state.get("fitted_rows") is None
                or not incremental
                or new_rows >= rs["refit_fraction"] * max(fitted_rows, 1)
                or not fitted_rows
            ):
                fitted_rows = _valid_total(store)
            store.set_attrs(
                runner={
                    "fitted_rows": fitted_rows,
                    "segments": len(store.segments),
                    "retired": _retired_count(store),
                }
            )
        lines += _similarity(rs, stages, client, progress)
        if "export" in stages:
            from .analysis import export

            export(rs["store"], rs["export"])
            lines.append(f"catalog: {rs['export']}")
        if "report" in stages:
            from .report import make_report

            lines.append(f"report: {make_report(rs['store'], rs['report'])}")
    return RunResult(lines, True)


def _fit_all(store: str, stages: Sequence[str], client) -> list[str]:
    from . import analysis

    out = []
    for name in stages:
        getattr(analysis, name)(store, client=client)
        out.append(f"{name}: fitted on every row")
    return out


def _similarity(rs: dict, stages: Sequence[str], client, progress: bool) -> list[str]:
    """The neighbour index (extended after an append while the new rows stay under
    ``refit-fraction`` of those it was built on, else built again) and the k-NN graph."""
    from .analysis import index as nn

    out = []
    if "index" in stages:
        result = nn.build_index(
            rs["store"], refit_fraction=rs["refit_fraction"], client=client, progress=progress
        )
        out.append(str(result))
    if "neighbors" in stages:
        from .store import Store

        k = config.get_int("analysis.neighbors.k", minimum=1)
        if nn.graph_for(Store.open(rs["store"]), k) is None:
            out.append(str(nn.neighbors(rs["store"], client=client, progress=progress)))
    return out


def _outputs_exist(rs: dict, stages: Sequence[str]) -> bool:
    ok = True
    if "export" in stages:
        ok &= Path(rs["export"]).exists() if "://" not in rs["export"] else True
    if "report" in stages:
        ok &= (Path(rs["report"]) / "index.html").exists() if "://" not in rs["report"] else True
    return ok


def _valid_rows_after(store, covered: int) -> int:
    segs = store.segments
    if covered >= len(segs):
        return 0
    start = segs[covered].row_start
    from .analysis import _base

    total = 0
    valid = store.array("valid")
    step = _base.block_rows(store, None)  # the analysis stages' block rule
    for b in range(start, store.n_rows, step):
        total += int(np.count_nonzero(valid[b : b + step]))
    return total


def _valid_total(store) -> int:
    return _valid_rows_after(store, 0)


def _retired_count(store) -> int:
    return store.n_retired()


def _retired_since(store, state: dict) -> bool:
    return _retired_count(store) != int(state.get("retired", 0))


def absorb_rows(store, start: int, stop: int) -> int:
    """Place rows ``start:stop`` with the fitted models, leaving the models and old rows as
    they are (the small-update half of the ``--incremental`` policy).

    Each model is restored from the store with the settings its stage recorded
    (:func:`~pipeline.analysis.load_pca`, :func:`~pipeline.analysis.load_kmeans`,
    :func:`~pipeline.analysis.load_embedding`, :func:`~pipeline.analysis.load_outliers`), not
    from the current configuration, and applied block by block: ``transform``, ``predict``,
    ``transform``, ``score_rows``. ``elodin outliers -k 20`` followed by an incremental run
    scores the new rows with k = 20.
    """
    from .analysis import _base, load_embedding, load_kmeans, load_outliers, load_pca
    from .errors import StoreError

    names = set(store.dataset().data_vars)
    if not {"pca_mean", "pca_components", "pca"} <= names:
        raise ConfigError(f"{store.path}: no fitted PCA to update; run without --incremental first")
    pca = load_pca(store)
    try:
        kmeans = load_kmeans(store) if {"cluster_centers", "cluster"} <= names else None
        embedding = load_embedding(store, upto=start) if "embedding" in names else None
        scorer = load_outliers(store, upto=start) if "outlier_score" in names else None
    except StoreError as e:
        raise ConfigError(f"{e}; run without --incremental") from None
    # The analysis stages' block rule: whole store chunks, so each chunk has one writer.
    step = _base.block_rows(store, None)
    n = 0
    for b0 in range(start, stop, step):
        b1 = min(stop, b0 + step)
        fp = store.array("fingerprint")[b0:b1].astype(np.float32)
        ok = store.array("valid")[b0:b1] & np.isfinite(fp).all(axis=1)
        # Empty slots become NaN rows: every model leaves those NaN (or -1).
        fp[~ok] = np.nan
        rows = pca.transform(fp)
        values = {"pca": rows}
        if kmeans is not None:
            values["cluster"] = kmeans.predict(rows).astype(np.int32)
        if embedding is not None:
            values["embedding"] = embedding.transform(rows)
        if scorer is not None:
            values["outlier_score"] = scorer.score_rows(rows)
        _write_partial(store, b0, values)
        n += int(np.count_nonzero(ok))
    return n


def _write_partial(store, start: int, values: dict) -> None:
    # New segments start on a chunk boundary; blocks here are whole chunks except the last.
    for name, data in values.items():
        store.array(name)[start : start + len(data)] = data
