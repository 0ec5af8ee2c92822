"""Analysis over the fingerprint store, streamed chunk by chunk and run on the Dask workers.

``reduce`` (exact incremental PCA) -> ``cluster`` (k-means over all rows; agglomerative,
affinity propagation, HDBSCAN on a sample) -> ``embed`` (UMAP / t-SNE on a sample, the rest
transformed) -> ``outliers`` (k-NN distance against a reference sample) -> ``export`` (the
catalog; ``export_hats`` for lsdb) and ``crossmatch`` (with an external catalog on the sky);
``similar`` answers "more like this one" by streaming the store past one query.
Each function takes the store path first and everything else as keywords with defaults from
``elodin.analysis`` (pipeline/elodin.yaml). The estimators behind them follow scikit-learn's
conventions (``fit`` returns ``self``, fitted state ends in ``_``) and accept numpy or dask
arrays, skipping rows that hold NaN (the store's empty slots).
"""

from .clustering import (
    ClusterResult,
    SampleClusterer,
    StreamingKMeans,
    cluster,
    hdbscan_sizes,
    load_kmeans,
)
from .crossmatch import crossmatch, crossmatch_file
from .embed import EmbedResult, SampleEmbedding, StoredEmbedding, embed, load_embedding
from .export import ExportResult, export
from .hats import export_hats
from .index import NeighborIndex, build_index, neighbors
from .outliers import KNNOutlier, load_outliers, outliers
from .reduce import (
    ExactPCA,
    PCAResult,
    PixelFeatures,
    ReduceSettings,
    load_pca,
    reduce,
    reduce_settings,
)
from .similar import fingerprint_image, nearest_cutout, similar

__all__ = [
    "ClusterResult",
    "EmbedResult",
    "ExactPCA",
    "ExportResult",
    "KNNOutlier",
    "NeighborIndex",
    "PCAResult",
    "PixelFeatures",
    "ReduceSettings",
    "SampleClusterer",
    "SampleEmbedding",
    "StoredEmbedding",
    "StreamingKMeans",
    "build_index",
    "cluster",
    "crossmatch",
    "crossmatch_file",
    "embed",
    "export",
    "export_hats",
    "fingerprint_image",
    "hdbscan_sizes",
    "load_embedding",
    "load_kmeans",
    "load_outliers",
    "load_pca",
    "nearest_cutout",
    "neighbors",
    "outliers",
    "reduce",
    "reduce_settings",
    "similar",
]
