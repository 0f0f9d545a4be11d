"""Offline clustering into pseudo-classes for cluster discrimination (UNICOM / MLCD): extract, k-means, assign."""

from unimm.clustering.kmeans import (
    TeacherCollator,
    assign,
    extract_features,
    iter_feature_chunks,
    top_l,
    train_kmeans,
)

__all__ = ["TeacherCollator", "assign", "extract_features", "iter_feature_chunks", "top_l", "train_kmeans"]
