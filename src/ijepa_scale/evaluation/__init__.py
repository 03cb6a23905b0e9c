"""Frozen-feature evaluation: features over tar shards, linear probe, k-NN, result table and CSV."""

from .features import FeatureSet, extract_features, pooled_features
from .knn import knn_accuracy, knn_predict
from .linear import linear_probe

__all__ = ["FeatureSet", "extract_features", "pooled_features", "knn_accuracy", "knn_predict", "linear_probe"]
