"""The report's similarity sheet reads the store's k-NN graph (``elodin neighbors``) when it
has one that covers the query and matches the store, and searches otherwise."""

from __future__ import annotations

import numpy as np
from explore_store import make_store

from pipeline import analysis
from pipeline.analysis import index as nn
from pipeline.report import build_report
from pipeline.store import Store


def test_similar_sheet_reads_the_graph_when_present(tmp_path):
    # A store whose cutouts can be read back (the report draws them): the explorer's.
    st = Store.open(make_store(tmp_path / "data"))
    q = int(np.flatnonzero(st.array("valid")[...])[3])
    before = build_report(st.path, tmp_path / "r0", query=q, n_similar=5, max_points=0)
    assert "pipeline.analysis.similar" in before.manifest["similar"]["how"]
    nn.build_index(st.path, kind="flat", progress=False)
    nn.neighbors(st.path, k=6, progress=False)
    graph = Store.open(st.path).array("neighbors")[q]
    r = build_report(st.path, tmp_path / "r1", query=q, n_similar=5, max_points=0)
    sim = r.manifest["similar"]
    assert "k-NN graph" in sim["how"]
    assert sim["rows"] == graph[:5].tolist() == before.manifest["similar"]["rows"]
    np.testing.assert_allclose(sim["distances"], before.manifest["similar"]["distances"], rtol=1e-5)
    # More neighbours than the graph holds, or a graph the store has outgrown: a search.
    more = build_report(st.path, tmp_path / "r2", query=q, n_similar=8, max_points=0)
    assert "pipeline.analysis.similar" in more.manifest["similar"]["how"]
    analysis.reduce(st.path, components=6)
    stale = build_report(st.path, tmp_path / "r3", query=q, n_similar=5, max_points=0)
    assert "pipeline.analysis.similar" in stale.manifest["similar"]["how"]
